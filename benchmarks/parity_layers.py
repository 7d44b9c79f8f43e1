"""Where Keras and the integer model part ways, op by op (diagnosis for docs/export.md "Known limits").

Loads a run directory's ``quantized.h5``, exports it and prints ``tfq.export.verify.locate_divergence``
on the first ``--examples`` test images: the IntegerGraph runs op by op in graph order, every op
reading Keras's codes for each input tensor that has a Keras counterpart (teacher forcing), so each
row is one op's own error against Keras, in steps of its output grid. ``--arithmetic`` picks the
IntegerGraph arithmetic: ``xnnpack`` (what LiteRT computes by default, bit for bit), ``reference``
(the TFLite reference kernels, whose fixed-point requantization rounds twice) or ``both``.

    python -m benchmarks.parity_layers runs/demo --examples=50 [--exact_hard_swish] [--arithmetic=both]

Columns: op index and type, Keras layer, ``chain`` (the ops between the forced inputs and the
compared tensor, e.g. a MUL and the MINIMUM/MAXIMUM clamps after it), the share of values whose
codes differ, the share more than one step apart, the largest difference in steps, and
``off_grid``: the largest distance of Keras's value to the tensor's grid (rows with a large one
compare a Keras tensor the integer model does not hold). Under XNNPACK the expected differences
are HARD_SWISH (TFLite's fixed point, 1-2 of 256 input codes unless ``--exact_hard_swish``) and
convolution outputs within ~1e-5 of a rounding tie, where Keras's float32 sum lands on the other
side (about 1 value in 10^5).
"""
from __future__ import annotations

import argparse

import tfq  # noqa: F401  (Keras 2 before TensorFlow)

from tfq import data
from tfq.export import runs, tflite, verify

ARITHMETIC_CHOICES = ("xnnpack", "reference", "both")


def _match(layer_name, tensor_name, model_name, names):
    """The earlier name rule (kept for scripts that import it; ``verify.layer_tensors`` supersedes
    it): a folded BatchNorm's tensor is its convolution's ``add``; other layers' tensors carry the
    layer name as a path component."""
    first = tensor_name.split(";")[0]
    if layer_name.endswith("_bn"):
        return first.startswith(f"{model_name}/{layer_name[:-3]}/add")
    if f"{layer_name}_bn" in names:
        return False
    return f"/{layer_name}/" in first + "/"


def format_rows(rows, arithmetic):
    lines = [f"--- {arithmetic} arithmetic (teacher forced) ---",
             f"{'#':>4s} {'op':18s} {'Keras layer':30s} {'chain':30s} {'differ':>8s} {'>1 step':>8s} "
             f"{'max':>4s} {'off_grid':>8s}"]
    for r in rows:
        lines.append(f"{r['op_index']:4d} {r['op'][:18]:18s} {r['layer'][:30]:30s} {r['chain'][:30]:30s} "
                     f"{100 * r['differing']:7.3f}% {100 * r['beyond_one_step']:7.3f}% {r['max_steps']:4d} "
                     f"{r['off_grid']:8.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--examples", type=int, default=50)
    parser.add_argument("--exact_hard_swish", action="store_true",
                        help="export hard-swish layers as exact int8 tables (to_tflite(exact_hard_swish=True))")
    parser.add_argument("--arithmetic", choices=ARITHMETIC_CHOICES, default="both",
                        help="IntegerGraph arithmetic: xnnpack (LiteRT's default runtime), reference, or both")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"--examples must be a positive integer, got {args.examples}")
    model = runs.load_run_model(args.run_dir)
    x, _ = data.load_numpy("fashion_mnist", "test", limit=args.examples)
    flatbuffer = tflite.to_tflite(model, exact_hard_swish=args.exact_hard_swish)
    graph = tflite.to_integer_graph(model, flatbuffer=flatbuffer)
    arithmetics = ("xnnpack", "reference") if args.arithmetic == "both" else (args.arithmetic,)
    for arithmetic in arithmetics:
        rows = verify.locate_divergence(model, flatbuffer, x, arithmetic=arithmetic, graph=graph)
        print(format_rows(rows, arithmetic))
    return 0


if __name__ == "__main__":
    main()
