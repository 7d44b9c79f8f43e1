"""How far Adam moves LSQ+ scales, linear s vs log s (README "Known limits").

small_cnn, LSQ+ W8A8 (config 4): quantizers calibrated on 256 Fashion-MNIST images, then
fine-tuned with ``tfq.train.finetune`` (Adam, 5e-4, cosine) on the first ``--limit`` images, once
with each ``scale_parameterization``. Records the input quantizer's scale and the smallest
per-channel weight scale of every convolution after calibration and after fine-tuning, and the
test accuracy (10,000 images) after fine-tuning.

    python -m benchmarks.adam_scale --limit=2048     # 16 steps of 128
"""
from __future__ import annotations

import argparse
import os


import tfq  # noqa: F401  (Keras 2 before TensorFlow)
from benchmarks.common import new_results, write
from benchmarks.lsq import CACHE, RESULTS
from tfq import costs, data, train


def scales(q):
    """{"input": s, "smallest_kernel_scale": {layer: min s}} read through the quantizers."""
    out = {"smallest_kernel_scale": {}}
    for layer in q.layers:
        for _, quantizer, qvars in costs.weight_quantizers(layer):
            out["smallest_kernel_scale"][layer.name] = float(quantizer.scale_numpy(qvars).min())
        quantizer, qvars = costs.output_quantizer(layer)
        if quantizer is not None and layer.name.startswith("image_quantize"):
            out["input"] = float(quantizer.scale_numpy(qvars))
    return out


def run(net, parameterization, limit):
    q = tfq.quantize_model(net, "lsq+", weight_bits=8, activation_bits=8, activation_config=4,
                           scale_parameterization=parameterization)
    tfq.calibrate(q, data.load_numpy("fashion_mnist", limit=256)[0])
    before = scales(q)
    train.finetune(q, "fashion_mnist", 1, limit=limit, verbose=0)
    return {"scale_parameterization": parameterization, "after_calibration": before,
            "after_finetuning": scales(q), "accuracy": train.evaluate(q, "fashion_mnist")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2048)
    parser.add_argument("--out", default=os.path.join(RESULTS, "adam_scale.json"))
    args = parser.parse_args(argv)
    net, _ = train.float_model("fashion_mnist", "small_cnn", 3, cache_dir=CACHE, verbose=0)
    results = new_results("adam_scale", args, argv, steps=-(-args.limit // 128),
                          float_accuracy=train.evaluate(net, "fashion_mnist"))
    for parameterization in ("linear", "log"):
        row = run(net, parameterization, args.limit)
        results["variants"].append(row)
        write(results, args.out)
        print(parameterization, row["after_calibration"]["input"], "->", row["after_finetuning"]["input"],
              "smallest kernel scale", min(row["after_finetuning"]["smallest_kernel_scale"].values()),
              "accuracy", row["accuracy"])
    return results


if __name__ == "__main__":
    main()
