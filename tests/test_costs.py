"""tfq.costs: per-layer params, MACs, bits, memory and BitOPs against hand counts."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq import costs


def _model():
    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(x)       # 3*3*3*4 = 108 params
    y = keras.layers.ReLU()(y)
    y = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(y)      # 3*3*4 = 36, out 4x4
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(6, 1)(y)                                       # 24 params, out 4x4
    y = keras.layers.ReLU()(y)
    y = keras.layers.Flatten()(y)
    y = keras.layers.Dense(5)(y)                                           # 96*5 = 480
    return keras.Model(x, y)


def test_float_model_counts_params_and_macs():
    rows = costs.layer_costs(_model())
    assert [(r.kind, r.params, r.macs) for r in rows] == [
        ("Conv2D", 108, 64 * 108), ("DepthwiseConv2D", 36, 16 * 36), ("Conv2D", 24, 16 * 24), ("Dense", 480, 480)]
    assert float(costs.weight_memory(_model())) == 32.0 * (108 + 36 + 24 + 480)


def test_quantized_model_bits_memory_and_bitops():
    q = tfq.quantize_model(_model(), method="lsq+", weight_bits=4, activation_bits=3, first_last_bits=8)
    rows = costs.layer_costs(q)
    wbits = [float(costs.weight_bits(r)) for r in rows]
    abits = [float(costs.activation_bits(r)) for r in rows]
    assert wbits == [8.0, 4.0, 4.0, 8.0]
    # first layer reads the 8-bit quantized input; depthwise reads the first layer's ReLU output
    # (an activation of a middle layer: 3 bits); the Dense input passes through Flatten
    assert abits[0] == 8.0 and abits[1] == 3.0 and abits[2] == 3.0 and abits[3] == 8.0
    expected_memory = 108 * 8 + 36 * 4 + 24 * 4 + 480 * 8
    assert float(costs.weight_memory(q)) == expected_memory
    expected_bitops = 64 * 108 * 8 * 8 + 16 * 36 * 4 * 3 + 16 * 24 * 4 * 3 + 480 * 8 * 8
    assert float(costs.bitops(q)) == pytest.approx(expected_bitops)
    table = costs.summary(q)
    assert table[-1]["layer"] == "TOTAL" and table[-1]["weight_bytes"] == expected_memory / 8
    assert "TOTAL" in costs.format_summary(table)
