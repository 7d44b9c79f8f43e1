"""Helpers every benchmark script shares: recording a variant's row and its failure."""
from __future__ import annotations

import json
import os
import sys
import traceback


def command_line(name, argv=None):
    """The command that reproduces a run of ``benchmarks.<name>`` (``argv``: its arguments, default
    the process's own)."""
    return f"python -m benchmarks.{name} " + " ".join(sys.argv[1:] if argv is None else argv)


def new_results(name, args, argv=None, **extra):
    """The JSON every benchmark writes: its name, command, protocol (``vars(args)``), the machine,
    ``extra`` fields, and the ``variants`` rows ``save_row`` appends."""
    from tfq import train
    return {"benchmark": name, "command": command_line(name, argv), "protocol": vars(args),
            "machine": train.machine_info(), **extra, "variants": []}


def finished_rows(results, out, key, defaults=None):
    """For ``--resume``: the rows without an error of an earlier run written at ``out``, as
    ``{key(row): row}``, or ``{}`` if ``out`` does not exist. The earlier run must have the same
    protocol (``--resume`` aside) and CPU as ``results``, so its timings and ratios stay comparable;
    otherwise SystemExit names what differs. An argument the earlier run did not have yet counts as
    equal when it is at its value in ``defaults``. Top-level entries the earlier run added (a plot's
    data) are carried into ``results``."""
    if not os.path.exists(out):
        return {}
    with open(out) as f:
        earlier = json.load(f)
    protocol = {k: v for k, v in results["protocol"].items() if k != "resume"}
    before = {k: v for k, v in earlier.get("protocol", {}).items() if k != "resume"}
    for name, value in (defaults or {}).items():
        if name not in before and protocol.get(name) == value:
            before[name] = value
    differing = sorted(k for k in set(protocol) | set(before) if protocol.get(k) != before.get(k))
    if differing:
        raise SystemExit(f"--resume: {out} was written with other arguments ({', '.join(differing)}: "
                         f"{[before.get(k) for k in differing]}, now {[protocol.get(k) for k in differing]})")
    if earlier["machine"]["cpu"] != results["machine"]["cpu"]:
        raise SystemExit(f"--resume: {out} was measured on {earlier['machine']['cpu']!r}, this is "
                         f"{results['machine']['cpu']!r}; its epoch times would not be comparable")
    fused_before, fused_now = earlier["machine"].get("fused_kernels", False), results["machine"]["fused_kernels"]
    if fused_before != fused_now:
        raise SystemExit(f"--resume: {out} was measured {'with' if fused_before else 'without'} tfq's fused "
                         f"kernels, this run is {'with' if fused_now else 'without'} them (tfq.kernels); its "
                         "epoch times would not be comparable: write to a new --out")
    for key_, value in earlier.items():  # what the earlier run added (plots, histograms)
        results.setdefault(key_, value)
    results["resumed_from"] = earlier.get("resumed_from", []) + [
        {"date": earlier["machine"].get("date"), "command": earlier["command"]}]
    return {key(row): row for row in earlier["variants"] if "error" not in row}


def keep_finished(results, finished, key, out):
    """The row ``finished_rows`` kept for ``key``, appended to ``results``; None if there is none."""
    row = finished.get(key)
    if row is not None:
        print(f"kept from {out}: {key}", flush=True)
        results["variants"].append(row)
    return row


def describe_error(err):
    """One line for a variant that failed (a failing variant is a result, not a crash)."""
    traceback.print_exc(limit=3)
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"


def save_row(results, row, out, hide=()):
    """Print ``row`` (without the bulky ``hide`` keys), append it to ``results`` and rewrite the
    JSON at ``out`` so a long run leaves its finished rows on disk; frees the Keras session."""
    import tf_keras as keras
    print(json.dumps({k: v for k, v in row.items() if k not in hide}), flush=True)
    results["variants"].append(row)
    keras.backend.clear_session()
    write(results, out)


