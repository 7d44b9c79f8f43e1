"""Export benchmark (issue 3), following shared/BENCHMARKS.md.

For each model and bit-width: the cached float checkpoint, LSQ+ (config 4) fine-tuned with the
shared budget, its biases snapped for export with the tie guard on ``--tie_guard_examples`` training
images (``tfq.train.snap_biases_for_export``, as ``tfq train`` does), then exported with
``tfq.export``: Keras, TFLite (XNNPACK) and IntegerGraph test accuracy on the full Fashion-MNIST
test set, parity in output steps, file sizes fp32 / int8 / int4-weights with the largest fp32/int8
ratio any per-channel int8 file of the network could reach (``benchmarks.latency.size_ceiling``),
and whether tfmot's own n-bit scheme exports the same bit-width.

    python -m benchmarks.export --models=small_cnn,mobile_swish --bits=8,4,2    # or make bench ONLY=export

``--bias_grid_steps=N`` adds ``tfq.train.finetune_on_bias_grid`` (N steps, BatchNorm frozen, biases
kept on the int32 grid) between the snap and the export, recording the snapped accuracy without and
with it; ``--bias_grid_control=1`` also records N steps of ordinary fine-tuning from the same weights
followed by the snap (the same extra training without the grid).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import tfq  # noqa: F401  (Keras 2 before TensorFlow)
import tensorflow as tf

from benchmarks.common import new_results, tfmot_peer
from benchmarks.latency import size_breakdown, size_ceiling
from benchmarks.lsq import CACHE, RESULTS
from tfq import data, train
from tfq.export import runs, tflite, verify
from tfq.export.integer import IntegerGraph


def tfmot_exports(net, bits):
    """Whether tfmot's experimental n-bit scheme converts to an integer-only TFLite at ``bits`` (the
    layers tfmot rejects get its output quantizer, ``benchmarks.common.tfmot_peer``)."""
    try:
        q, _ = tfmot_peer(net, bits, n_bit=True)
        converter = tf.lite.TFLiteConverter.from_keras_model(q)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = converter.inference_output_type = tf.int8
        flat = converter.convert()
        tflite.check_integer_only(flat, f"tfmot n-bit W{bits}A{bits}")
        return "yes"
    except Exception as err:  # record why, not just that it failed
        return f"no: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def bias_grid_phase(q, args, row):
    """``finetune_on_bias_grid`` on ``q`` (snapped), recording accuracies; with
    ``--bias_grid_control`` first the same number of ordinary steps from the same weights."""
    row["keras_accuracy_snap_without_bias_grid"] = row["keras_accuracy"]
    if args.bias_grid_control:
        start = q.get_weights()
        train.compile_model(q, args.bias_grid_lr, steps=args.bias_grid_steps)
        q.fit(data.load("fashion_mnist", limit=args.limit).repeat(), epochs=1, steps_per_epoch=args.bias_grid_steps,
              verbose=0)
        row["control_accuracy_before_snap"] = train.evaluate(q, "fashion_mnist")
        row["control_bias_snap"] = train.snap_biases_for_export(q)
        row["control_accuracy_after_snap"] = train.evaluate(q, "fashion_mnist")
        q.set_weights(start)
    row["bias_grid"] = train.finetune_on_bias_grid(q, "fashion_mnist", args.bias_grid_steps,
                                                   learning_rate=args.bias_grid_lr, limit=args.limit,
                                                   bias_update=args.bias_grid_update)
    row["keras_accuracy"] = row["keras_accuracy_with_bias_grid"] = train.evaluate(q, "fashion_mnist")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,mobile_swish")
    parser.add_argument("--bits", default="8,4,2")
    parser.add_argument("--config", type=int, default=4)
    parser.add_argument("--float_epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="fine-tuning examples (protocol: all)")
    parser.add_argument("--narrow_range_weights", type=int, default=1,
                        help="1: symmetric weight codes at every bit-width (keeps folded layers INT4)")
    parser.add_argument("--tie_guard_examples", type=int, default=train.TIE_GUARD_EXAMPLES,
                        help="training images for tfq.export.guard_ties after the bias snap, as tfq train "
                             "does (0: no guard)")
    parser.add_argument("--bias_grid_steps", type=int, default=0, help="steps of finetune_on_bias_grid (0: none)")
    parser.add_argument("--bias_grid_lr", type=float, default=1e-4, help="its learning rate (cosine decay)")
    parser.add_argument("--bias_grid_update", default="straight_through",
                        help="straight_through, projected or frozen (tfq.callbacks.bias_grid)")
    parser.add_argument("--bias_grid_control", type=int, default=0,
                        help="1: also N steps of ordinary fine-tuning then the snap, from the same weights")
    parser.add_argument("--out", default=os.path.join(RESULTS, "export.json"))
    args = parser.parse_args(argv)
    x_test, y_test = data.load_numpy("fashion_mnist", "test")
    guard_images = (data.load_numpy("fashion_mnist", "train", limit=args.tie_guard_examples)[0]
                    if args.tie_guard_examples else None)
    results = new_results("export", args, argv)
    work = os.path.join(CACHE, "export")
    os.makedirs(work, exist_ok=True)
    for model_name in args.models.split(","):
        net, _ = train.float_model("fashion_mnist", model_name, args.float_epochs, cache_dir=CACHE, verbose=0)
        fp32_bytes = runs.float_tflite(net, os.path.join(work, f"{model_name}_fp32.tflite"))
        for bits in [int(b) for b in args.bits.split(",")]:
            net, _ = train.float_model("fashion_mnist", model_name, args.float_epochs, cache_dir=CACHE, verbose=0)
            row = {"model": model_name, "weight_bits": bits, "activation_bits": bits,
                   "activation_config": args.config, "narrow_range_weights": bool(args.narrow_range_weights)}
            try:
                q = tfq.quantize_model(net, "lsq+", weight_bits=bits, activation_bits=bits,
                                       activation_config=args.config,
                                       narrow_range_weights=bool(args.narrow_range_weights))
                train.finetune(q, "fashion_mnist", args.epochs, limit=args.limit, verbose=0)
                row["keras_accuracy_before_bias_snap"] = train.evaluate(q, "fashion_mnist")
                row["bias_snap"] = train.snap_biases_for_export(q, tie_guard_images=guard_images)
                row["keras_accuracy"] = train.evaluate(q, "fashion_mnist")
                if args.bias_grid_steps:
                    bias_grid_phase(q, args, row)
                start = time.perf_counter()
                int8 = tflite.to_tflite(q)
                row["export_seconds"] = time.perf_counter() - start
                row["int8_bytes"] = len(int8)
                row["size_ceiling"] = size_ceiling(fp32_bytes, size_breakdown(int8))
                if bits <= 4:
                    row["int4_weights_bytes"] = len(tflite.to_tflite(q, int4_weights=True))
                row["fp32_bytes"] = fp32_bytes
                row["tflite_accuracy"] = runs.tflite_accuracy(int8, x_test, y_test)
                graph = IntegerGraph.from_tflite(int8)
                row["integer_graph_accuracy"] = runs.integer_graph_accuracy(graph, int8, x_test, y_test)
                report = verify.verify(q, int8, x_test[:2000], graph=graph)
                row["parity"] = {k: report[k] for k in ("xnnpack", "reference", "integer_graph_vs_reference",
                                                        "xnnpack_partitions", "ops_outside_xnnpack")}
                row["tfmot_nbit_exports"] = tfmot_exports(net, bits)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            print(json.dumps({k: v for k, v in row.items() if k != "parity"}), flush=True)
            results["variants"].append(row)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
