"""Command line: ``tfq train ...`` (absl flags). Later commands (ptq, export, bench, report)
register here as their issues land.

    tfq train --dataset=fashion_mnist --model=mobile_swish --method=lsq+ \\
              --weight_bits=4 --activation_bits=4 --run_dir=runs/demo
"""
from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
COMMANDS = ("train",)

flags.DEFINE_string("dataset", "fashion_mnist", "fashion_mnist or digits")
flags.DEFINE_string("model", "mobile_swish", "small_cnn, mobile_swish or mobilenet_v2")
flags.DEFINE_string("method", "lsq+", "quantization method (see tfq.schemes.methods())")
flags.DEFINE_integer("weight_bits", 4, "weight bit-width (2..8)")
flags.DEFINE_integer("activation_bits", 4, "activation bit-width (2..8)")
flags.DEFINE_integer("activation_config", None, "LSQ+ Table 1 configuration 1..4 (lsq+ only)")
flags.DEFINE_string("init", None, "lsq+, lsq or minmax (LSQ methods)")
flags.DEFINE_integer("first_last_bits", 8, "bits of the first and last layers")
flags.DEFINE_integer("float_epochs", 3, "epochs of float training (skipped when cached)")
flags.DEFINE_integer("epochs", 2, "quantized fine-tuning epochs")
flags.DEFINE_integer("batch_size", 128, "batch size")
flags.DEFINE_float("learning_rate", 5e-4, "fine-tuning learning rate (cosine decay)")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_integer("limit", None, "use only the first N training examples (quick runs)")
flags.DEFINE_string("run_dir", "runs/latest", "output directory")
flags.DEFINE_string("cache_dir", None, "float checkpoint cache (default RUN_DIR/cache)")


def _train():
    from tfq import train
    options = {}
    if FLAGS.activation_config is not None:
        options["activation_config"] = FLAGS.activation_config
    if FLAGS.init is not None:
        options["init"] = FLAGS.init
    metrics = train.run(FLAGS.run_dir, dataset=FLAGS.dataset, model=FLAGS.model, method=FLAGS.method,
                        weight_bits=FLAGS.weight_bits, activation_bits=FLAGS.activation_bits,
                        first_last_bits=FLAGS.first_last_bits, float_epochs=FLAGS.float_epochs,
                        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
                        seed=FLAGS.seed, limit=FLAGS.limit, cache_dir=FLAGS.cache_dir, **options)
    print(f"\n{FLAGS.model} on {FLAGS.dataset}: float accuracy {metrics['float_accuracy']:.4f}, "
          f"{FLAGS.method} W{FLAGS.weight_bits}A{FLAGS.activation_bits} accuracy "
          f"{metrics['quantized_accuracy']:.4f}; run directory {FLAGS.run_dir} "
          f"({metrics['total_seconds']:.0f} s)")


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: tfq COMMAND [--flags]; COMMAND is one of {', '.join(COMMANDS)}")
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[2:]}")
    {"train": _train}[argv[1]]()


def run():
    import tfq  # noqa: F401  (selects Keras 2 before TensorFlow loads)
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
