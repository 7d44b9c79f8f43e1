"""Command line (absl flags):

    tfq train  --dataset=fashion_mnist --model=mobile_swish --method=lsq+ \\
               --weight_bits=4 --activation_bits=4 --run_dir=runs/demo
    tfq export RUN_DIR --format=tflite|integer [--int4_weights] [--exact_hard_swish] [--approximate_piecewise]
    tfq ptq    RUN_DIR_OR_MODEL --weight_bits=4 [--breakpoint=search --granularity=group ...]
    tfq bench  MODEL.tflite [MODEL2.tflite ...] --target=host|aarch64|android [--threads=1]
    tfq report RUN_DIR [--report_examples=256]
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
COMMANDS = ("train", "export", "ptq", "bench", "report")

# train
flags.DEFINE_string("dataset", "fashion_mnist", "fashion_mnist or digits")
flags.DEFINE_string("model", "mobile_swish", "small_cnn, mobile_swish or mobilenet_v2")
flags.DEFINE_string("method", "lsq+", "quantization method (see tfq.schemes.methods())")
flags.DEFINE_integer("weight_bits", 4, "weight bit-width (2..8)")
flags.DEFINE_integer("activation_bits", 4, "activation bit-width (2..8)")
flags.DEFINE_integer("activation_config", None, "LSQ+ Table 1 configuration 1..4 (lsq+ only)")
flags.DEFINE_bool("narrow_range_weights", False, "lsq/lsq+: symmetric weight codes at every bit-width "
                  "(keeps BatchNorm-folded 4-bit layers INT4 in export --int4_weights)")
flags.DEFINE_string("init", None, "lsq+, lsq or minmax (LSQ methods)")
flags.DEFINE_integer("first_last_bits", 8, "bits of the first and last layers")
flags.DEFINE_integer("float_epochs", 3, "epochs of float training (skipped when cached)")
flags.DEFINE_integer("epochs", 2, "quantized fine-tuning epochs")
flags.DEFINE_integer("batch_size", 128, "batch size")
flags.DEFINE_float("learning_rate", 5e-4, "fine-tuning learning rate (cosine decay)")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_integer("limit", None, "use only the first N training examples (quick runs)")
flags.DEFINE_string("run_dir", "runs/latest", "output directory (train, ptq)")
flags.DEFINE_string("callback_options", None, "train: JSON options of the method's callback, e.g. "
                    "'{\"lambda_\": 0.1}' for adaqat, '{\"alpha\": -0.02}' for ddq")
flags.DEFINE_string("cache_dir", None, "float checkpoint cache (default RUN_DIR/cache)")
flags.DEFINE_integer("bn_reestimate_examples", 1024, "train (= tfq.train.BN_REESTIMATE_EXAMPLES): re-estimate the BatchNorm statistics from this many "
                     "training examples after fine-tuning (tfq.train.reestimate_batch_norm; 0: keep them)")
flags.DEFINE_integer("tie_guard_examples", 256, "train (= tfq.train.TIE_GUARD_EXAMPLES): move biases away from "
                     "rounding ties these training examples hit, after the snaps (tfq.export.guard_ties; 0: off)")
flags.DEFINE_integer("bias_grid_steps", 0, "train: steps of fine-tuning with BatchNorm frozen and biases kept on "
                     "the int32 export grid after the epochs (tfq.train.finetune_on_bias_grid; 0: snap only)")
# export
flags.DEFINE_enum("format", "tflite", ["tflite", "integer"], "export format")
flags.DEFINE_bool("int4_weights", False, "also write a TFLite model storing <= 4-bit weights as INT4")
flags.DEFINE_bool("exact_hard_swish", False, "export: hard-swish layers as exact int8 tables of the trained forward "
                  "(Keras-TFLite parity; larger and slower than TFLite's HARD_SWISH op, which rounds 1-2 of the "
                  "256 codes differently)")
flags.DEFINE_bool("approximate_piecewise", False, "export: re-quantize PWLQ kernels that are a sum of several "
                  "integer parts to plain per-channel int8 in the TFLite file (not exact; the IntegerGraph stays "
                  "exact)")
flags.DEFINE_bool("evaluate", True, "export: evaluate Keras, TFLite and IntegerGraph on the test set")
flags.DEFINE_integer("integer_limit", None, "export: IntegerGraph accuracy on the first N test examples")
# ptq
flags.DEFINE_enum("breakpoint", "search", ["gaussian", "laplacian", "search"], "PWLQ breakpoint rule")
flags.DEFINE_enum("granularity", "channel", ["channel", "group"], "PWLQ pieces per output channel or group")
flags.DEFINE_string("bias_correction", "true", "PWLQ bias correction: true, false, scale or exact")
flags.DEFINE_enum("bits_mean", "piece", ["piece", "comp", "stor"], "what --weight_bits counts (PWLQ)")
flags.DEFINE_enum("ptq_method", "pwlq", ["pwlq", "uniform"], "piecewise or uniform baseline")
flags.DEFINE_integer("calibration_examples", 512, "ptq: training examples used for calibration")
flags.DEFINE_bool("snap_for_export", True, "ptq: biases onto the exported int32 grid and hard swish onto TFLite's "
                  "kernel (tfq.export.snap_biases, snap_hard_swish)")
# bench
flags.DEFINE_enum("target", "host", ["host", "aarch64", "android"], "where to measure latency")
flags.DEFINE_integer("threads", 1, "bench: interpreter threads")
flags.DEFINE_integer("runs", 50, "bench: timed runs")
flags.DEFINE_integer("warmup", 5, "bench: warm-up runs")
flags.DEFINE_bool("xnnpack", True, "bench: use the XNNPACK delegate")
flags.DEFINE_string("serial", None, "bench android: adb device serial")
flags.DEFINE_string("benchmark_binary", None, "bench android: TFLite benchmark_model binary "
                    "(or $TFQ_BENCHMARK_MODEL)")
flags.DEFINE_string("cpu_mask", None, "bench android: taskset CPU mask, e.g. f0")
flags.DEFINE_bool("emulate", False, "bench aarch64 on x86: check outputs under qemu-user (no timings)")
flags.DEFINE_string("json", None, "bench: also write the results as JSON here")
# report
flags.DEFINE_integer("report_examples", 256, "report: test examples for activation histograms and MSE (0: none)")


def _train(args):
    from tfq import train
    _no_args("train", args)
    options = {}
    if FLAGS.activation_config is not None:
        options["activation_config"] = FLAGS.activation_config
    if FLAGS.init is not None:
        options["init"] = FLAGS.init
    if FLAGS.narrow_range_weights:
        options["narrow_range_weights"] = True
    if FLAGS.callback_options:
        try:
            options["callback_options"] = json.loads(FLAGS.callback_options)
        except json.JSONDecodeError as err:
            raise app.UsageError(f"--callback_options must be a JSON object: {err}")
        if not isinstance(options["callback_options"], dict):
            raise app.UsageError("--callback_options must be a JSON object, e.g. '{\"lambda_\": 0.1}'")
    metrics = train.run(FLAGS.run_dir, dataset=FLAGS.dataset, model=FLAGS.model, method=FLAGS.method,
                        weight_bits=FLAGS.weight_bits, activation_bits=FLAGS.activation_bits,
                        first_last_bits=FLAGS.first_last_bits, float_epochs=FLAGS.float_epochs,
                        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
                        seed=FLAGS.seed, limit=FLAGS.limit, cache_dir=FLAGS.cache_dir,
                        bias_grid_steps=FLAGS.bias_grid_steps,
                        bn_reestimate_examples=FLAGS.bn_reestimate_examples,
                        tie_guard_examples=FLAGS.tie_guard_examples, **options)
    print(f"\n{FLAGS.model} on {FLAGS.dataset}: float accuracy {metrics['float_accuracy']:.4f}, "
          f"{FLAGS.method} W{FLAGS.weight_bits}A{FLAGS.activation_bits} accuracy "
          f"{metrics['quantized_accuracy']:.4f}; run directory {FLAGS.run_dir} "
          f"({metrics['total_seconds']:.0f} s)")


def _export(args):
    from tfq.export import runs
    run_dir = _one_path("export", args, "RUN_DIR")
    runs.export_run(run_dir, FLAGS.format, FLAGS.int4_weights, evaluate=FLAGS.evaluate,
                    integer_limit=FLAGS.integer_limit, exact_hard_swish=FLAGS.exact_hard_swish,
                    approximate_piecewise=FLAGS.approximate_piecewise)


def _ptq(args):
    import time

    import tfq
    from tfq import data
    from tfq.export import runs
    from tfq.train import evaluate
    source = _one_path("ptq", args, "RUN_DIR_OR_MODEL")
    float_model = runs.load_run_model(source, "float.h5")
    dataset = runs.run_metrics(source).get("dataset", FLAGS.dataset) if os.path.isdir(source) else FLAGS.dataset
    x, _ = data.load_numpy(dataset, "train", limit=FLAGS.calibration_examples)
    correction = {"true": True, "false": False}.get(FLAGS.bias_correction.lower(), FLAGS.bias_correction)
    # PWLQ keeps activations at 8 bits (pwlq.txt) unless --activation_bits is given explicitly
    activation_bits = FLAGS.activation_bits if FLAGS["activation_bits"].present else 8
    start = time.perf_counter()
    q = tfq.ptq.pwlq(float_model, x, weight_bits=FLAGS.weight_bits, activation_bits=activation_bits,
                     breakpoint=FLAGS.breakpoint, granularity=FLAGS.granularity, bias_correction=correction,
                     bits_mean=FLAGS.bits_mean, method=FLAGS.ptq_method, first_last_bits=FLAGS.first_last_bits,
                     snap_for_export=FLAGS.snap_for_export)
    seconds = time.perf_counter() - start
    os.makedirs(FLAGS.run_dir, exist_ok=True)
    q.save(os.path.join(FLAGS.run_dir, "quantized.h5"))
    float_model.save(os.path.join(FLAGS.run_dir, "float.h5"))
    metrics = {"dataset": dataset, "method": FLAGS.ptq_method, "source": source, "weight_bits": FLAGS.weight_bits,
               "activation_bits": activation_bits, "breakpoint": FLAGS.breakpoint,
               "granularity": FLAGS.granularity, "bias_correction": FLAGS.bias_correction,
               "bits_mean": FLAGS.bits_mean, "snap_for_export": FLAGS.snap_for_export, "ptq_seconds": seconds,
               "float_accuracy": evaluate(float_model, dataset), "quantized_accuracy": evaluate(q, dataset)}
    with open(os.path.join(FLAGS.run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"{FLAGS.ptq_method} W{FLAGS.weight_bits}A{activation_bits} on {dataset}: float "
          f"{metrics['float_accuracy']:.4f}, quantized {metrics['quantized_accuracy']:.4f} "
          f"({seconds:.1f} s); wrote {FLAGS.run_dir}")


def _bench(args):
    from tfq.export import bench
    if not args:
        raise app.UsageError("usage: tfq bench MODEL.tflite [MODEL2.tflite ...] --target=host|aarch64|android")
    print(bench.run_cli(args, FLAGS.target, FLAGS.threads, FLAGS.runs, FLAGS.warmup, FLAGS.xnnpack,
                        serial=FLAGS.serial, benchmark_binary=FLAGS.benchmark_binary, cpu_mask=FLAGS.cpu_mask,
                        emulate=FLAGS.emulate, json_path=FLAGS.json))


def _report(args):
    from tfq import report
    run_dir = _one_path("report", args, "RUN_DIR")
    report.write_report(run_dir, examples=FLAGS.report_examples)


def _no_args(command, args):
    if args:
        raise app.UsageError(f"tfq {command} takes only flags, got {args}")


def _one_path(command, args, what):
    if len(args) != 1:
        raise app.UsageError(f"usage: tfq {command} {what} [--flags]")
    return args[0]


def _user_errors():
    """Errors that describe the user's model or files (each names the layer or argument): the CLI
    prints their message instead of a traceback."""
    from tfq.export.integer import IntegerGraphError
    from tfq.export.tflite import ExportError
    return ExportError, IntegerGraphError


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: tfq COMMAND [--flags]; COMMAND is one of {', '.join(COMMANDS)}")
    command = {"train": _train, "export": _export, "ptq": _ptq, "bench": _bench, "report": _report}[argv[1]]
    try:
        command(argv[2:])
    except _user_errors() as err:
        print(f"tfq {argv[1]}: error: {err}", file=sys.stderr)
        sys.exit(1)


def run():
    import tfq  # noqa: F401  (selects Keras 2 before TensorFlow loads)
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
