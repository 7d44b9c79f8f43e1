"""LSQ / LSQ+ benchmark (issue 2), following shared/BENCHMARKS.md.

Fashion-MNIST, ``mobile_swish``: one cached float checkpoint; float fine-tuning, LSQ (config 1,
LSQ init) and LSQ+ configs 1-4 at each bit-width, and tfmot's default 8-bit and experimental
n-bit schemes (layers tfmot rejects get tfmot's output quantizer, see ``tfmot_peer``), all with the same fine-tuning budget from the same checkpoint. Records Keras
test accuracy and the median epoch seconds over epochs 2..E relative to the float epoch.

    python -m benchmarks.lsq --epochs=3 --bits=4,3,2        # or: make bench ONLY=lsq

``--resume`` keeps the finished variants of an interrupted run with the same arguments on the same CPU.
"""
from __future__ import annotations

import argparse
import json
import os

import tfq  # noqa: F401  (Keras 2 before TensorFlow)

from benchmarks.common import (describe_error, finetune_and_evaluate, finished_rows, keep_finished, new_results,
                               save_row, tfmot_peer)
from tfq import train

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_swish")
    parser.add_argument("--float_epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs for every variant")
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--configs", default="1,2,3,4")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=None,
                        help="fine-tune on the first N training examples only (quick runs; protocol: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="float,lsq,lsq+,tfmot", help="variants to run")
    parser.add_argument("--scale_parameterization", default="log", choices=["log", "linear"])
    parser.add_argument("--scale_lr_multiplier", type=float, default=None,
                        help="k of the log scale form (default: the scheme's)")
    parser.add_argument("--bn_images", type=int, default=0,
                        help="also record accuracy after re-estimating BatchNorm statistics on N images")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished variants of an earlier run at --out (same arguments and CPU)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "lsq.json"))
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    scale = {"scale_parameterization": args.scale_parameterization}
    if args.scale_lr_multiplier is not None:
        scale["scale_lr_multiplier"] = args.scale_lr_multiplier
    bits_list = [int(b) for b in args.bits.split(",")]
    configs = [int(c) for c in args.configs.split(",")]

    variants = [("float", None, None)]  # always: the epoch-time reference
    for bits in bits_list:
        if "lsq" in methods:
            variants.append(("lsq", bits, dict(scale)))
        if "lsq+" in methods:
            variants += [("lsq+", bits, {"activation_config": c, **scale}) for c in configs]
        if "tfmot" in methods:
            variants.append(("tfmot-nbit", bits, None))
    if "tfmot" in methods:
        variants.append(("tfmot-8bit", 8, None))

    results = new_results("lsq", args, argv)
    variant_key = lambda row: (row["method"], row["weight_bits"], json.dumps(row["options"], sort_keys=True))  # noqa: E731
    finished = finished_rows(results, args.out, variant_key, vars(parser.parse_args([]))) if args.resume else {}
    float_epoch = None
    for method, bits, options in variants:
        row = {"method": method, "weight_bits": bits, "activation_bits": bits, "options": options}
        kept = keep_finished(results, finished, variant_key(row), args.out)
        if kept is not None:
            float_epoch = kept["median_epoch_seconds"] if method == "float" else float_epoch
            continue
        net, ckpt = train.float_model("fashion_mnist", args.model, args.float_epochs, seed=args.seed,
                                      cache_dir=CACHE, verbose=0)  # float: always the full train split
        try:
            if method == "float":
                model = net
            elif method.startswith("tfmot"):
                model, row["tfmot_annotated_layers"] = tfmot_peer(net, bits)
            else:
                model = tfq.quantize_model(net, method, weight_bits=bits, activation_bits=bits, **options)
            row.update(finetune_and_evaluate(model, args))
            if method == "float":
                float_epoch = row["median_epoch_seconds"]
            row["epoch_ratio_to_float"] = row["median_epoch_seconds"] / float_epoch if float_epoch else None
        except Exception as err:  # a peer that cannot quantize this model is a result, not a crash
            row.update(error=describe_error(err))
        save_row(results, row, args.out)
    return results


if __name__ == "__main__":
    main()
