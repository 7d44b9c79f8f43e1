"""Top-level API: ``tfq.quantize_model``, ``tfq.quantize_scope``, ``tfq.calibrate``."""
from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras import quantize as tfmot_quantize
from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

from tfq import graph, schemes
from tfq._keras import check_keras2_model
from tfq.quantizers import base as qbase


def quantize_model(model, method="lsq+", **options):
    """Quantize a float Keras 2 model with a tfq method.

    Same as ``tfmot.quantization.keras.quantize_apply(quantize_annotate_model(model),
    tfq.schemes.get(method, **options))``; ``options`` are the scheme's (``weight_bits``,
    ``activation_bits``, ``first_last_bits``, method-specific ones).
    """
    check_keras2_model(model)
    scheme = schemes.get(method, **options)
    functional = graph.to_functional(model)
    graph.check_structure(functional)
    schemes.check_supported(functional)
    check_finite_weights(functional)
    with quantize_scope():
        quantized = tfmot_quantize.quantize_apply(annotate_model(functional), scheme)
    for layer in quantized.layers:  # tfmot builds its own wrapper class; tfq's adds the fused path
        if type(layer) is quantize_wrapper.QuantizeWrapperV2:
            layer.__class__ = QuantizeWrapperV2
    return quantized


def check_finite_weights(model):
    """Raise a ValueError naming every layer (and weight) holding NaN or Inf values: quantizer
    initialisation from such weights gives NaN scales, and training cannot recover."""
    bad = [f"{layer.name} ({w.name.split('/')[-1].split(':')[0]})" for layer in model.layers for w in layer.weights
           if w.dtype.is_floating and not np.all(np.isfinite(keras.backend.get_value(w)))]
    if bad:
        raise ValueError(f"Model {model.name!r} has NaN or Inf weights in layer(s) {', '.join(bad)}; tfq "
                         "quantizes weights whose values are all finite numbers")


def annotate_model(model):
    """tfmot's quantize_annotate_model for every layer tfmot can wrap; TFOpLambda layers (which
    QuantizeAnnotate breaks) stay bare and are quantized when a neighbour is annotated."""
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_annotate

    def annotate(layer):
        if isinstance(layer, quantize_annotate.QuantizeAnnotate):
            return layer
        if type(layer).__name__ in schemes.UNWRAPPABLE:
            return layer.__class__.from_config(layer.get_config())  # a fresh, uncalled copy
        return quantize_annotate.QuantizeAnnotate(layer)

    with quantize_scope():
        return keras.models.clone_model(model, clone_function=annotate)


@contextlib.contextmanager
def quantize_scope():
    """Deserialisation scope for models holding tfq (and tfmot) objects: use around
    ``tf_keras.models.load_model``."""
    with tfmot_quantize.quantize_scope():
        # entered second so that its names win over tfmot's
        with keras.utils.custom_object_scope({**custom_objects(), "QuantizeWrapperV2": QuantizeWrapperV2}) as scope:
            yield scope


def custom_objects():
    """Every class and function tfq models may hold, by the names their configs use."""
    import tfq.models  # noqa: F401  (registers hard_swish with Keras serialisation)
    import tfq.quantizers  # noqa: F401  (every method module registers its quantizers)
    from tfq import configs
    objects = {cls.__name__: cls for cls in qbase._REGISTRY.values()}
    objects["LayerQuantizeConfig"] = configs.LayerQuantizeConfig
    objects["PositiveConstraint"] = qbase.PositiveConstraint
    from tfq.export.tflite import TFLiteHardSwish  # set by tfq.export.snap_hard_swish
    objects["TFLiteHardSwish"] = TFLiteHardSwish
    objects.update({f"tfq>{name}": obj for name, obj in list(objects.items())})
    return objects


