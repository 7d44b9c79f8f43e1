"""AdaQAT benchmark (issue 6), following shared/BENCHMARKS.md.

Fashion-MNIST, ``small_cnn`` and ``mobile_swish``; two scenarios: fine-tuning (from the cached float
checkpoint, fine-tuning learning rate) and from scratch (fresh seeded weights, the float recipe's
learning rate), each with the same epoch budget as its float reference. For every lambda it
records the final W/A bits, N_w/N_a, frozen flags, BitOPs, Keras test accuracy and epoch seconds,
and plots N_w, N_a over training (paper fig. 1) to docs/adaqat_bits.png. The default lambdas are
the callback's default 0.04 (chosen on small_cnn fine-tuning, docs/adaqat.md) and paper table III's
0.1, 0.15, 0.2.

Bit-width learning rates default to eta_w = 4e-2, eta_a = 8e-2 (paper: 1e-3, 5e-4): the paper trains
150-300 epochs, the protocol's budget is a few epochs, and N must move several bits in it and then
settle. eta_a is twice eta_w (the paper's ratio is the inverse) so that N_a settles while N_w is
still high: the hardware gradient of N_a is lambda ceil(N_w), and when both fall together it is too
small at 4 bits to overcome the 3-bit probe's loss, so N_a oscillates around 4 and freezes at 5
(measured, docs/adaqat.md). Fine-tuning uses SAT's "stddev" weight rescaling (the pretrained
layer's weight std): with the "constant" 1/sqrt(fan_out) the float checkpoint's BatchNorm
statistics no longer match and a quantized mobile_swish starts at chance (measured: 0.10 vs 0.88
test accuracy at W8/A8 before training).

    python -m benchmarks.adaqat --epochs=3                 # or: make bench ONLY=adaqat
    python -m benchmarks.adaqat --epochs=1 --limit=2000 --lambdas=0.15   # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import tfq  # noqa: F401  (Keras 2 before TensorFlow)

from benchmarks.common import describe_error, median_epoch, new_results, save_figure, save_row, write
from tfq import costs, train
from tfq import data as tfq_data
from tfq import models as tfq_models
from tfq.callbacks.adaqat import AdaQAT

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")
PLOT = os.path.join(os.path.dirname(HERE), "docs", "adaqat_bits.png")
SCENARIOS = ("finetune", "scratch")




def _csv(text, cast):
    return [cast(v) for v in text.split(",") if v]


def starting_model(args, model_name, scenario):
    """The float model a variant starts from: the cached checkpoint or fresh seeded weights."""
    if scenario == "finetune":
        net, _ = train.float_model("fashion_mnist", model_name, args.float_epochs, seed=args.seed,
                                   cache_dir=CACHE, verbose=0)
        return net
    return tfq_models.get(model_name, seed=args.seed, input_shape=tfq_data.INPUT_SHAPE["fashion_mnist"],
                          num_classes=tfq_data.NUM_CLASSES["fashion_mnist"])


def run_variant(args, model_name, scenario, lam):
    net = starting_model(args, model_name, scenario)
    lr = args.learning_rate if scenario == "finetune" else args.scratch_learning_rate
    row = {"model": model_name, "scenario": scenario, "lambda": lam, "learning_rate": lr}
    if lam is None:
        model, callbacks, cb = net, [], None
        row["method"] = "float"
    else:
        rescale = args.rescale if args.rescale != "auto" else ("stddev" if scenario == "finetune" else "constant")
        row["rescale"] = rescale
        row["alpha_init"] = args.alpha_init
        row["signed_activations"] = args.signed_activations
        model = tfq.quantize_model(net, "adaqat", weight_bits=args.init_weight_bits,
                                   activation_bits=args.init_activation_bits, rescale=rescale,
                                   alpha_init=args.alpha_init,  # PACTQuantizer parses and checks it
                                   signed_activations=args.signed_activations)
        initial_bitops = float(costs.bitops(model))
        cb = AdaQAT(lambda_=lam, lr_weight=args.lr_weight, lr_activation=args.lr_activation,
                    oscillation_limit=args.oscillation_limit)
        callbacks = [cb]
        row["method"] = "adaqat"
    start = time.perf_counter()
    seconds = train.finetune(model, "fashion_mnist", args.epochs, learning_rate=lr, seed=args.seed,
                             limit=args.limit, verbose=0, callbacks=callbacks)
    row.update(epoch_seconds=seconds, median_epoch_seconds=median_epoch(seconds),
               keras_accuracy=train.evaluate(model, "fashion_mnist"), total_seconds=time.perf_counter() - start)
    rows = costs.layer_costs(model)
    row["macs"] = sum(r.macs for r in rows)
    row["bitops"] = float(costs.bitops(model, rows))
    row["weight_memory_bits"] = float(costs.weight_memory(model, rows))
    if cb is not None:
        state = cb.current()
        row.update(weight_bits=state["weight"]["bits"], activation_bits=state["activation"]["bits"],
                   weight_N=state["weight"]["N"], activation_N=state["activation"]["N"],
                   weight_frozen=state["weight"]["frozen"], activation_frozen=state["activation"]["frozen"],
                   crossings={k: state[k]["crossings"] for k in state}, bitops_initial=initial_bitops)
        stride = max(1, len(cb.history["step"]) // args.trace_points)
        keys = ("step", "weight_N", "activation_N", "weight_bits", "activation_bits", "bitops")
        if args.trace_probes:
            keys += ("loss", "loss_weight_probe", "loss_activation_probe", "weight_gradient", "activation_gradient")
        row["trace"] = {key: cb.history[key][::stride] for key in keys}
    return row


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    runs = [v for v in results["variants"] if v.get("trace")]
    panels = sorted({(v["model"], v["scenario"]) for v in runs})
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels)), squeeze=False)
    for ax, (model_name, scenario) in zip(axes[:, 0], panels):
        for v in runs:
            if (v["model"], v["scenario"]) != (model_name, scenario):
                continue
            t = v["trace"]
            line, = ax.plot(t["step"], t["weight_N"], label=f"N_w, lambda={v['lambda']}")
            ax.plot(t["step"], t["activation_N"], "--", color=line.get_color(), label=f"N_a, lambda={v['lambda']}")
        ax.set_title(f"{model_name}, {scenario}")
        ax.set_xlabel("training step")
        ax.set_ylabel("bit-width N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,mobile_swish")
    parser.add_argument("--scenarios", default="finetune,scratch")
    parser.add_argument("--lambdas", default="0.04,0.1,0.15,0.2",
                        help="the callback's default, then paper table III (0.1, 0.15, 0.2)")
    parser.add_argument("--float_epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs for every variant")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="fine-tuning learning rate")
    parser.add_argument("--scratch_learning_rate", type=float, default=2e-3,
                        help="from-scratch learning rate (the float recipe's)")
    parser.add_argument("--init_weight_bits", type=int, default=8)
    parser.add_argument("--init_activation_bits", type=int, default=8)
    parser.add_argument("--lr_weight", type=float, default=4e-2, help="eta_w (paper: 1e-3 over 150+ epochs)")
    parser.add_argument("--lr_activation", type=float, default=8e-2, help="eta_a (paper: 5e-4 over 150+ epochs)")
    parser.add_argument("--oscillation_limit", type=int, default=10)
    parser.add_argument("--alpha_init", default="8.0",
                        help='PACT\'s initial alpha: a number (SAT: 8) or "max" (the first batch\'s max x, max |x| if signed)')
    parser.add_argument("--signed_activations", default="asymmetric", choices=("asymmetric", "symmetric"),
                        help="PACT grid of tensors that can be negative (swish, residual sums): a calibrated "
                             "share of steps below zero, or [-alpha, alpha]")
    parser.add_argument("--rescale", default="auto", choices=("auto", "constant", "stddev", "none"),
                        help="SAT weight rescaling; auto: stddev when fine-tuning (keeps the pretrained weight "
                             "scale, so BatchNorm statistics stay valid), constant (SAT) from scratch")
    parser.add_argument("--limit", type=int, default=None,
                        help="train on the first N training examples only (quick runs; protocol: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace_points", type=int, default=400, help="points of the N trace kept per run")
    parser.add_argument("--trace_probes", action="store_true",
                        help="also keep the probe losses and bit gradients (eq. 3) in the trace")
    parser.add_argument("--no_float", action="store_true",
                        help="skip the float fine-tune baseline row (when it is already measured)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "adaqat.json"))
    parser.add_argument("--plot", default=PLOT)
    args = parser.parse_args(argv)
    for scenario in _csv(args.scenarios, str):
        if scenario not in SCENARIOS:
            raise SystemExit(f"--scenarios must be a subset of {SCENARIOS}, got {scenario!r}")

    results = new_results("adaqat", args, argv)
    for model_name in _csv(args.models, str):
        for scenario in _csv(args.scenarios, str):
            float_epoch = None
            for lam in ([] if args.no_float else [None]) + _csv(args.lambdas, float):
                try:
                    row = run_variant(args, model_name, scenario, lam)
                    if lam is None:
                        float_epoch = row["median_epoch_seconds"]
                    row["epoch_ratio_to_float"] = (row["median_epoch_seconds"] / float_epoch
                                                   if float_epoch else None)
                except Exception as err:  # one failing variant is a result, not a crash
                    row = {"model": model_name, "scenario": scenario, "lambda": lam, "error": describe_error(err)}
                save_row(results, row, args.out, hide=("trace",))
    path = plot(results, args.plot)
    results["plot"] = os.path.relpath(path, os.path.dirname(HERE)) if path else None
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
