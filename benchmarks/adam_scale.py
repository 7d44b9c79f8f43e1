"""How far Adam moves LSQ+ scales (README "Known limits").

small_cnn, LSQ+ W8A8 (config 4): quantizers calibrated on 256 Fashion-MNIST images, then
fine-tuned with ``tfq.train.finetune`` (Adam, 5e-4, cosine) on the first ``--limit`` images.
Records the input quantizer's scale after calibration and after fine-tuning, and the smallest
per-channel weight scale of every convolution.

    python -m benchmarks.adam_scale --limit=2048     # 16 steps of 128
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import tfq  # noqa: F401  (Keras 2 before TensorFlow)
from benchmarks.common import write
from benchmarks.lsq import CACHE, RESULTS
from tfq import data, train


def scales(q):
    weights = {w.name: np.asarray(w.numpy()) for w in q.weights if w.name.endswith("_scale:0")}
    return {"input": float(weights["image_quantize/image_quantize_scale:0"]),
            "smallest_kernel_scale": {n.split("/")[0]: float(v.min()) for n, v in weights.items()
                                      if "kernel_scale" in n}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2048)
    parser.add_argument("--out", default=os.path.join(RESULTS, "adam_scale.json"))
    args = parser.parse_args(argv)
    net, _ = train.float_model("fashion_mnist", "small_cnn", 3, cache_dir=CACHE, verbose=0)
    q = tfq.quantize_model(net, "lsq+", weight_bits=8, activation_bits=8, activation_config=4)
    tfq.calibrate(q, data.load_numpy("fashion_mnist", limit=256)[0])
    before = scales(q)
    train.finetune(q, "fashion_mnist", 1, limit=args.limit, verbose=0)
    results = {"benchmark": "adam_scale", "command": "python -m benchmarks.adam_scale " + " ".join(argv or sys.argv[1:]),
               "machine": train.machine_info(), "steps": -(-args.limit // 128), "after_calibration": before,
               "after_finetuning": scales(q), "variants": []}
    write(results, args.out)
    print(results["after_calibration"]["input"], "->", results["after_finetuning"]["input"],
          min(results["after_finetuning"]["smallest_kernel_scale"].values()))
    return results


if __name__ == "__main__":
    main()
