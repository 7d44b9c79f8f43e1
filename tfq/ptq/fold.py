"""BatchNormalization folding (pwlq.txt sec. 5: "we apply batch normalization folding [23]
before quantization").

A BatchNormalization computes ``y = gamma (x - mean) / sqrt(var + eps) + beta`` per channel with
its moving statistics at inference. When ``x`` is the output of a linear layer with kernel ``W``
and bias ``b`` (Conv2D, DepthwiseConv2D, SeparableConv2D, Dense; no ``activation=``) whose only
consumer is the BN, the pair equals that layer with

    W' = W * a  (per output channel),   b' = a (b - mean) + beta,   a = gamma / sqrt(var + eps)

(``gamma = 1`` without ``scale``, ``beta = 0`` without ``center``). ``fold_batch_norms`` returns a
new Functional model without those BN layers; a folded layer gets a bias if it had none. Every
other layer, including ``activation=`` arguments, is kept as it was.
"""
from __future__ import annotations

import numpy as np
import tf_keras as keras

from tfq import graph

#: layer type -> (kernel attribute scaled by the BN factor, axes of that kernel that index the
#: output channel); DepthwiseConv2D's output channel is c * M + m over its (C, M) axes
FOLDABLE = {
    "Conv2D": ("kernel", (3,)),
    "Dense": ("kernel", (1,)),
    "DepthwiseConv2D": ("depthwise_kernel", (2, 3)),
    "SeparableConv2D": ("pointwise_kernel", (3,)),
}


def _is_linear(layer):
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear


def foldable_pairs(model):
    """``[(layer name, batch-norm name)]`` that ``fold_batch_norms`` folds: a BatchNormalization
    on the last axis whose single producer is a linear Conv2D/DepthwiseConv2D/SeparableConv2D/
    Dense (channels-last) that feeds nothing else and is not a model output."""
    functional = graph.to_functional(model)
    graph.check_structure(functional)
    view = graph.GraphView(functional)
    pairs = []
    for name, layer in view.layers.items():
        if not isinstance(layer, keras.layers.BatchNormalization) or len(view.producers[name]) != 1:
            continue
        producer_name = view.producers[name][0]
        producer = view.layers[producer_name]
        if type(producer).__name__ not in FOLDABLE or not _is_linear(producer):
            continue
        if view.consumers[producer_name] != [name] or producer_name in view.outputs:
            continue
        if getattr(producer, "data_format", "channels_last") != "channels_last":
            continue
        rank = len(layer.input_shape)
        if [a % rank for a in layer.axis] != [rank - 1]:
            continue
        pairs.append((producer_name, name))
    return pairs


def batch_norm_factors(bn):
    """``(a, c)`` with ``bn(x) = a * x + c`` per channel at inference (float64)."""
    mean = np.asarray(bn.moving_mean.numpy(), np.float64)
    var = np.asarray(bn.moving_variance.numpy(), np.float64)
    gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta.numpy(), np.float64) if bn.center else np.zeros_like(mean)
    a = gamma / np.sqrt(var + bn.epsilon)
    return a, beta - a * mean


def folded_weights(layer, bn):
    """The weights (``get_weights`` order, with a bias) of ``layer`` followed by ``bn``."""
    kind = type(layer).__name__
    attribute, axes = FOLDABLE[kind]
    a, c = batch_norm_factors(bn)
    kernel = getattr(layer, attribute)
    k = np.asarray(kernel.numpy(), np.float64)
    shape = [1] * k.ndim
    for axis in axes:
        shape[axis] = k.shape[axis]
    new_kernel = (k * a.reshape(shape)).astype(kernel.dtype.as_numpy_dtype)
    bias = np.asarray(layer.bias.numpy(), np.float64) if layer.use_bias else np.zeros_like(a)
    new_bias = (a * bias + c).astype(kernel.dtype.as_numpy_dtype)
    if kind == "SeparableConv2D":
        return [layer.depthwise_kernel.numpy(), new_kernel, new_bias]
    return [new_kernel, new_bias]


def fold_batch_norms(model, add_missing_biases=False):
    """A new Functional float model in which every BN of ``foldable_pairs(model)`` is folded
    into the layer before it (see module docstring). Outputs equal the original model's at
    inference up to float rounding; the input model is not modified.

    ``add_missing_biases=True`` also gives every other Conv2D/DepthwiseConv2D/SeparableConv2D/
    Dense layer a (zero) bias, so that later corrections have a bias to go to.
    """
    functional = graph.to_functional(model)
    pairs = foldable_pairs(functional)
    edit = graph.ConfigEdit(functional)
    config = edit.config
    folded = dict(pairs)
    bn_names = set(folded.values())
    for layer_cfg in config["layers"]:
        if layer_cfg["name"] in folded or (add_missing_biases and layer_cfg["class_name"] in FOLDABLE):
            layer_cfg["config"]["use_bias"] = True
    for layer_name, bn_name in pairs:
        graph._redirect(config, bn_name, layer_name)
    config["layers"] = [cfg for cfg in config["layers"] if cfg["name"] not in bn_names]

    from tfq.api import quantize_scope
    with quantize_scope():
        new_model = keras.Model.from_config(config)
    source = {layer.name: layer for layer in functional.layers}
    for layer in new_model.layers:
        if not layer.weights:
            continue
        old = source[layer.name]
        if layer.name in folded:
            layer.set_weights(folded_weights(old, source[folded[layer.name]]))
        elif type(layer).__name__ in FOLDABLE and not old.use_bias and layer.use_bias:
            bias = np.zeros(layer.bias.shape, layer.bias.dtype.as_numpy_dtype)
            layer.set_weights(old.get_weights() + [bias])
        else:
            layer.set_weights(old.get_weights())
    return new_model
