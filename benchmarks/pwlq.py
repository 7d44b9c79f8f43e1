"""PWLQ post-training quantization benchmark (issue 7), following shared/BENCHMARKS.md.

Fashion-MNIST, no training after quantization: one cached float checkpoint per model
(``mobile_swish`` with the shared recipe; keras.applications MobileNetV2, alpha 0.35, on images
resized to ``--image_size`` with 3 channels, trained briefly), then for each weight bit-width the
paper's table 1 (per-channel, no bias correction: uniform vs piecewise with the Gaussian,
Laplacian and searched breakpoints) and table 2 (bias correction "+B", per-group "+Gr", both
"+BGr") variants (see ``VARIANTS``), activations 8-bit per tensor from 512 calibration images, first and last
layers 8-bit uniform. Records Keras test accuracy, output MSE against the float logits, weight
memory and the seconds the PTQ call takes.

    python -m benchmarks.pwlq                                   # or: make bench ONLY=pwlq
    python -m benchmarks.pwlq --models=mobile_swish --bits=4 --test_limit=1000   # quick
    python -m benchmarks.pwlq --models=mobile_swish --bits=4,3,2 --variants=uni,pwg,pws,pwg+BGr,pws+B/int \
        --export_limit=1000 --out=benchmarks/results/pwlq_export.json       # exported accuracy
"""
from __future__ import annotations

import argparse
import json
import os
import time

import tfq  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import tf_keras as keras

from benchmarks.common import describe_error, new_results, save_row
from tfq import costs, data, models, train
from tfq.ptq.pwlq import pwlq

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")

#: name -> pwlq options: table 1 rows (per channel, no bias correction), table 2 rows ("+B" bias
#: correction, "+Gr" per group), then this library's alternatives (bias correction modes, the
#: integer tail ratio that exports as one int8 convolution, PW-Comp / PW-Stor bit budgets)
VARIANTS = {
    "uni": dict(method="uniform", bias_correction=False),
    "pwg": dict(breakpoint="gaussian", bias_correction=False),
    "pwl": dict(breakpoint="laplacian", bias_correction=False),
    "pws": dict(breakpoint="search", bias_correction=False),
    "uni+B": dict(method="uniform", bias_correction=True),
    "uni+Gr": dict(method="uniform", bias_correction=False, granularity="group"),
    "uni+BGr": dict(method="uniform", bias_correction=True, granularity="group"),
    "pwg+B": dict(breakpoint="gaussian", bias_correction=True),
    "pwg+Gr": dict(breakpoint="gaussian", bias_correction=False, granularity="group"),
    "pwg+BGr": dict(breakpoint="gaussian", bias_correction=True, granularity="group"),
    "pws+BGr": dict(breakpoint="search", bias_correction=True, granularity="group"),
    "pwg+Bscale": dict(breakpoint="gaussian", bias_correction="scale"),
    "pwg+Bexact": dict(breakpoint="gaussian", bias_correction="exact"),
    "pws+B/int": dict(breakpoint="search", bias_correction=True, integer_tail_ratio=True),
    "pwg+BGr/comp": dict(breakpoint="gaussian", bias_correction=True, granularity="group", bits_mean="comp"),
    "pwg+BGr/stor": dict(breakpoint="gaussian", bias_correction=True, granularity="group", bits_mean="stor"),
}


