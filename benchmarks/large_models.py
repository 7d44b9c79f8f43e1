"""Large models (issue 9): time and peak memory of quantize, one training step and TFLite export.

For each model and method, a fresh subprocess builds the float keras.applications model
(weights=None, input 224x224x3, classes=10), then times up to four steps, resetting the process's peak
resident set (VmHWM, via ``/proc/self/clear_refs``) before each so each step's peak is its own:

* ``quantize``: ``tfq.quantize_model`` (PWLQ: ``tfq.ptq.pwlq`` at 4 bits with
  ``integer_tail_ratio=True``, so each layer exports as one int8 convolution, calibrated on
  ``--calibration`` random batches of 2 images);
* ``calibrate``: ``tfq.calibrate`` on that batch (eager; methods whose quantizers initialise
  from data: LSQ+, N2UQ, DDQ), as ``tfq.train.finetune`` does before its first step, so the
  traced step leaves the initialisation branches out (rows before this step existed traced them);
* ``train_step``: compile + one ``fit`` step on a random batch of ``--batch`` images (first step:
  tracing included) and a second step (``train_step2_seconds``: the steady-state cost); DDQ with
  its ``DDQGateSchedule`` and memory-constrained loss, AdaQAT with its callback (probes). PWLQ is
  post-training: no step;
* ``export``: ``tfq.export.to_tflite`` (after the training step, so every quantizer has seen data).

The peers ``tfmot-int8`` (``tfmot.quantization.keras.quantize_model``, then the converter's int8
export) and ``float`` (the float model, then a plain float conversion) go through the same steps, so
the export's peak can be set against the converter's own.

A failing step records its error text in the row and the later steps are skipped.
Linear scaling: besides ResNet50 and EfficientNetB0, truncated variants (ResNet50 cut after
stages 2, 3, 4; EfficientNetB0 cut after blocks 3 and 5, each with a pooling + Dense head) give a
range of layer counts, and MobileNetV2 at alpha 0.35 and 1.4 (same layers, 9x the parameters)
separates the cost of parameters; the report prints seconds per layer for each step.

    python -m benchmarks.large_models --models=resnet50_s2 --methods=lsq+        # a quick subset
    python -m benchmarks.large_models                                             # everything
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import command_line

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
METHODS = ("lsq+", "n2uq", "ddq", "adaqat", "pwlq", "tfmot-int8", "float")
#: peers, for the memory and time of the same steps outside tfq: tfmot's default 8-bit QAT exported by
#: the TFLite converter (int8 in and out), and the float model converted as it is
PEERS = ("tfmot-int8", "float")
#: name -> (application, layer to cut after or None for the whole model)
MODELS = {
    "resnet50_s2": ("ResNet50", "conv2_block3_out"),
    "resnet50_s3": ("ResNet50", "conv3_block4_out"),
    "resnet50_s4": ("ResNet50", "conv4_block6_out"),
    "resnet50": ("ResNet50", None),
    "efficientnetb0_b3": ("EfficientNetB0", "block3b_add"),
    "efficientnetb0_b5": ("EfficientNetB0", "block5c_add"),
    "efficientnetb0": ("EfficientNetB0", None),
    # same layers, 0.35x / 1.4x width: separates the cost of parameters from that of layers
    "mobilenetv2_a035": ("MobileNetV2", None, {"alpha": 0.35}),
    "mobilenetv2_a140": ("MobileNetV2", None, {"alpha": 1.4}),
}
INPUT_SHAPE = (224, 224, 3)
CLASSES = 10
STEPS = ("quantize", "calibrate", "train_step", "export")


# --- child process: one model, one method -------------------------------------------------------
def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def float_model(name):
    import tf_keras as keras
    application, cut, *options = MODELS[name]
    net = getattr(keras.applications, application)(weights=None, input_shape=INPUT_SHAPE, classes=CLASSES,
                                                   **(options[0] if options else {}))
    if cut is None:
        return net
    x = keras.layers.GlobalAveragePooling2D(name="cut_pool")(net.get_layer(cut).output)
    return keras.Model(net.input, keras.layers.Dense(CLASSES, name="cut_head")(x), name=f"{name}")


def random_images(rng, count):
    """Random images in [0, 255], the range keras.applications models take before their own
    preprocessing (EfficientNetB0 divides by 255 itself: [0, 1] inputs left its activations so small
    that PACT at its initial alpha rounded them all to 0)."""
    import numpy as np
    return (255.0 * rng.random((count,) + INPUT_SHAPE)).astype(np.float32)


def measure(step, row, fn):
    """Runs ``fn`` and records its seconds and peak RSS (MB) under ``step``; returns its result."""
    from tfq.export.bench import reset_peak_rss
    reset_ok = reset_peak_rss()
    rss_before = _status_kb("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    row[f"{step}_seconds"] = time.perf_counter() - start
    row[f"{step}_cpu_seconds"] = time.process_time() - cpu_start  # every thread; less load-dependent
    row[f"{step}_peak_rss_mb"] = _status_kb("VmHWM") / 1024.0
    row[f"{step}_rss_before_mb"] = rss_before / 1024.0
    row["peak_reset"] = reset_ok
    return result


def child(model_name, method, batch, calibration):
    import numpy as np

    import tfq
    import tf_keras as keras
    from benchmarks.common import describe_error
    from tfq import costs
    from tfq.api import is_calibrated

    rng = np.random.default_rng(0)
    net = float_model(model_name)
    row = {"model": model_name, "method": method, "layers": len(net.layers),
           "weighted_layers": sum(1 for layer in net.layers if getattr(layer, "kernel", None) is not None
                                  or hasattr(layer, "depthwise_kernel")),
           "params": int(net.count_params()), "batch": batch}
    step = "quantize"
    try:
        if method == "pwlq":
            images = random_images(rng, 2 * calibration)
            q = measure(step, row, lambda: tfq.ptq.pwlq(net, images, weight_bits=4, batch_size=2,
                                                         integer_tail_ratio=True))  # one int8 conv per layer
        elif method == "tfmot-int8":
            import tensorflow_model_optimization as tfmot
            q = measure(step, row, lambda: tfmot.quantization.keras.quantize_model(net))
        elif method == "float":
            q = net
        else:
            bits = {"lsq+": {"weight_bits": 4, "activation_bits": 4}, "n2uq": {"weight_bits": 2, "activation_bits": 2},
                    "ddq": {"target_bits": 4}, "adaqat": {"weight_bits": 4, "activation_bits": 4}}[method]
            q = measure(step, row, lambda: tfq.quantize_model(net, method=method, **bits))
        row["quantized_layers"] = len(q.layers)
        if method not in PEERS:
            row["weight_quantizers"] = len(costs.layer_costs(q))
        if method != "pwlq":
            x = random_images(rng, batch)
            y = rng.integers(0, CLASSES, batch)
            if method not in PEERS and not is_calibrated(q):
                step = "calibrate"  # eager, as tfq.train.finetune does, so the traced step is smaller
                measure(step, row, lambda: tfq.calibrate(q, x))
            step = "train_step"
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
            callbacks = []
            if method == "ddq":
                schedule = tfq.callbacks.DDQGateSchedule(target_bits=4, ramp=0)
                loss = schedule.constrained_loss(q, loss)
                callbacks = [schedule]
            elif method == "adaqat":
                callbacks = [tfq.callbacks.AdaQAT(lambda_=0.1)]

            def first():
                q.compile(keras.optimizers.SGD(1e-3), loss=loss)
                q.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)

            measure(step, row, first)
            start, cpu_start = time.perf_counter(), time.process_time()
            q.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)
            row["train_step2_seconds"] = time.perf_counter() - start
            row["train_step2_cpu_seconds"] = time.process_time() - cpu_start
        step = "export"
        flatbuffer = measure(step, row, lambda: tfq.export.to_tflite(q) if method not in PEERS
                             else peer_convert(q, method))
        row["tflite_bytes"] = len(flatbuffer)
    except Exception as err:  # a failing step is a result
        describe_error(err)  # prints the traceback
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        row[f"{step}_error"] = f"{type(err).__name__}: {(lines[-1] if lines else '')[:300]}"
    row["process_peak_rss_mb"] = _status_kb("VmHWM") / 1024.0
    print("ROW " + json.dumps(row), flush=True)


def peer_convert(model, method):
    """The TFLite converter on a peer: int8 in and out for tfmot's QAT model, float as it is."""
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if method == "tfmot-int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


