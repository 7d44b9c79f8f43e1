"""QuantizeSchemes: where quantizers go in a model, for every tfq method.

One layout policy serves all methods; a method only says which quantizer to build for a
weight or an activation (``MethodQuantizers``). The policy, applied by the scheme's layout
transform inside tfmot's ``quantize_apply``:

* Weights of Conv2D, DepthwiseConv2D (and SeparableConv2D, split into the two) and Dense get the
  method's weight quantizer: ``weight_bits``, or ``first_last_bits`` for the first and last
  weighted layers. BatchNormalization stays float during training and is folded at export.
* Every tensor the integer model holds gets an output quantizer on the layer producing it. A
  Conv/Dense output consumed only by a BatchNormalization, and a Conv/Dense/BN output consumed
  only by a ReLU/ReLU6, is not held (the ops fuse), nor are outputs of value-preserving layers
  (Dropout, Flatten, Reshape, MaxPooling, ZeroPadding, ...), which keep their producer's grid.
* A held tensor consumed by a weighted layer is an *activation* and gets ``activation_bits``
  (``first_last_bits`` when that layer is the first or last); every other held tensor (inputs
  of swish/sigmoid/Add/Multiply/Concatenate, model inputs and outputs) is *intermediate* and gets
  ``intermediate_bits`` (8) with an unsigned asymmetric grid, as an int8 graph holds it.
"""
from __future__ import annotations

from tensorflow_model_optimization.python.core.quantization.keras import (quantize_layout_transform,
                                                                          quantize_registry,
                                                                          quantize_scheme)
import tf_keras as keras

from tfq import configs, graph
from tfq.quantizers import base as qbase
from tfq.quantizers import lsq

WEIGHTED = ("Conv2D", "DepthwiseConv2D", "Dense")
BATCH_NORM = ("BatchNormalization",)
PASS_THROUGH = ("Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "Flatten", "Reshape",
                "MaxPooling2D", "GlobalMaxPooling2D", "ZeroPadding2D", "Cropping2D", "Identity",
                "InputLayer", "Permute")
ELEMENTWISE = ("Activation", "ReLU", "Add", "Subtract", "Multiply", "Concatenate", "Average", "Maximum",
               "AveragePooling2D", "GlobalAveragePooling2D", "Rescaling", "Normalization", "Softmax",
               "LeakyReLU", "UpSampling2D", "QuantizeLayer")
SPLIT_BEFORE_QUANTIZATION = ("SeparableConv2D",)
SUPPORTED = WEIGHTED + BATCH_NORM + PASS_THROUGH + ELEMENTWISE + SPLIT_BEFORE_QUANTIZATION + ("TFOpLambda",)
#: TensorFlow ops keras.applications models insert as TFOpLambda layers that tfq handles
SUPPORTED_TF_OPS = ("__operators__.add", "math.add", "math.subtract", "math.multiply", "math.truediv",
                    "nn.relu", "nn.relu6", "math.sigmoid", "nn.silu", "nn.swish", "math.reduce_mean",
                    "math.maximum", "math.minimum", "compat.v1.transpose", "reshape", "concat")
FUSABLE_ACTIVATIONS = ("relu", "relu6", "linear")
#: layers QuantizeWrapper cannot wrap: their output quantizer becomes a QuantizeLayer after them
UNWRAPPABLE = ("TFOpLambda",)


def unsupported_layers(model, skip=()):
    """Names and types of every layer tfq cannot quantize (empty list when all are fine);
    layers named in ``skip`` (those with a user-supplied QuantizeConfig) are not checked."""
    bad = []
    for layer in model.layers:
        if layer.name in skip:
            continue
        kind = type(layer).__name__
        if kind == "TFOpLambda":
            symbol = layer.get_config().get("function")
            if symbol not in SUPPORTED_TF_OPS:
                bad.append(f"{layer.name} (TFOpLambda {symbol})")
        elif isinstance(layer, keras.Model):
            bad.append(f"{layer.name} (nested model {kind})")
        elif kind not in SUPPORTED:
            bad.append(f"{layer.name} ({kind})")
    return bad


def check_supported(model, skip=()):
    bad = unsupported_layers(model, skip)
    if bad:
        raise ValueError(
            f"Model {model.name!r} has layers tfq cannot quantize: {', '.join(bad)}. Supported layer "
            f"types: {', '.join(sorted(SUPPORTED))}; TFOpLambda ops: {', '.join(SUPPORTED_TF_OPS)}. "
            "Annotate a custom layer with tfmot's quantize_annotate_layer(layer, quantize_config) to "
            "supply its QuantizeConfig.")


def _is_fusable_activation(layer):
    kind = type(layer).__name__
    if kind == "ReLU":
        cfg = layer.get_config()
        return (cfg.get("negative_slope", 0) in (0, 0.0) and cfg.get("threshold", 0) in (0, 0.0)
                and cfg.get("max_value") in (None, 6, 6.0))
    if kind == "Activation":
        name = keras.activations.serialize(layer.activation)
        name = name if isinstance(name, str) else name.get("config", {}).get("name", "")
        return name in FUSABLE_ACTIVATIONS
    return False


