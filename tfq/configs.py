"""QuantizeConfigs: which weights and which output of a layer get which quantizer.

tfq uses a single config class for every method: ``LayerQuantizeConfig(weight_quantizers,
output_quantizer)``. Which layers get which quantizers is decided by the scheme's layout pass
(``tfq.schemes``), which sees the whole graph (fusion of Conv -> BatchNorm -> ReLU, consumers of a
tensor); the config only applies the decision to one layer.

Activation quantizers are always *output* quantizers of the layer producing the tensor; tfq
splits ``activation=`` arguments into separate layers beforehand, so "the output" is exactly
the tensor the integer model will hold.
"""
from __future__ import annotations

import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras import quantize_config

from tfq.quantizers import base as qbase

#: attribute holding the kernel that the layer's call() reads, per layer class name
KERNEL_ATTRIBUTES = {
    "Conv2D": "kernel",
    "Conv1D": "kernel",
    "Dense": "kernel",
    "DepthwiseConv2D": "depthwise_kernel",
}

#: axes of the kernel that carry one scale per output channel
PER_CHANNEL_AXES = {
    "Conv2D": (3,),          # HWIO
    "Conv1D": (2,),          # WIO
    "DepthwiseConv2D": (2, 3),  # H W C M: output channel = c * M + m
    "Dense": (1,),           # IO
}


def output_channel_axes(layer):
    """Output-channel axes of ``layer``'s kernel (see ``PER_CHANNEL_AXES``)."""
    name = type(layer).__name__
    if name not in PER_CHANNEL_AXES:
        raise ValueError(f"Layer {layer.name!r} of type {name} has no quantizable kernel; "
                         f"supported: {sorted(PER_CHANNEL_AXES)}")
    return PER_CHANNEL_AXES[name]


@keras.utils.register_keras_serializable(package="tfq")
class LayerQuantizeConfig(quantize_config.QuantizeConfig):
    """Quantizers for one layer: ``{attribute: quantizer}`` for weights, one output quantizer."""

    def __init__(self, weight_quantizers=None, output_quantizer=None):
        self.weight_quantizers = {k: qbase.get(v) for k, v in (weight_quantizers or {}).items()}
        self.output_quantizer = qbase.get(output_quantizer) if output_quantizer is not None else None

    def get_weights_and_quantizers(self, layer):
        pairs = []
        for attribute, quantizer in self.weight_quantizers.items():
            if not hasattr(layer, attribute):
                raise ValueError(f"Layer {layer.name!r} ({type(layer).__name__}) has no weight "
                                 f"attribute {attribute!r} to quantize")
            pairs.append((getattr(layer, attribute), quantizer))
        return pairs

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        if len(quantize_weights) != len(self.weight_quantizers):
            raise ValueError(f"Layer {layer.name!r}: expected {len(self.weight_quantizers)} "
                             f"quantized weights, got {len(quantize_weights)}")
        for attribute, value in zip(self.weight_quantizers, quantize_weights):
            setattr(layer, attribute, value)

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def get_config(self):
        return {
            "weight_quantizers": {k: keras.utils.serialize_keras_object(q)
                                  for k, q in self.weight_quantizers.items()},
            "output_quantizer": (keras.utils.serialize_keras_object(self.output_quantizer)
                                 if self.output_quantizer is not None else None),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, LayerQuantizeConfig) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)
