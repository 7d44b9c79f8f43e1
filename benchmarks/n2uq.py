"""N2UQ benchmark (issue 4), following shared/BENCHMARKS.md.

Fashion-MNIST, ``mobile_swish``: the cached float checkpoint shared with the other benchmarks;
float fine-tuning, then N2UQ (paper init, and ``init="data"``, which starts each activation
quantizer equal to a fitted LSQ+ quantizer) and LSQ+ (config 4) at W2A2, W3A3 and W4A4, every variant with the
same fine-tuning budget (epochs, Adam, cosine schedule, batch size) from the same checkpoint.
First and last layers stay at 8 bits in both methods. Records Keras test accuracy, weight memory
and BitOPs (``tfq.costs``), the median epoch seconds over epochs 2..E and its ratio to the float
epoch measured in the same process, and N2UQ's learned thresholds.

    python -m benchmarks.n2uq --epochs=3 --bits=2,3,4        # quick check: --epochs=1 --limit=2000
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
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--param_lr_scale", type=float, default=0.1,
                        help="N2UQ thresholds/start/scales learning-rate factor (paper: 0.1)")
    parser.add_argument("--limit", type=int, default=None,
                        help="fine-tune on the first N training examples only (quick runs; protocol: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(RESULTS, "n2uq.json"))
    args = parser.parse_args(argv)
    bits_list = [int(b) for b in args.bits.split(",")]

    variants = [("float", None, None)]
    for bits in bits_list:
        variants.append(("n2uq", bits, {"param_lr_scale": args.param_lr_scale, "init": "paper"}))
        variants.append(("n2uq", bits, {"param_lr_scale": args.param_lr_scale, "init": "data"}))
        variants.append(("lsq+", bits, {"activation_config": 4}))

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
