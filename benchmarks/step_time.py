"""Training-step time of a quantized model relative to its float model (same process).

    python -m benchmarks.step_time [--model=mobile_swish] [--method=lsq+] [--steps=40] [--jit]

Times ``steps`` fit steps at batch 128 on a fixed random batch after 5 warm-up steps.
"""
import argparse
import time

import numpy as np

import tfq
import tensorflow as tf
import tf_keras as keras

from tfq import models


def ms_per_step(model, dataset, steps, jit):
    model.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    model.fit(dataset.take(5), verbose=0)
    start = time.perf_counter()
    model.fit(dataset.take(steps), verbose=0)
    return 1000 * (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_swish")
    parser.add_argument("--method", default="lsq+")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--jit", action="store_true", help="compile with XLA (jit_compile=True)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.random((128, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, 128)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    float_ms = ms_per_step(models.get(args.model, seed=0), dataset, args.steps, args.jit)
    quant = tfq.quantize_model(models.get(args.model, seed=0), args.method, weight_bits=args.bits,
                               activation_bits=args.bits)
    quant_ms = ms_per_step(quant, dataset, args.steps, args.jit)
    print(f"{args.model} jit={args.jit}: float {float_ms:.0f} ms/step, {args.method} W{args.bits}A{args.bits} "
          f"{quant_ms:.0f} ms/step, ratio {quant_ms / float_ms:.2f}")


if __name__ == "__main__":
    main()
