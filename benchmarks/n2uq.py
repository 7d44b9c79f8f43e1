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
Each quantized variant is then exported (bias snap, ``tfq.export.to_tflite``) and its TFLite
(XNNPACK) test accuracy recorded, after the BatchNorm re-estimation when that column is on. For
the first N2UQ variant of the lowest bit-width, the histogram of ``beta1 * x`` at the inputs of
two activation quantizers (``--plot_layers``) is stored with the learned thresholds and drawn to
``--plot`` (default ``docs/n2uq_thresholds.png``; paper fig. 3). ``--seeds`` repeats every variant per seed (float
checkpoint and fine-tuning both seeded) for mean and spread. ``--resume`` keeps the finished
variants of an interrupted run with the same arguments on the same CPU.

    python -m benchmarks.n2uq --epochs=1 --limit=20000 --bits=2,3    # the LSQ benchmark's reduced budget
    python -m benchmarks.n2uq --epochs=3 --bits=2,3,4                # protocol budget
    python -m benchmarks.n2uq --epochs=1 --limit=20000 --bits=2,3,4 --methods=n2uq,lsq,lsq+ --seeds=0,1,2
"""
from __future__ import annotations

import argparse
import json
import os

import tfq  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np

from benchmarks.common import (describe_error, export_accuracy, finetune_and_evaluate, finished_rows, keep_finished,
                               new_results, save_figure, save_row, write)
from tfq import costs, data, train
from tfq.quantizers import n2uq

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")
PLOT = os.path.join(os.path.dirname(HERE), "docs", "n2uq_thresholds.png")


def learned_thresholds(model):
    """{layer: effective N2UQ parameters} of every N2UQ activation quantizer."""
    found = {}
    for layer in model.layers:
        quantizers = getattr(layer, "_output_quantizers", None)
        if quantizers and isinstance(quantizers[0], n2uq.N2UQActivationQuantizer):
            params = quantizers[0].parameters(layer._output_quantizer_vars)
            found[layer.name] = {k: np.asarray(v).tolist() for k, v in params.items()}
    return found


def summary(rows):
    """Per (method, bits): mean, spread (max - min) and count over seeds of the accuracy columns."""
    groups = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault(f"{row['method']} W{row['weight_bits']}A{row['activation_bits']}", []).append(row)
    out = {}
    for key, group in groups.items():
        out[key] = {"seeds": [r["seed"] for r in group]}
        for column in ("keras_accuracy", "keras_accuracy_bn_reestimated", "tflite_accuracy"):
            values = [r[column] for r in group if r.get(column) is not None]
            if values:
                out[key][column] = {"mean": float(np.mean(values)), "spread": float(np.ptp(values)),
                                    "values": values}
    return out


def threshold_histograms(model, layer_names, images, bins=120):
    """Per named N2UQ activation quantizer (its wrapper must wrap a weightless layer, e.g. an
    Activation): the histogram of ``beta1 * x`` over ``images``, where ``x`` is the quantizer's input,
    with the learned thresholds ``T_k`` (same units) and the uniform ones (same start and span)."""
    import tf_keras as keras
    found = {}
    for name in layer_names:
        layer = model.get_layer(name)
        quantizers = getattr(layer, "_output_quantizers", None)
        if not quantizers or not isinstance(quantizers[0], n2uq.N2UQActivationQuantizer):
            raise ValueError(f"--plot_layers: {name!r} has no N2UQ activation quantizer")
        if layer.layer.weights:
            raise ValueError(f"--plot_layers: {name!r} wraps a layer with weights; pick an activation layer")
        params = quantizers[0].parameters(layer._output_quantizer_vars)
        wrapper_input = keras.Model(model.inputs, layer.input).predict(images, batch_size=256, verbose=0)
        x = params["beta1"] * np.asarray(layer.layer(wrapper_input), np.float64).reshape(-1)
        counts, edges = np.histogram(x, bins=bins)
        span = float(np.sum(params["lengths"]))
        levels = len(params["lengths"])
        uniform = params["start"] + span * (np.arange(levels) + 0.5) / levels
        found[name] = {"counts": counts.tolist(), "edges": edges.tolist(),
                       "thresholds": np.asarray(params["thresholds"]).tolist(), "uniform_thresholds": uniform.tolist(),
                       "start": params["start"], "beta1": params["beta1"]}
    return found


def plot_thresholds(histograms, title, path=PLOT):
    """Histogram of ``beta1 * x`` per layer with the learned (solid) and uniform (dashed) thresholds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(histograms), figsize=(5 * len(histograms), 3.4))
    for ax, (name, h) in zip(np.atleast_1d(axes), histograms.items()):
        edges = np.asarray(h["edges"])
        ax.bar(edges[:-1], np.maximum(h["counts"], 1), width=np.diff(edges), align="edge", color="0.7", log=True)
        for k, t in enumerate(h["thresholds"]):
            ax.axvline(t, color="C3", label="learned T_k" if k == 0 else None)
        for k, t in enumerate(h["uniform_thresholds"]):
            ax.axvline(t, color="C0", linestyle="--", label="uniform, same start and span" if k == 0 else None)
        ax.set_title(name)
        ax.set_xlabel("beta1 * x (quantizer input)")
        ax.set_ylabel("count (log)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


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
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, each running every variant "
                        "(overrides --seed)")
    parser.add_argument("--no_export", action="store_true", help="skip the TFLite export and its accuracy")
    parser.add_argument("--plot_layers", default="quant_stem_act,quant_block4_pw_act",
                        help="two N2UQ activation layers for the threshold plot ('' skips it)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished variants of an earlier run at --out (same arguments and CPU)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "n2uq.json"))
    parser.add_argument("--plot", default=PLOT, help="where the threshold plot goes")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
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
    variant_key = lambda row: (row["method"], row["weight_bits"], json.dumps(row["options"], sort_keys=True),  # noqa: E731
                               row["seed"])
    finished = finished_rows(results, args.out, variant_key, vars(parser.parse_args([]))) if args.resume else {}
    plot_layers = [n for n in args.plot_layers.split(",") if n]
    plot_bits = min(bits_list)
    for seed in seeds:
        seed_args = argparse.Namespace(**{**vars(args), "seed": seed})  # results["protocol"] keeps --seed
        float_epoch = None
        for method, bits, options in variants:
            row = {"method": method, "weight_bits": bits, "activation_bits": bits, "options": options, "seed": seed}
            kept = keep_finished(results, finished, variant_key(row), args.out)
            if kept is not None:
                float_epoch = kept["median_epoch_seconds"] if method == "float" else float_epoch
                continue
            net, _ = train.float_model("fashion_mnist", args.model, args.float_epochs, seed=seed,
                                       cache_dir=CACHE, verbose=0)  # float: always the full train split
            try:
                if method == "float":
                    model = net
                else:
                    model = tfq.quantize_model(net, method, weight_bits=bits, activation_bits=bits, **options)
                row.update(finetune_and_evaluate(model, seed_args))
                if method != "float":
                    row.update(weight_memory_bits=float(costs.weight_memory(model)),
                               bitops=float(costs.bitops(model)))
                if method == "n2uq":
                    row["learned"] = learned_thresholds(model)
                    if plot_layers and bits == plot_bits and "threshold_histograms" not in results:
                        images = data.load_numpy("fashion_mnist", "test", limit=1000)[0]
                        results["threshold_histograms"] = {
                            "seed": seed, "bits": bits, "images": len(images),
                            "layers": threshold_histograms(model, plot_layers, images)}
                        plot_thresholds(results["threshold_histograms"]["layers"],
                                        f"N2UQ W{bits}A{bits}, mobile_swish, seed {seed}: learned thresholds "
                                        f"vs the activation histogram ({len(images)} test images)", args.plot)
                if method == "float":
                    float_epoch = row["median_epoch_seconds"]
                elif not args.no_export:
                    row.update(export_accuracy(model))
                row["epoch_ratio_to_float"] = row["median_epoch_seconds"] / float_epoch if float_epoch else None
            except Exception as err:  # a variant that fails is a result, not a crash
                row.update(error=describe_error(err))
            save_row(results, row, args.out, hide=("learned",))
    results["summary"] = summary(results["variants"])
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