# --- parent: one subprocess per (model, method) ---------------------------------------------------
def run_child(model_name, method, args):
    command = [sys.executable, "-m", "benchmarks.large_models", "--child", "--models", model_name,
               "--methods", method, "--batch", str(args.batch), "--calibration", str(args.calibration)]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": model_name, "method": method, "error": f"timeout after {args.timeout} s"}
    rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if not rows:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        return {"model": model_name, "method": method,
                "error": f"child exited with {done.returncode}: {' | '.join(tail)[:500]}"}
    row = json.loads(rows[-1])
    row["wall_seconds"] = time.perf_counter() - start
    return row


def scaling(rows, clock="seconds"):
    """Per step and family: (layers, seconds, seconds per layer) sorted by layer count, and the
    ratio of the largest to the smallest seconds-per-layer (about 1 or below: at most linear).
    ``clock``: "seconds" (wall) or "cpu_seconds" (process CPU time, less sensitive to other load)."""
    out = {}
    for step in STEPS:
        for family in ("resnet50", "efficientnetb0", "mobilenetv2"):
            for method in METHODS:
                points = sorted((r["layers"], r[f"{step}_{clock}"]) for r in rows
                                if r.get("method") == method and r.get("model", "").startswith(family)
                                and f"{step}_{clock}" in r)
                if len(points) < 2:
                    continue
                per_layer = [s / n for n, s in points]
                out[f"{step}/{family}/{method}"] = {
                    "layers": [n for n, _ in points], "seconds": [round(s, 3) for _, s in points],
                    "seconds_per_layer": [round(p, 5) for p in per_layer],
                    "largest_over_smallest_per_layer": round(per_layer[-1] / per_layer[0], 3)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    parser.add_argument("--batch", type=int, default=4, help="images per training step")
    parser.add_argument("--calibration", type=int, default=2, help="PWLQ calibration batches (2 images each)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per (model, method) subprocess")
    parser.add_argument("--out", default=os.path.join(RESULTS, "large_models.json"))
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --out (e.g. to add methods to an earlier run), except "
                             "those of the (model, method) pairs this run measures again, which it replaces")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    methods = args.methods.split(",")
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"--models: unknown {name!r}; choose from {sorted(MODELS)}")
    for name in methods:
        if name not in METHODS:
            raise SystemExit(f"--methods: unknown {name!r}; choose from {METHODS}")
    if args.batch < 1 or args.calibration < 1:
        raise SystemExit("--batch and --calibration must be >= 1")
    if args.child:
        return child(models[0], methods[0], args.batch, args.calibration)

    import tfq  # noqa: F401  (Keras 2 before TensorFlow)
    from benchmarks.common import save_row, write
    from tfq import train
    results = {"benchmark": "large_models",
               "command": command_line("large_models", argv),
               "protocol": {**{k: v for k, v in vars(args).items() if k not in ("child", "append")},
                            "input_shape": list(INPUT_SHAPE), "classes": CLASSES, "weights": None,
                            "memory": "VmHWM of a fresh process per (model, method), reset before each step"},
               "machine": train.machine_info(), "variants": []}
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        results["variants"] = earlier["variants"]
        results["command"] = earlier["command"] + " ; " + results["command"]
    for model_name in models:
        for method in methods:
            results["variants"] = [v for v in results["variants"]
                                   if (v.get("model"), v.get("method")) != (model_name, method)]
            row = run_child(model_name, method, args)
            row.setdefault("cpu", results["machine"]["cpu"])  # --append keeps rows measured elsewhere
            save_row(results, row, args.out)
    results["scaling"] = scaling(results["variants"])
    results["scaling_cpu"] = scaling(results["variants"], "cpu_seconds")
    write(results, args.out)
    print(json.dumps(results["scaling_cpu"] or results["scaling"], indent=1))
    return results


if __name__ == "__main__":
    main()