def mobilenet_v2_float(image_size, epochs, batch_size=128, learning_rate=2e-3, seed=0, limit=None, verbose=0):
    """keras.applications MobileNetV2 (alpha 0.35, random init, BatchNorm momentum 0.9) trained
    on resized Fashion-MNIST, cached in ``benchmarks/.cache``."""
    keras.utils.set_random_seed(seed)
    os.makedirs(CACHE, exist_ok=True)
    tag = (f"fashion_mnist_mobilenet_v2_bn09_s{image_size}_e{epochs}_b{batch_size}_lr{learning_rate}"
           f"_s{seed}_n{limit or 'all'}")
    path = os.path.join(CACHE, f"{tag}.h5")
    if os.path.exists(path):
        with tfq.quantize_scope():
            return keras.models.load_model(path, compile=False), path
    net = models.mobilenet_v2(input_shape=(image_size, image_size, 3), num_classes=10)
    for layer in net.layers:  # keras.applications uses 0.999, too slow for a short training
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    ds = data.load("fashion_mnist", "train", batch_size=batch_size, limit=limit, seed=seed, channels=3,
                   image_size=(image_size, image_size))
    train.compile_model(net, learning_rate, steps=epochs * int(ds.cardinality()))
    net.fit(ds, epochs=epochs, verbose=verbose)
    net.save(path)
    return net, path


def dataset_arrays(model_name, split, limit, image_size):
    """Test or calibration images as the model sees them (NumPy), with labels."""
    if model_name != "mobilenet_v2":
        return data.load_numpy("fashion_mnist", split, limit=limit)
    ds = data.load("fashion_mnist", split, batch_size=256, shuffle=False, limit=limit, channels=3,
                   image_size=(image_size, image_size))
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def divergence_summary(q, flatbuffer, graph, x):
    """``tfq.export.verify.locate_divergence`` (XNNPACK arithmetic, every op fed Keras's codes) on
    ``x``: how many ops were compared and the ones whose output differs from Keras anywhere."""
    from tfq.export import verify
    rows = verify.locate_divergence(q, flatbuffer, x, arithmetic="xnnpack", graph=graph)
    differing = [{k: r[k] for k in ("op_index", "op", "layer", "differing", "beyond_one_step", "max_steps")}
                 for r in rows if r["differing"] > 0]
    return {"examples": int(len(x)), "ops_compared": len(rows), "ops_differing": differing,
            "largest_share_differing": max([r["differing"] for r in rows], default=0.0),
            "any_beyond_one_step": any(r["beyond_one_step"] > 0 for r in rows)}


