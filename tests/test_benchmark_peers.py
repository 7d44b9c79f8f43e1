"""``benchmarks.common.tfmot_peer``: tfmot's schemes run on mobile_swish, the layers they reject
quantized at the same bit-width by tfmot's own output quantizer."""
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import tfmot_peer  # noqa: E402
from tfq import models  # noqa: E402

HARD_SWISH = ["block2_dw_act", "block2_pw_act", "block3_dw_act", "block3_pw_act", "block5_dw_act", "block5_pw_act"]


@pytest.mark.parametrize("bits", [8, 3])
def test_rejected_layers_get_an_output_quantizer_at_the_same_bits(bits):
    import tf_keras as keras
    keras.utils.set_random_seed(0)
    net = models.mobile_swish()
    peer, annotated = tfmot_peer(net, bits)
    assert sorted(annotated) == sorted(HARD_SWISH + ["block3_se_scale"])
    scale = peer.get_layer("quant_block3_se_scale")
    (quantizer,) = scale.quantize_config.get_output_quantizers(scale.layer)
    assert quantizer.num_bits == bits
    # the float weights were carried over, and in training mode the SE scale's output has at most 2^bits levels
    (kernel,) = [w for w in peer.get_layer("quant_logits").weights if w.name.endswith("kernel:0")]
    np.testing.assert_array_equal(kernel.numpy(), net.get_layer("logits").kernel.numpy())
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    probe = keras.Model(peer.input, peer.get_layer("quant_block3_se_scale").output)
    levels = np.unique(np.round(probe(x, training=True).numpy(), 6))
    assert 2 < len(levels) <= 2 ** bits


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py")
                                        if p.stem != "__init__"))
def test_every_benchmark_module_imports(name):
    """A helper moved between benchmark modules must not leave another one importing it from the old place."""
    importlib.import_module(f"benchmarks.{name}")
