"""DDQ benchmark (issue 5), following shared/BENCHMARKS.md; ddq.txt tables 2-3 and fig. 3.

Fashion-MNIST, ``mobile_swish``, one cached float checkpoint, the same fine-tuning budget for every
variant: float fine-tuning; uniform W4 as the issue names it (LSQ: config 1, LSQ initialisation) and
the stronger uniform W4 of LSQ+ (config 4 activations); DDQ(fix) W4 and DDQ mixed at a
4-bit weight-memory budget (``tfq.callbacks.DDQGateSchedule``), each without and with the gradient
correction of eq. 9. First/last layers are 8-bit in every quantized variant, so all quantized
variants have the same memory budget. Records Keras test accuracy (before and after the int32 bias
snap), TFLite accuracy, the achieved weight memory, per-layer bits and epoch times; plots the per-layer bits of the mixed variants (fig. 3).

    python -m benchmarks.ddq --epochs=3                # or: make bench ONLY=ddq

``--resume`` keeps the finished variants of an interrupted run with the same arguments on the same CPU.
"""
from __future__ import annotations

import argparse
import os
import time

import tfq  # noqa: F401  (Keras 2 before TensorFlow)

from benchmarks.common import (describe_error, export_accuracy, finished_rows, keep_finished, median_epoch,
                               new_results, save_figure, save_row, write)

from tfq import costs, train

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(os.path.dirname(HERE), "docs")


def finetune(model, args, schedule=None):
    """``tfq.train.finetune``'s recipe (same data order, optimizer and cosine schedule); a mixed
    DDQ model is compiled with the schedule's memory-constrained loss (sec. 3.1)."""
    return train.finetune(model, "fashion_mnist", args.epochs, args.batch_size, args.learning_rate, args.seed,
                          args.limit, verbose=0, callbacks=[schedule] if schedule is not None else ())


def memory_row(model):
    rows = [r for r in costs.summary(model) if r["layer"] != "TOTAL"]
    params = sum(r["params"] for r in rows)
    memory = float(costs.weight_memory(model))
    return {"weight_memory_bits": memory, "bits_per_weight": memory / params,
            "layer_bits": {r["layer"]: r["weight_bits"] for r in rows},
            "layer_params": {r["layer"]: r["params"] for r in rows}}


def plot_bits(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mixed = [v for v in results["variants"] if v.get("mode") == "mixed" and "layer_bits" in v]
    fixed = next((v for v in results["variants"] if v.get("mode") == "fixed" and "layer_bits" in v), None)
    if not mixed:
        return None
    layers = list(mixed[0]["layer_bits"])
    x = np.arange(len(layers))
    width = 0.8 / (len(mixed) + (fixed is not None))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(layers)), 4))
    series = ([(f"DDQ(fix), lambda={fixed['grad_correction']}", fixed)] if fixed else []) + \
        [(f"DDQ mixed, lambda={v['grad_correction']}", v) for v in mixed]
    for i, (label, v) in enumerate(series):
        ax.bar(x + i * width, [v["layer_bits"][n] for n in layers], width, label=label)
    ax.set_xticks(x + width * (len(series) - 1) / 2)
    ax.set_xticklabels([n.replace("quant_", "") for n in layers], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("weight bits")
    ax.set_title(f"DDQ per-layer bits, {results['protocol']['model']}, budget "
                 f"{results['protocol']['target_bits']} bits/weight (ddq.txt fig. 3)")
    ax.set_ylim(0, 10)
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    return save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_swish")
    parser.add_argument("--float_epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs for every variant")
    parser.add_argument("--target_bits", type=int, default=4, help="weight bits / memory budget per weight")
    parser.add_argument("--activation_bits", type=int, default=4)
    parser.add_argument("--max_bits", type=int, default=8, help="DDQ mixed: starting bits")
    parser.add_argument("--grad_correction", type=float, default=0.1, help="lambda of eq. 9 ('with' variants)")
    parser.add_argument("--alpha", type=float, default=-0.02)
    parser.add_argument("--ramp", type=float, default=0.5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=None,
                        help="fine-tune on the first N training examples only (quick runs; protocol: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished variants of an earlier run at --out (same arguments and CPU)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "ddq.json"))
    parser.add_argument("--plot", default=os.path.join(DOCS, "ddq_bits.png"))
    args = parser.parse_args(argv)
    bits, abits = args.target_bits, args.activation_bits

    variants = [("float", None, None), ("lsq", None, None), ("lsq+", None, None)]
    for mode in ("fixed", "mixed"):
        variants += [("ddq", mode, 0.0), ("ddq", mode, args.grad_correction)]

    results = new_results("ddq", args, argv)
    variant_key = lambda row: (row["method"], row["mode"], row["grad_correction"])  # noqa: E731
    finished = finished_rows(results, args.out, variant_key, vars(parser.parse_args([]))) if args.resume else {}
    float_epoch = None
    for method, mode, correction in variants:
        row = {"method": method, "mode": mode, "grad_correction": correction,
               "weight_bits": None if method == "float" else bits,
               "activation_bits": None if method == "float" else abits}
        kept = keep_finished(results, finished, variant_key(row), args.out)
        if kept is not None:
            float_epoch = kept["median_epoch_seconds"] if method == "float" else float_epoch
            continue
        net, _ = train.float_model("fashion_mnist", args.model, args.float_epochs, seed=args.seed,
                                   cache_dir=CACHE, verbose=0)  # float: always the full train split
        try:
            schedule = None
            if method == "float":
                model = net
            elif method == "lsq":
                model = tfq.quantize_model(net, "lsq", weight_bits=bits, activation_bits=abits)
            elif method == "lsq+":
                model = tfq.quantize_model(net, "lsq+", weight_bits=bits, activation_bits=abits, activation_config=4)
            else:
                model = tfq.quantize_model(net, "ddq", target_bits=bits, activation_bits=abits, mode=mode,
                                           max_bits=args.max_bits, grad_correction=correction)
                if mode == "mixed":
                    schedule = tfq.callbacks.DDQGateSchedule(bits, alpha=args.alpha, ramp=args.ramp)
            start = time.perf_counter()
            seconds = finetune(model, args, schedule)
            row.update(epoch_seconds=seconds, median_epoch_seconds=median_epoch(seconds),
                       keras_accuracy=train.evaluate(model, "fashion_mnist"),
                       total_seconds=time.perf_counter() - start)
            if method != "float":
                row.update(memory_row(model))
                row.update(export_accuracy(model))
            if schedule is not None:
                row["schedule_history"] = schedule.history
            if method == "float":
                float_epoch = row["median_epoch_seconds"]
            row["epoch_ratio_to_float"] = row["median_epoch_seconds"] / float_epoch if float_epoch else None
        except Exception as err:  # a variant that fails is a result, not a crash
            row.update(error=describe_error(err))
        save_row(results, row, args.out, hide=("schedule_history", "layer_params"))
    plot = plot_bits(results, args.plot)
    results["plot"] = os.path.relpath(plot, os.path.dirname(HERE)) if plot else None
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