class MethodQuantizers:
    """What a method contributes to a scheme: its weight and activation quantizers."""

    name = "base"

    def weight_quantizer(self, layer, bits):  # pragma: no cover - interface
        raise NotImplementedError

    def activation_quantizer(self, bits, kind):  # pragma: no cover - interface
        """``kind``: "activation" (input of a weighted layer) or "intermediate"."""
        raise NotImplementedError


class LSQQuantizers(MethodQuantizers):
    def __init__(self, activation_config=4, init="lsq+", weight_init=None):
        if activation_config not in lsq.ACTIVATION_CONFIGS:
            raise ValueError(f"activation_config must be one of {sorted(lsq.ACTIVATION_CONFIGS)} "
                             f"(lsq-plus.txt Table 1), got {activation_config!r}")
        qbase.check_choice(init, lsq.INITS, "init")
        self.activation_config = activation_config
        self.init = init
        self.weight_init = weight_init or init
        self.name = "lsq+" if (activation_config, init) != (1, "lsq") else "lsq"

    def weight_quantizer(self, layer, bits):
        kind = type(layer).__name__
        axes = configs.PER_CHANNEL_AXES[kind] if kind in ("Conv2D", "DepthwiseConv2D") else None
        return lsq.weight_quantizer(bits, per_axis=axes, init=self.weight_init)

    def activation_quantizer(self, bits, kind):
        if kind == "activation":
            return lsq.activation_quantizer(bits, config=self.activation_config, init=self.init)
        # tensors tfq adds at 8 bits (not in the paper): asymmetric, MSE-initialised
        return lsq.activation_quantizer(bits, config=4, init="lsq+")


class TFQScheme(quantize_scheme.QuantizeScheme):
    """A tfmot QuantizeScheme applying the layout policy above with ``quantizers``."""

    def __init__(self, quantizers, weight_bits=4, activation_bits=4, first_last_bits=8, intermediate_bits=8,
                 quantize_inputs=True):
        self.quantizers = quantizers
        self.weight_bits = qbase.check_bits(weight_bits, "weight_bits")
        self.activation_bits = qbase.check_bits(activation_bits, "activation_bits")
        self.first_last_bits = qbase.check_bits(first_last_bits, "first_last_bits")
        self.intermediate_bits = qbase.check_bits(intermediate_bits, "intermediate_bits")
        self.quantize_inputs = quantize_inputs

    def get_layout_transformer(self):
        return _LayoutTransform(self)

    def get_quantize_registry(self):
        return _Registry()

    # --- the policy ------------------------------------------------------------------------
    def plan(self, model, quantize_only=None):
        """``{layer name: LayerQuantizeConfig}`` for a canonical model (see module docstring).
        ``quantize_only``: names of layers to quantize (others stay float)."""
        view = graph.GraphView(model)
        kind = view.type_name
        weighted = [n for n in view.layers if kind(n) in WEIGHTED]
        first, last = self._first_last(view, weighted)
        decisions = {}
        for name, layer in view.layers.items():
            if quantize_only is not None and name not in quantize_only:
                continue
            weights = {}
            if kind(name) in WEIGHTED:
                bits = self.first_last_bits if name in first or name in last else self.weight_bits
                weights[configs.KERNEL_ATTRIBUTES[kind(name)]] = self.quantizers.weight_quantizer(layer, bits)
            output = None
            if self._holds_output(view, name):
                bits, role = self._activation_bits(view, name, first, last)
                output = self.quantizers.activation_quantizer(bits, role)
            if weights or output is not None:
                decisions[name] = configs.LayerQuantizeConfig(weights, output)
        return decisions

    @staticmethod
    def _first_last(view, weighted):
        def reach(start_names, step):
            found, stack, seen = set(), list(start_names), set()
            while stack:
                name = stack.pop()
                for nxt in step(name):
                    if nxt in seen:
                        continue
                    seen.add(nxt)
                    if view.type_name(nxt) in WEIGHTED:
                        found.add(nxt)
                    else:
                        stack.append(nxt)
            return found

        first = reach(view.inputs, lambda n: view.consumers[n])
        last = set()
        for out in view.outputs:
            if view.type_name(out) in WEIGHTED:
                last.add(out)
            else:
                last |= reach([out], lambda n: view.producers[n])
        return first, last

    def _holds_output(self, view, name):
        kind = view.type_name(name)
        if kind in PASS_THROUGH or kind == "QuantizeLayer":
            return False
        consumers = view.consumers[name]
        if name in view.outputs or len(consumers) != 1:
            return True
        consumer = view.layers[consumers[0]]
        if kind in WEIGHTED and type(consumer).__name__ in BATCH_NORM:
            return False
        if kind in WEIGHTED + BATCH_NORM and _is_fusable_activation(consumer):
            return False
        return True

    def _effective_consumers(self, view, name):
        result, stack = [], list(view.consumers[name])
        while stack:
            nxt = stack.pop()
            if view.type_name(nxt) in PASS_THROUGH:
                stack.extend(view.consumers[nxt])
                if nxt in view.outputs:
                    result.append(None)
            else:
                result.append(nxt)
        return result

    def _activation_bits(self, view, name, first, last):
        consumers = self._effective_consumers(view, name)
        if name in view.outputs or None in consumers:
            return self.intermediate_bits, "intermediate"
        weighted = [c for c in consumers if view.type_name(c) in WEIGHTED]
        if weighted and len(weighted) == len(consumers):
            if any(c in first or c in last for c in weighted):
                return self.first_last_bits, "intermediate"
            return self.activation_bits, "activation"
        return self.intermediate_bits, "intermediate"

    def input_quantize_layer(self, input_name):
        if not self.quantize_inputs:
            return None
        quantizer = self.quantizers.activation_quantizer(self.intermediate_bits, "intermediate")
        return _quantize_layer_config(f"{input_name}_quantize", quantizer)