def write(results, out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


def save_figure(fig, path):
    """Write a matplotlib figure as a PNG (creating its folder) and close it; returns ``path``."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def median_epoch(seconds):
    """Median epoch time over epochs 2..E (the first includes tracing); the only one if E = 1."""
    import statistics
    later = seconds[1:] or seconds
    return statistics.median(later)


def finetune_and_evaluate(model, args):
    """The shared fine-tuning budget (``args.epochs``, ``learning_rate``, ``seed``, ``limit``) on
    Fashion-MNIST, then test accuracy; returns the row fields every benchmark records. With
    ``args.bn_images`` > 0 also the accuracy after ``tfq.train.reestimate_batch_norm`` on that many
    training images (the model keeps the re-estimated statistics)."""
    import time

    from tfq import train
    start = time.perf_counter()
    seconds = train.finetune(model, "fashion_mnist", args.epochs, learning_rate=args.learning_rate,
                             seed=args.seed, limit=args.limit, verbose=0)
    row = {"epoch_seconds": seconds, "median_epoch_seconds": median_epoch(seconds),
           "keras_accuracy": train.evaluate(model, "fashion_mnist"), "total_seconds": time.perf_counter() - start}
    if getattr(args, "bn_images", 0):  # diagnostic: BatchNorm statistics re-estimated after fine-tuning
        from tfq import data
        train.reestimate_batch_norm(model, data.load_numpy("fashion_mnist", limit=args.bn_images)[0])
        row["keras_accuracy_bn_reestimated"] = train.evaluate(model, "fashion_mnist")
    return row


def export_accuracy(model, test_limit=None):
    """Snap the biases onto the int32 grid, export to TFLite and return the row fields: Keras accuracy
    after the snap (what the integer model computes), TFLite (XNNPACK) accuracy and the int8 size."""
    from tfq import data, train
    from tfq.export import runs, tflite
    snap = train.snap_biases_for_export(model)
    int8 = tflite.to_tflite(model)
    x, y = data.load_numpy("fashion_mnist", "test", limit=test_limit)
    return {"bias_snap": snap, "keras_accuracy_after_bias_snap": train.evaluate(model, "fashion_mnist", limit=test_limit),
            "tflite_accuracy": runs.tflite_accuracy(int8, x, y), "int8_bytes": len(int8)}


# Activations tfmot's registries accept on an ``Activation`` layer (default_8bit_quantize_registry).
TFMOT_ACTIVATIONS = ("relu", "relu6", "swish", "gelu", "linear", "softmax", "sigmoid", "tanh")


def tfmot_peer(net, bits, n_bit=None):
    """tfmot's default 8-bit scheme or its experimental n-bit scheme on ``net``: the n-bit one when
    ``n_bit`` is true, or when it is None and ``bits`` is not 8.

    tfmot rejects ``Multiply`` and ``Activation`` layers with a custom function (mobile_swish's
    squeeze-excite scale and hard-swish). Those are annotated with tfq's ``LayerQuantizeConfig``
    holding only an output quantizer, tfmot's own ``MovingAverageQuantizer`` at ``bits``: what tfmot
    does for the activations it supports, so the peer runs on the whole network. Returns the model
    and the names of the layers annotated this way (recorded in the benchmark row).
    """
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras
    from tfq.configs import LayerQuantizeConfig
    qk = tfmot.quantization.keras

    annotated = []

    def annotate(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        rejected = isinstance(layer, keras.layers.Multiply) or (
            isinstance(layer, keras.layers.Activation)
            and getattr(layer.activation, "__name__", None) not in TFMOT_ACTIVATIONS)
        if rejected:
            annotated.append(layer.name)
            output = qk.quantizers.MovingAverageQuantizer(num_bits=bits, per_axis=False, symmetric=False,
                                                          narrow_range=False)
            return qk.quantize_annotate_layer(fresh, LayerQuantizeConfig(output_quantizer=output))
        return qk.quantize_annotate_layer(fresh)

    marked = keras.models.clone_model(net, clone_function=annotate)
    marked.set_weights(net.get_weights())
    if n_bit is None:
        n_bit = bits != 8
    if not n_bit and bits != 8:
        raise ValueError(f"tfmot_peer: tfmot's default scheme is 8-bit; bits={bits} needs n_bit=True")
    scheme = (qk.experimental.default_n_bit.DefaultNBitQuantizeScheme(num_bits_weight=bits, num_bits_activation=bits)
              if n_bit else qk.default_8bit.Default8BitQuantizeScheme())
    with qk.quantize_scope():
        return qk.quantize_apply(marked, scheme), annotated
