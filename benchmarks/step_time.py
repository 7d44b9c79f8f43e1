"""Training-step time of quantized models relative to their float model, with tfmot as the peer.

    python -m benchmarks.step_time [--models=small_cnn,mobile_swish] [--methods=lsq+] [--bits=4,8]
                                   [--rounds=8] [--steps=10] [--jit] [--ablation] [--tf_ops]

For each model: the float model, every tfq method at every bit-width (W=A) and tfmot's default 8-bit
QAT scheme (``benchmarks.common.tfmot_peer``: the layers tfmot rejects, such as mobile_swish's
squeeze-excite ``Multiply``, get tfmot's 8-bit output quantizer) are compiled once and warmed up, then timed in interleaved rounds (A B C A B C ...), each
round ``steps`` training steps at batch 128 on a fixed random batch, each timed alone, so load from
other processes hits every variant alike (BENCHMARKS.md). Reports per variant the min and median
ms/step over all timed steps and both ratios to the float model. Writes ``benchmarks/results/step_time.json``.

``--ablation`` adds, per method and bit-width, the same quantized model traced with its activation
quantizers (every tfq quantizer that is not a weight quantizer) replaced by the identity, and with
every tfq quantizer replaced by it (tfmot's wrappers alone): the differences attribute the step-time
overhead. Those variants train nothing meaningful; they only time the graph.

``--tf_ops`` adds, per method and bit-width, the same quantized model traced with the activation
functions outside the fused kernels (``tfq.kernels.activations_unfused``) and traced without tfq's
fused kernels (``tfq.kernels``), i.e. with LSQ's forward and backward as TensorFlow ops.
"""
import argparse
import contextlib
import os
import time

import numpy as np

import tfq
import tensorflow as tf
import tf_keras as keras

from benchmarks.common import describe_error, new_results, tfmot_peer, write
from tfq import kernels, models

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def step_timer(model, dataset, jit):
    """Compile ``model``, run 5 warm-up steps, return ``time(steps) -> [ms of each step]``.

    Steps are timed one by one through the model's compiled train function (what ``fit`` runs per
    step), so ``fit``'s per-call set-up (iterator, callbacks) is not spread over the steps."""
    model.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    model.fit(dataset.take(5), verbose=0)
    train_step = model.make_train_function()
    iterator = iter(dataset)

    def time_steps(steps):
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            logs = train_step(iterator)
            for value in logs.values():  # wait for the step's results
                value.numpy()
            times.append(1000 * (time.perf_counter() - start))
        return times

    return time_steps


@contextlib.contextmanager
def quantizers_as_identity(weights_too):
    """While active, tfq quantizers traced into a graph return their input unchanged: activation
    quantizers only, or every quantizer with ``weights_too`` (for the ``--ablation`` variants)."""
    from tfq.quantizers import base
    original = base.TFQQuantizer.__call__

    def call(self, inputs, training, weights, **kwargs):
        if weights_too or not getattr(self, "is_weight", False):
            return tf.identity(inputs)
        return original(self, inputs, training, weights, **kwargs)

    base.TFQQuantizer.__call__ = call
    try:
        yield
    finally:
        base.TFQQuantizer.__call__ = original


def variants(model_name, methods, bits, ablation=False, tf_ops=False, calibration=None):
    """(name, builder, tracing context) triples: float, tfq method x bits, tfmot's default 8-bit QAT;
    the context (a context-manager factory) is active while the variant is traced: the identity
    quantizers of ``--ablation`` or the TensorFlow-op path of ``--tf_ops``. tfq models are
    calibrated on ``calibration`` (a batch of inputs) first, as ``tfq train`` does, so their traced
    steps hold no initialisation branch."""
    out = [("float", lambda: models.get(model_name, seed=0), contextlib.nullcontext)]
    for method in methods:
        for b in bits:
            def build(m=method, b=b):
                quantized = tfq.quantize_model(models.get(model_name, seed=0), m, weight_bits=b, activation_bits=b)
                if calibration is not None:
                    tfq.calibrate(quantized, calibration)
                return quantized
            out.append((f"tfq {method} W{b}A{b}", build, contextlib.nullcontext))
            if tf_ops:
                out.append((f"tfq {method} W{b}A{b} activation functions unfused", build,
                            kernels.activations_unfused))
                out.append((f"tfq {method} W{b}A{b} TF ops (no fused kernels)", build, kernels.turned_off))
            if ablation:
                out.append((f"tfq {method} W{b}A{b} activation quantizers off", build,
                            lambda: quantizers_as_identity(False)))
                out.append((f"tfq {method} W{b}A{b} all quantizers off", build,
                            lambda: quantizers_as_identity(True)))
    out.append(("tfmot default 8-bit", lambda: tfmot_peer(models.get(model_name, seed=0), 8)[0],
                contextlib.nullcontext))
    return out


def measure(model_name, args):
    rng = np.random.default_rng(0)
    x = rng.random((128, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, 128)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    timers, errors = {}, {}
    for name, build, tracing in variants(model_name, args.methods, args.bits, args.ablation, args.tf_ops,
                                            calibration=x):
        try:
            with tracing():
                timers[name] = step_timer(build(), dataset, args.jit)  # traced here, in the warm-up
        except Exception as err:  # a peer that cannot take the model is a result
            errors[name] = describe_error(err)
    times = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, time_steps in timers.items():
            times[name].extend(time_steps(args.steps))
    rows = {}
    for name, values in times.items():
        rows[name] = {"min_ms": min(values), "median_ms": float(np.median(values)),
                      "ratio_min": min(values) / min(times["float"]),
                      "ratio_median": float(np.median(values) / np.median(times["float"])),
                      "ms_per_step": values}
        print(f"{model_name:13s} {name:44s} min {rows[name]['min_ms']:6.0f} ms  median "
              f"{rows[name]['median_ms']:6.0f} ms  ratio to float {rows[name]['ratio_min']:.2f} (min) "
              f"{rows[name]['ratio_median']:.2f} (median)", flush=True)
    return {"model": model_name, "variants": rows, "errors": errors}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,mobile_swish")
    parser.add_argument("--methods", default="lsq+")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    parser.add_argument("--jit", action="store_true", help="compile with XLA (jit_compile=True)")
    parser.add_argument("--ablation", action="store_true",
                        help="also time each quantized model with its activation quantizers (and all quantizers) "
                             "as the identity")
    parser.add_argument("--tf_ops", action="store_true",
                        help="also time each quantized model traced without tfq's fused kernels (TensorFlow ops)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "step_time.json"))
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.bits = [int(b) for b in args.bits.split(",") if b]
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be >= 1")
    results = new_results("step_time", args, argv, load_average_1min_at_start=os.getloadavg()[0])
    results.pop("variants")
    results["models"] = [measure(name, args) for name in args.models]
    results["load_average_1min_at_end"] = os.getloadavg()[0]
    write(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