class QuantizeWrapperV2(quantize_wrapper.QuantizeWrapperV2):
    """tfmot's QuantizeWrapperV2 (saved under the same name, so tfmot's loads it too) with two
    changes, used by ``quantize_model`` and when loading:

    * it builds the wrapped layer before the quantizers, so the weight order matches the one saved
      (tfmot's own wrapper creates trainable quantizer variables before the layer's kernel on
      load, which breaks h5 loading);
    * in training calls, an Activation or ReLU layer (``graph.kernel_activation``), or the Multiply
      of tfq's swish, and its output quantizer run as one fused op when the quantizer offers one
      (``fused_activation``; LSQ/LSQ+ with the fused kernels built): one pass forward and one
      backward instead of the activation's own passes plus the quantizer's. The outputs and input
      gradients are those of applying them one after the other, bit for bit; the scale and offset
      gradient sums agree to float rounding (``tests/test_kernels.py``).
    """

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        super().build(input_shape)

    def call(self, inputs, training=None, **kwargs):
        if training is True and self._output_quantizers and not self._weight_vars:
            fused = getattr(self._output_quantizers[0], "fused_activation", None)
            source, activation = self._fusable_activation(inputs)
            if fused is not None and activation is not None:
                outputs = fused(source, activation, self._output_quantizer_vars)
                if outputs is not None:
                    return outputs
        return super().call(inputs, training=training, **kwargs)

    def _fusable_activation(self, inputs):
        """(tensor, kernel activation) such that this layer's output is ``activation(tensor)``:
        an Activation or ReLU layer's input and function, or for the Multiply of tfq's swish
        (``x * q(sigmoid(x))``, see ``graph.split_swish``) x and "quantized_swish"; (None, None)
        otherwise."""
        activation = graph.kernel_activation(self.layer)
        if activation is not None:
            return inputs, activation
        if not hasattr(self, "_swish_source_index"):
            self._swish_source_index = self._find_swish_source()
        if self._swish_source_index is not None:
            return inputs[self._swish_source_index], "quantized_swish"
        return None, None

    def _find_swish_source(self):
        """Index of x when this wraps Multiply([x, gate]) (either order), gate being a sigmoid
        Activation of that same x whose output quantizer is the fixed sigmoid grid; else None."""
        from tfq.quantizers import fixed
        if type(self.layer).__name__ != "Multiply" or len(self._inbound_nodes) != 1:
            return None
        args = self._inbound_nodes[0].call_args
        operands = args[0] if args else None
        if not isinstance(operands, (list, tuple)) or len(operands) != 2:
            return None
        for gate_index in (1, 0):
            gate, source = operands[gate_index], operands[1 - gate_index]
            gate_layer, node_index, _ = getattr(gate, "_keras_history", (None, None, None))
            if not isinstance(gate_layer, quantize_wrapper.QuantizeWrapperV2):
                continue
            quantizers = gate_layer._output_quantizers
            if (type(gate_layer.layer).__name__ != "Activation" or graph.activation_name(gate_layer.layer) != "sigmoid"
                    or len(quantizers) != 1 or quantizers[0] != fixed.FixedRangeQuantizer("sigmoid")):
                continue
            gate_args = gate_layer._inbound_nodes[node_index].call_args
            if gate_args and gate_args[0] is source:
                return 1 - gate_index
        return None


def is_calibrated(model):
    """Whether every quantizer of ``model`` that needs data (or a post-training calibration) has
    had it. A training step traced after that leaves out the initialisation branches, which
    otherwise take most of the time of tracing the first step."""
    return all(bool(w.numpy()) for w in model.weights if qbase.variable_role(w, ["initialized"]))


def calibrate(model, data, steps=1):
    """Initialise data-dependent quantizers from ``steps`` batches without changing anything
    else: runs the quantizers' training-mode initialisation while BatchNorm statistics and
    all other weights are restored afterwards. ``data``: array or tensor of inputs, or a dataset
    of input batches or of (x, y, ...) batches; ``steps``: how many dataset batches to use."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"calibrate: steps must be a positive integer (dataset batches to use), got {steps!r}")
    if isinstance(data, tf.data.Dataset):
        batches = [element[0] if isinstance(element, (tuple, list)) else element for element in data.take(steps)]
    else:
        batches = [tf.convert_to_tensor(data)]
    if not batches:
        raise ValueError("calibrate: data is empty; give at least one batch of example inputs")
    for i, x in enumerate(batches):
        values = np.asarray(x)
        if values.ndim == 0 or values.shape[0] == 0:
            raise ValueError(f"calibrate: data batch {i} is empty (shape {values.shape}); give at least one "
                             "example input")
        if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
            raise ValueError(f"calibrate: data batch {i} contains NaN or Inf values "
                             f"({int(np.size(values) - np.isfinite(values).sum())} of {values.size}); calibration "
                             "needs finite inputs")
    keep = [(w, w.numpy()) for w in model.weights if qbase.variable_role(w) is None]
    for x in batches:
        model(x, training=True)
    for w, value in keep:
        w.assign(value)
    return model