def export_columns(q, x_test, y_test, limit, exact_hard_swish=False, divergence=0):
    """Export a PTQ model: IntegerGraph accuracy on the first ``limit`` test images (exact: split
    layers become kernel-parts ops), TFLite (XNNPACK) accuracy on all of them (split layers
    re-quantized to plain int8, ``approximate_piecewise``), how many layers were split, and
    ``tfq.export.verify`` parity against Keras on the first ``min(limit, 300)`` images."""
    from tfq.export import runs, tflite, verify
    split = tflite.split_layers(q)
    start = time.perf_counter()
    flatbuffer = tflite.to_tflite(q, approximate_piecewise=bool(split), exact_hard_swish=exact_hard_swish)
    graph = tflite.to_integer_graph(q, flatbuffer=flatbuffer)
    export_seconds = time.perf_counter() - start
    report = verify.verify(q, flatbuffer, x_test[:min(limit, 300)], graph=graph)
    columns = {}
    if divergence:
        columns["divergence"] = divergence_summary(q, flatbuffer, graph, x_test[:divergence])
    parity = {runtime: report[runtime] for runtime in ("xnnpack", "reference", "integer_graph", "integer_graph_xnnpack")
              if runtime in report}
    return {**columns, "split_layers": len(split), "kernel_parts_ops": len(graph.parts_ops()), "parity": parity,
            "export_seconds": export_seconds, "int8_bytes": len(flatbuffer),
            "tflite_accuracy": runs.tflite_accuracy(flatbuffer, x_test, y_test),
            "tflite_is_approximate": bool(split),
            "integer_graph_accuracy": runs.integer_graph_accuracy(graph, flatbuffer, x_test[:limit], y_test[:limit]),
            "keras_accuracy_first_n": float(np.mean(np.argmax(q.predict(x_test[:limit], batch_size=256, verbose=0), 1)
                                                    == y_test[:limit])),
            "integer_graph_images": int(min(limit, len(x_test)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobile_swish,mobilenet_v2")
    parser.add_argument("--bits", default="8,7,6,5,4,3,2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--float_epochs", type=int, default=3, help="mobile_swish float recipe (shared cache)")
    parser.add_argument("--mobilenet_epochs", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=48, help="MobileNetV2 input side (>= 32)")
    parser.add_argument("--calibration", type=int, default=512, help="calibration images (paper: 512)")
    parser.add_argument("--calibration_batch", type=int, default=64)
    parser.add_argument("--test_limit", type=int, default=None, help="first N test images (protocol: all)")
    parser.add_argument("--train_limit", type=int, default=None,
                        help="MobileNetV2 float training on the first N images only (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export_limit", type=int, default=0,
                        help="also export each variant: TFLite accuracy on the test images (approximate TFLite "
                             "for split layers) and exact IntegerGraph accuracy on the first N (0: no export)")
    parser.add_argument("--exact_hard_swish", action="store_true",
                        help="export hard-swish layers as exact int8 tables (to_tflite(exact_hard_swish=True))")
    parser.add_argument("--divergence", type=int, default=0,
                        help="with --export_limit: tfq.export.verify.locate_divergence on the first N test "
                             "images (each op's own difference from Keras)")
    parser.add_argument("--no_snap", action="store_true",
                        help="pwlq(snap_for_export=False): biases off the int32 grid, exact hard swish in Keras")
    parser.add_argument("--out", default=os.path.join(RESULTS, "pwlq.json"))
    args = parser.parse_args(argv)
    bits_list = [int(b) for b in args.bits.split(",")]
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {list(VARIANTS)}")

    results = new_results("pwlq", args, argv)

    def float_net(model_name):
        if model_name == "mobilenet_v2":
            return mobilenet_v2_float(args.image_size, args.mobilenet_epochs, seed=args.seed,
                                      limit=args.train_limit)
        return train.float_model("fashion_mnist", model_name, args.float_epochs, seed=args.seed,
                                 cache_dir=CACHE, verbose=0)

    for model_name in args.models.split(","):
        net, ckpt = float_net(model_name)
        x_test, y_test = dataset_arrays(model_name, "test", args.test_limit, args.image_size)
        x_cal, _ = dataset_arrays(model_name, "train", args.calibration, args.image_size)
        float_logits = net.predict(x_test, batch_size=256, verbose=0)
        float_acc = float(np.mean(np.argmax(float_logits, 1) == y_test))
        row = {"model": model_name, "variant": "float", "checkpoint": os.path.basename(ckpt),
               "keras_accuracy": float_acc}
        print(json.dumps(row), flush=True)
        results["variants"].append(row)
        for bits in bits_list:
            for name in names:
                options = VARIANTS[name]
                row = {"model": model_name, "variant": name, "options": options, "weight_bits": bits,
                       "activation_bits": 8, "first_last_bits": 8}
                try:
                    net, _ = float_net(model_name)  # fresh after clear_session (cached checkpoint)
                    start = time.perf_counter()
                    q = pwlq(net, x_cal, weight_bits=bits, activation_bits=8, first_last_bits=8,
                             batch_size=args.calibration_batch, snap_for_export=not args.no_snap, **options)
                    row["ptq_seconds"] = time.perf_counter() - start
                    logits = q.predict(x_test, batch_size=256, verbose=0)
                    acc = float(np.mean(np.argmax(logits, 1) == y_test))
                    row.update(keras_accuracy=acc, delta_vs_float=acc - float_acc,
                               logits_mse=float(np.mean((logits - float_logits) ** 2)),
                               weight_memory_bits=float(costs.weight_memory(q)))
                    if args.export_limit:
                        row.update(export_columns(q, x_test, y_test, args.export_limit, args.exact_hard_swish,
                                                  args.divergence))
                except Exception as err:  # a variant that fails is a result, not a crash
                    row.update(error=describe_error(err))
                save_row(results, row, args.out)
    return results


if __name__ == "__main__":
    main()
