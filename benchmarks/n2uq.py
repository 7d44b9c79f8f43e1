"""N2UQ benchmark (issue 4), following shared/BENCHMARKS.md.

Fashion-MNIST, ``mobile_swish``: the cached float checkpoint shared with the other benchmarks;
float fine-tuning, then N2UQ (``init="data"``, the scheme default, which starts each activation
quantizer equal to a fitted LSQ+ quantizer; and the paper's init), LSQ and LSQ+ (config 4) at
each bit-width, every variant with the same fine-tuning budget (epochs, Adam, cosine schedule,
batch size) from the same checkpoint. First and last layers stay at 8 bits in every method.
Records Keras test accuracy, weight memory and BitOPs (``tfq.costs``), the median epoch seconds
over epochs 2..E and its ratio to the float epoch measured in the same process, and N2UQ's
learned thresholds. Diagnostic column ``keras_accuracy_bn_reestimated``: test accuracy after
the BatchNorm moving statistics are recomputed from ``--bn_images`` training images with the
trained quantized network (the same for every variant; 0 skips it). It separates the quality
of the quantized network from BatchNorm moving averages that still hold the float model's
statistics after a short fine-tuning (the cause of the paper init's collapse, docs/n2uq.md).

    python -m benchmarks.n2uq --epochs=1 --limit=20000 --bits=2,3    # the LSQ benchmark's reduced budget
    python -m benchmarks.n2uq --epochs=3 --bits=2,3,4                # protocol budget
"""
from __future__ import annotations

import argparse
import os

import tfq  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np

from benchmarks.common import describe_error, finetune_and_evaluate, new_results, save_row
from tfq import costs, train
from tfq.quantizers import n2uq

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")


def learned_thresholds(model):
    """{layer: effective N2UQ parameters} of every N2UQ activation quantizer."""
    found = {}
    for layer in model.layers:
        quantizers = getattr(layer, "_output_quantizers", None)
        if quantizers and isinstance(quantizers[0], n2uq.N2UQActivationQuantizer):
            params = quantizers[0].parameters(layer._output_quantizer_vars)
            found[layer.name] = {k: np.asarray(v).tolist() for k, v in params.items()}
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_swish")
    parser.add_argument("--float_epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs for every variant")
    parser.add_argument("--bits", default="2,3,4", help="W=A bit-widths, comma separated")
    parser.add_argument("--methods", default="n2uq,lsq,lsq+,n2uq-paper",
                        help="variants per bit-width, run in this order: n2uq (init data), lsq, lsq+ (config 4), "
                             "n2uq-paper (the paper's init)")
    parser.add_argument("--bn_images", type=int, default=1024,
                        help="training images for the BatchNorm re-estimation column (0: skip it)")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--param_lr_scale", type=float, default=0.1,
                        help="N2UQ thresholds/start/scales learning-rate factor (paper: 0.1)")
    parser.add_argument("--limit", type=int, default=None,
                        help="fine-tune on the first N training examples only (quick runs; protocol: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(RESULTS, "n2uq.json"))
    args = parser.parse_args(argv)
    bits_list = [int(b) for b in args.bits.split(",")]
    choices = {"n2uq": ("n2uq", {"param_lr_scale": args.param_lr_scale, "init": "data"}),
               "lsq": ("lsq", {}),
               "lsq+": ("lsq+", {"activation_config": 4}),
               "n2uq-paper": ("n2uq", {"param_lr_scale": args.param_lr_scale, "init": "paper"})}
    names = args.methods.split(",")
    for name in names:
        if name not in choices:
            raise SystemExit(f"--methods: unknown {name!r}; choose from {sorted(choices)}")

    variants = [("float", None, None)]
    for bits in bits_list:
        variants += [(choices[name][0], bits, dict(choices[name][1])) for name in names]

    results = new_results("n2uq", args, argv, quick_run=args.limit is not None)
    float_epoch = None
    for method, bits, options in variants:
        net, _ = train.float_model("fashion_mnist", args.model, args.float_epochs, seed=args.seed,
                                   cache_dir=CACHE, verbose=0)  # float: always the full train split
        row = {"method": method, "weight_bits": bits, "activation_bits": bits, "options": options}
        try:
            if method == "float":
                model = net
            else:
                model = tfq.quantize_model(net, method, weight_bits=bits, activation_bits=bits, **options)
            row.update(finetune_and_evaluate(model, args))
            if method != "float":
                row.update(weight_memory_bits=float(costs.weight_memory(model)),
                           bitops=float(costs.bitops(model)))
            if method == "n2uq":
                row["learned"] = learned_thresholds(model)
            if method == "float":
                float_epoch = row["median_epoch_seconds"]
            row["epoch_ratio_to_float"] = row["median_epoch_seconds"] / float_epoch if float_epoch else None
        except Exception as err:  # a variant that fails is a result, not a crash
            row.update(error=describe_error(err))
        save_row(results, row, args.out, hide=("learned",))
    return results


if __name__ == "__main__":
    main()
