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
side (about 1 value in 10^5). ``--ties`` analyses those: how many distinct exact values they hold
(constant image regions repeat one accumulator) and whether XNNPACK rounds like the exact value.
"""
from __future__ import annotations

import argparse

import tfq  # noqa: F401  (Keras 2 before TensorFlow)

from tfq import data
from tfq.export import runs, tflite, verify

ARITHMETIC_CHOICES = ("xnnpack", "reference", "both")


def tie_rows(model, flatbuffer, graph, x):
    """For every convolution whose XNNPACK output differs from Keras with teacher forcing: how many
    values differ, how many distinct exact values they hold (repeats come from constant image
    regions: identical receptive fields give identical accumulators), the exact value's distance to
    the rounding tie (accumulator times the float64 multiplier of the float32 scales), and whether
    XNNPACK rounds like the exact value."""
    import numpy as np
    from tfq.export import integer
    keras = __import__("tf_keras")
    matched = verify.layer_tensors(model, graph)
    order = sorted(matched, key=lambda t: next(i for i, op in enumerate(graph.ops) if t in op["outputs"]))
    probe = keras.Model(model.inputs, [verify._layer_output(model, matched[t]) for t in order])
    keras_out = dict(zip(order, probe.predict(x, verbose=0)))
    env = {**graph.constants, graph.inputs[0]: verify.graph_input(graph, x)}
    rows = []
    for idx, op in enumerate(graph.ops):
        out = op["outputs"][0]
        result = graph.run_op(idx, env, arithmetic="xnnpack")[0]
        env[out] = result
        if out not in keras_out:
            continue
        spec = graph.tensors[out]
        keras_codes = np.round(keras_out[out].reshape(result.shape) / spec.s + spec.z)
        differ = keras_codes != result
        if op["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D") and differ.any() and not op["params"].get("parts"):
            acc = integer.accumulator(graph, idx, op, env)
            if len(op["inputs"]) > 2 and op["inputs"][2] >= 0:
                acc = acc + graph.constants[op["inputs"][2]]
            step = integer.accumulator_steps(graph, op, acc.shape[-1]) / np.float64(spec.s)
            exact = (acc * step + spec.z)[differ]
            values, counts = np.unique(np.round(exact, 6), return_counts=True)
            rows.append({"op_index": idx, "op": op["op"], "layer": matched[out].name, "differing": int(differ.sum()),
                         "values": int(differ.size), "distinct_exact_values": int(len(values)),
                         "largest_repeat": int(counts.max()),
                         "max_distance_to_tie": float(np.max(np.abs(exact - np.floor(exact) - 0.5))),
                         "xnnpack_rounds_like_exact": bool(np.all(result[differ] == np.round(exact)))})
        env[out] = keras_codes.astype(result.dtype)
    return rows


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
    parser.add_argument("--ties", action="store_true",
                        help="also analyse the convolution outputs that differ under XNNPACK (tie_rows)")
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
    if args.ties:
        print("--- convolution outputs that differ under XNNPACK (teacher forced) ---")
        for r in tie_rows(model, flatbuffer, graph, x):
            print(f"{r['op_index']:4d} {r['op'][:18]:18s} {r['layer'][:30]:30s} {r['differing']:6d} of {r['values']:8d}: "
                  f"{r['distinct_exact_values']} distinct exact value(s), largest repeat {r['largest_repeat']}, "
                  f"exact within {r['max_distance_to_tie']:.1e} steps of a tie, XNNPACK rounds like the exact value: "
                  f"{r['xnnpack_rounds_like_exact']}")
    return 0


if __name__ == "__main__":
    main()