def _quantize_layer_config(name, quantizer):
    """Config of a tfmot QuantizeLayer applying ``quantizer`` (inserted into a model config)."""
    name = name.replace(".", "_")  # TFOpLambda names hold dots, which SavedModel paths cannot
    return {"class_name": "QuantizeLayer", "name": name,
            "config": {"name": name, "quantizer": keras.utils.serialize_keras_object(quantizer),
                       "trainable": True}}


class _LayoutTransform(quantize_layout_transform.QuantizeLayoutTransform):
    def __init__(self, scheme):
        self.scheme = scheme

    def apply(self, model, layer_quantize_map):
        user_configs = {name: entry["quantize_config"] for name, entry in layer_quantize_map.items()
                        if entry.get("quantize_config") is not None}
        annotated = set(layer_quantize_map)
        check_supported(model, set(user_configs))
        new_model, origin = graph.canonicalize(model, self.scheme.input_quantize_layer)
        view = graph.GraphView(model)
        annotated |= {n for n in view.layers if view.type_name(n) in UNWRAPPABLE
                      and any(m in annotated for m in view.producers[n] + view.consumers[n])}
        quantize_only = {name for name, source in origin.items() if source in annotated}
        plan = self.scheme.plan(new_model, quantize_only)
        plan.update({name: cfg for name, cfg in user_configs.items()})
        # Layers tfmot cannot wrap (TFOpLambda) get their output quantizer as a QuantizeLayer.
        unwrappable = [n for n, cfg in plan.items()
                       if type(new_model.get_layer(n)).__name__ in UNWRAPPABLE and n not in user_configs]
        if unwrappable:
            edit = graph.ConfigEdit(new_model)
            for name in unwrappable:
                cfg = plan.pop(name)
                edit.insert_after(name, _quantize_layer_config(f"{name}_quantize", cfg.output_quantizer))
            new_model = edit.build()
        return new_model, {name: {"quantize_config": cfg} for name, cfg in plan.items()}


class _Registry(quantize_registry.QuantizeRegistry):
    """Layers the layout transform did not configure stay float."""

    def supports(self, layer):
        return False

    def get_quantize_config(self, layer):
        return None


# --- method registry -----------------------------------------------------------------------
_METHODS = {}


def register_method(name, builder):
    """``builder(**options) -> TFQScheme``; used by ``tfq.quantize_model(method=name)``."""
    _METHODS[name] = builder


def get(method, **options):
    """The scheme for ``method`` (see ``methods()``) with its options."""
    if isinstance(method, quantize_scheme.QuantizeScheme):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be applied to a scheme instance")
        return method
    if method not in _METHODS:
        raise ValueError(f"Unknown method {method!r}; available: {methods()}")
    return _METHODS[method](**options)


def methods():
    return sorted(_METHODS)


def LSQScheme(weight_bits=4, activation_bits=4, activation_config=4, init="lsq+", first_last_bits=8,
              intermediate_bits=8, weight_init=None, quantize_inputs=True):
    """LSQ+ (lsq-plus.txt): ``activation_config`` 1..4 of Table 1, ``init`` lsq+/lsq/minmax."""
    return TFQScheme(LSQQuantizers(activation_config, init, weight_init), weight_bits, activation_bits,
                     first_last_bits, intermediate_bits, quantize_inputs)


def _lsq_plain(weight_bits=4, activation_bits=4, first_last_bits=8, intermediate_bits=8, **options):
    if options.get("activation_config", 1) != 1:
        raise ValueError("method='lsq' is LSQ+ configuration 1 with LSQ init; use method='lsq+' "
                         "for activation_config 2..4")
    options.pop("activation_config", None)
    options.setdefault("init", "lsq")
    return LSQScheme(weight_bits, activation_bits, 1, first_last_bits=first_last_bits,
                     intermediate_bits=intermediate_bits, **options)


register_method("lsq+", LSQScheme)
register_method("lsq", _lsq_plain)


# --- N2UQ (n2uq.txt) -----------------------------------------------------------------------
# (N2UQ section)

# --- DDQ (ddq.txt) -------------------------------------------------------------------------
# (DDQ section)

# --- AdaQAT (adaqat.txt) -------------------------------------------------------------------
# (AdaQAT section)
