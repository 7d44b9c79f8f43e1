"""Fixed output grids of ops whose int8 TFLite kernels have a fixed output quantization.

TFLite's int8 LOGISTIC and SOFTMAX always produce scale 1/256, zero point -128 (codes 0..255 of
[0, 1)), TANH scale 1/128, zero point 0. A learned grid on their outputs would force a requantising
QUANTIZE op after them in the integer model and a second rounding the trained model never saw, so
tfq schemes give these tensors the fixed grid instead (whatever the method).
"""
from __future__ import annotations

import tensorflow as tf

from tfq import graph, kernels
from tfq.quantizers import base
from tfq.quantizers.grid import UniformGrid

#: op -> (scale, zero point, qmin, qmax) with codes as in ``UniformGrid`` (unsigned for [0, 1))
FIXED_RANGES = {
    "sigmoid": (1.0 / 256.0, 0, 0, 255),
    "softmax": (1.0 / 256.0, 0, 0, 255),
    "tanh": (1.0 / 128.0, 0, -128, 127),
}


@tf.custom_gradient
def _fixed_fake_quant(x, scale, qmin, qmax):
    codes = tf.clip_by_value(tf.round(x / scale), qmin, qmax)

    def grad(dy):  # straight-through inside the range (the op's output is always inside)
        inside = tf.cast((x >= qmin * scale) & (x <= qmax * scale), dy.dtype)
        return dy * inside, None, None, None

    return codes * scale, grad


@base.register("fixed_range")
class FixedRangeQuantizer(base.TFQQuantizer):
    """8-bit grid fixed by the op producing the tensor (``op`` in ``FIXED_RANGES``)."""

    data_dependent_init = False

    def __init__(self, op="sigmoid"):
        base.check_choice(op, FIXED_RANGES, "op")
        super().__init__(op=op)
        self.op = op
        self.scale, self.zero_point, self.qmin, self.qmax = FIXED_RANGES[op]
        self.bits = 8

    def effective_bits(self, weights):
        return tf.constant(8.0)

    def build(self, tensor_shape, name, layer):
        self._name = name
        return {}  # nothing to learn or calibrate: no variables, not even an init flag

    def _forward(self, inputs, training, weights):
        x = tf.convert_to_tensor(inputs)
        scale, offset = tf.constant(self.scale), tf.constant(0.0)
        if training is True and kernels.fusable(x, scale, offset):
            # the fused LSQ kernels give the same values here: the scales are powers of two, so
            # x / scale is exact and clip-then-round equals round-then-clip on integer bounds
            return kernels.fake_quant(x, scale, offset, self.qmin, self.qmax, 0.0)
        return _fixed_fake_quant(x, scale, tf.constant(float(self.qmin)), tf.constant(float(self.qmax)))

    def integer_grid(self, weights):
        return UniformGrid(scale=self.scale, zero_point=self.zero_point, bits=8, qmin=self.qmin,
                           qmax=self.qmax)


def fixed_range_op(layer):
    """The ``FIXED_RANGES`` key of a layer whose output range is fixed in TFLite, or None."""
    kind = type(layer).__name__
    if kind == "Softmax":
        return "softmax"
    if kind == "Activation":
        name = graph.activation_name(layer)
        return name if name in FIXED_RANGES else None
    if kind == "TFOpLambda":
        symbol = layer.get_config().get("function")
        return {"math.sigmoid": "sigmoid", "nn.softmax": "softmax", "math.tanh": "tanh"}.get(symbol)
    return None
