"""Where Keras and TFLite part ways, layer by layer (diagnosis for README "Known limits").

Loads a run directory's ``quantized.h5``, exports it, runs TFLite's builtin kernels (no XNNPACK, so
every intermediate int8 tensor is kept) on the first ``--examples`` test images, and for every
BatchNorm folded into a convolution compares the Keras BatchNorm output with the convolution's int8
output tensor in TFLite, in output steps. Also compares every Keras layer whose name appears in a
TFLite tensor name with the same shape (activations, sigmoid gates, adds, ...). Prints the share of
values more than one step apart, in graph order. A MUL or ADD tensor followed by MINIMUM/MAXIMUM is
compared before those clamps, so only the clamped tensors' rows are like for like there.

    python -m benchmarks.parity_layers runs/demo --examples=50 [--exact_hard_swish]

Read with care: the builtin (and reference) CONV_2D/DEPTHWISE_CONV_2D kernels requantize with a
fixed-point multiplier and double rounding, which at W4A4 (multipliers ~0.3, accumulators of a few
dozen) moves ~10-25% of convolution outputs by one step against ``round(acc * M)``; XNNPACK (the
default runtime, what ``tfq.export.verify`` accepts on) rounds once and equals Keras there. So rows
here grow along the network even where XNNPACK is exact; LOGISTIC and MUL match Keras on the
tensors they are given (tests/test_parity_ops.py). Under XNNPACK the only op that differs from
Keras is HARD_SWISH (1-2 of 256 input codes), which ``--exact_hard_swish`` replaces by a table.
"""
from __future__ import annotations

import argparse

import numpy as np

import tfq  # noqa: F401  (Keras 2 before TensorFlow)
import tf_keras as keras

from tfq import data
from tfq.export import runs, tflite


def _tflite_tensors(flat, x):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    interp = Interpreter(model_content=flat, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    s, z = inp["quantization"]
    details = [d for d in interp.get_tensor_details() if d["dtype"] == np.int8 and d["quantization"][0]]
    per_example = []
    for k in range(len(x)):
        interp.set_tensor(inp["index"], np.clip(np.round(x[k:k + 1] / s) + z, -128, 127).astype(np.int8))
        interp.invoke()
        per_example.append({d["name"]: interp.get_tensor(d["index"]).copy() for d in details})
    return details, per_example


def _match(layer_name, tensor_name, model_name, names):
    """The TFLite tensor holding ``layer_name``'s output: a folded BatchNorm's is its convolution's
    ``add``; other layers' tensors carry the layer name as a path component. A convolution followed
    by a folded BatchNorm has no tensor of its own (its ``add`` is the BatchNorm's output)."""
    first = tensor_name.split(";")[0]
    if layer_name.endswith("_bn"):
        return first.startswith(f"{model_name}/{layer_name[:-3]}/add")
    if f"{layer_name}_bn" in names:
        return False
    return f"/{layer_name}/" in first + "/"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--examples", type=int, default=50)
    parser.add_argument("--exact_hard_swish", action="store_true",
                        help="export hard-swish layers as exact int8 tables (to_tflite(exact_hard_swish=True))")
    args = parser.parse_args(argv)
    model = runs.load_run_model(args.run_dir)
    x, _ = data.load_numpy("fashion_mnist", "test", limit=args.examples)
    details, tensors = _tflite_tensors(tflite.to_tflite(model, exact_hard_swish=args.exact_hard_swish), x)
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    outputs = keras.Model(model.inputs, [l.output for l in layers]).predict(x, verbose=0)
    names = {l.name for l in layers}
    print(f"{'Keras layer':32s} {'TFLite tensor':60s} > 1 step")
    for layer, keras_out in zip(layers, outputs):
        for d in details:
            if not _match(layer.name, d["name"], model.name, names) or tuple(d["shape"][1:]) != keras_out.shape[1:]:
                continue
            scale, zero_point = d["quantization"]
            far = [np.mean(np.abs(keras_out[k:k + 1] / scale + zero_point - t[d["name"]]) > 1 + 1e-3)
                   for k, t in enumerate(tensors)]
            print(f"{layer.name[:32]:32s} {d['name'].split(';')[0][:60]:60s} {100 * np.mean(far):6.2f}%")


if __name__ == "__main__":
    main()
