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
* Outputs of sigmoid, softmax and tanh get the fixed 8-bit grid TFLite's int8 kernels produce
  (``tfq.quantizers.fixed``), for every method.
"""
from __future__ import annotations

from tensorflow_model_optimization.python.core.quantization.keras import (quantize_layout_transform,
                                                                          quantize_registry,
                                                                          quantize_scheme)
import tf_keras as keras

from tfq import configs, graph
from tfq.quantizers import base as qbase
from tfq.quantizers import fixed, lsq

WEIGHTED = ("Conv2D", "DepthwiseConv2D", "Dense")
BATCH_NORM = ("BatchNormalization",)
PASS_THROUGH = graph.VALUE_PRESERVING
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
        if kind == "QuantizeAnnotate":
            if getattr(layer, "quantize_config", None) is not None:
                continue  # the user's QuantizeConfig says how to quantize it
            layer, kind = layer.layer, type(layer.layer).__name__
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
    if kind == "ReLU":  # plain ReLU or ReLU6, as the fused kernels recognise them
        return graph.kernel_activation(layer) is not None
    if kind == "Activation":
        return graph.activation_name(layer) in FUSABLE_ACTIVATIONS
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
    def __init__(self, activation_config=4, init="lsq+", weight_init=None, narrow_range_weights=False,
                 scale_parameterization="log", scale_lr_multiplier=1.0):
        if activation_config not in lsq.ACTIVATION_CONFIGS:
            raise ValueError(f"activation_config must be one of {sorted(lsq.ACTIVATION_CONFIGS)} "
                             f"(lsq-plus.txt Table 1), got {activation_config!r}")
        qbase.check_choice(init, lsq.INITS, "init")
        self.scale_options = {"scale_parameterization": scale_parameterization,
                              "scale_lr_multiplier": scale_lr_multiplier}
        lsq.LSQQuantizer(**self.scale_options)  # the quantizer's own checks, before any layer is built
        self.activation_config = activation_config
        self.init = init
        self.weight_init = weight_init or init
        self.narrow_range_weights = bool(narrow_range_weights)
        self.name = "lsq+" if (activation_config, init) != (1, "lsq") else "lsq"

    def weight_quantizer(self, layer, bits):
        kind = type(layer).__name__
        axes = configs.PER_CHANNEL_AXES[kind] if kind in ("Conv2D", "DepthwiseConv2D") else None
        narrow = True if self.narrow_range_weights else bits == 8
        return lsq.weight_quantizer(bits, per_axis=axes, init=self.weight_init, narrow_range=narrow,
                                    **self.scale_options)

    def activation_quantizer(self, bits, kind):
        if kind == "activation":
            return lsq.activation_quantizer(bits, config=self.activation_config, init=self.init,
                                            **self.scale_options)
        # tensors tfq adds at 8 bits (not in the paper): asymmetric, MSE-initialised
        return lsq.activation_quantizer(bits, config=4, init="lsq+", **self.scale_options)


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
                fixed_op = fixed.fixed_range_op(layer)
                if fixed_op is not None:  # TFLite fixes this op's output grid
                    output = fixed.FixedRangeQuantizer(fixed_op)
                else:
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
_TRAINING_CALLBACKS = {}


def register_method(name, builder, training_callbacks=None):
    """``builder(**options) -> TFQScheme``; used by ``tfq.quantize_model(method=name)``.
    ``training_callbacks(weight_bits, method_options, log_dir, **callback_options) -> [Callback]``:
    the Keras callbacks the method trains with (``tfq.train`` attaches them); an empty list when the
    method's options need none."""
    _METHODS[name] = builder
    if training_callbacks is not None:
        _TRAINING_CALLBACKS[name] = training_callbacks


def training_callbacks(method, weight_bits, method_options=None, log_dir=None, callback_options=None):
    """The callbacks ``method`` (quantized with ``method_options``) trains with; ``callback_options``
    go to them and are an error for a method that trains without a callback."""
    factory = _TRAINING_CALLBACKS.get(method)
    options = dict(callback_options or {})
    callbacks = factory(weight_bits, dict(method_options or {}), log_dir, **options) if factory else []
    if options and not callbacks:
        with_callback = ", ".join(f"{name!r}" for name in sorted(_TRAINING_CALLBACKS))
        raise ValueError(f"callback_options={options!r} given, but method={method!r} trains without a "
                         f"callback (methods with one: {with_callback}; 'ddq' in mixed mode only)")
    return callbacks


def get(method, **options):
    """The scheme for ``method`` (see ``methods()``) with its options."""
    if isinstance(method, quantize_scheme.QuantizeScheme):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be applied to a scheme instance")
        return method
    if method not in _METHODS:
        raise ValueError(f"Unknown method {method!r}; available: {methods()}")
    accepted = method_options(method)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise TypeError(f"method {method!r} has no option(s) {', '.join(unknown)}; its options: "
                        f"{', '.join(accepted)}")
    return _METHODS[method](**options)


def method_options(method):
    """Names of the options ``quantize_model(method=method, **options)`` accepts, or None when they
    cannot be read from the builder's signature. A builder taking ``**options`` forwards them to the
    schemes.py function(s) it calls, whose parameters are included."""
    import dis
    import inspect

    def names(function, seen):
        if function in seen:
            return set(), True
        seen.add(function)
        found, complete = set(), True
        for p in inspect.signature(function).parameters.values():
            if p.kind == p.VAR_KEYWORD:
                loaded = {i.argval for i in dis.get_instructions(function) if i.opname == "LOAD_GLOBAL"}
                callees = [function.__globals__.get(n) for n in sorted(loaded)]
                callees = [c for c in callees if inspect.isfunction(c) and c.__module__ == __name__]
                if not callees:
                    return found, False
                for callee in callees:
                    more, ok = names(callee, seen)
                    found |= more
                    complete = complete and ok
            elif p.kind != p.VAR_POSITIONAL:
                found.add(p.name)
        return found, complete

    found, complete = names(_METHODS[method], set())
    return sorted(found) if complete else None


def methods():
    return sorted(_METHODS)


def LSQScheme(weight_bits=4, activation_bits=4, activation_config=4, init="lsq+", first_last_bits=8,
              intermediate_bits=8, weight_init=None, quantize_inputs=True, narrow_range_weights=False,
              scale_parameterization="log", scale_lr_multiplier=1.0):
    """LSQ+ (lsq-plus.txt): ``activation_config`` 1..4 of Table 1, ``init`` lsq+/lsq/minmax.

    ``narrow_range_weights``: symmetric weight codes [-(2^(b-1)-1), 2^(b-1)-1] at every bit-width
    (always at 8 bits). Needed for INT4 storage of BatchNorm-folded layers: a negative gamma negates
    the codes, and -8 has no INT4 negative.

    ``scale_parameterization``: "log" (default; scales train as log s, so Adam's steps are relative)
    or "linear" (the paper's s, for SGD); ``scale_lr_multiplier`` k: log(s)/k is trained, so each
    Adam step changes s by about k times the learning rate. See ``tfq.quantizers.lsq``.
    """
    return TFQScheme(LSQQuantizers(activation_config, init, weight_init, narrow_range_weights,
                                   scale_parameterization, scale_lr_multiplier), weight_bits,
                     activation_bits, first_last_bits, intermediate_bits, quantize_inputs)


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
class N2UQQuantizers(MethodQuantizers):
    """N2UQ weights (2..7 bits, per output channel) and N2UQ activations for inputs of weighted
    layers. 8-bit weights (the first and last layers by default, kept at higher precision as in
    the paper) use LSQ+ weights, since N2UQ's odd-code grid needs bits + 1 <= 8; intermediate
    tensors (and inputs of the first/last layers) use LSQ+ config 4 like every tfq method."""

    name = "n2uq"

    def __init__(self, param_lr_scale=0.1, input_init="lsq+", init="data"):
        from tfq.quantizers import n2uq
        # validates the arguments
        n2uq.N2UQActivationQuantizer(2, param_lr_scale=param_lr_scale, input_init=input_init, init=init)
        self.param_lr_scale = float(param_lr_scale)
        self.input_init = input_init
        self.init = init

    def weight_quantizer(self, layer, bits):
        from tfq.quantizers import n2uq
        if bits > n2uq.MAX_WEIGHT_BITS:
            return LSQQuantizers().weight_quantizer(layer, bits)
        return n2uq.N2UQWeightQuantizer(bits, per_axis=configs.output_channel_axes(layer))

    def activation_quantizer(self, bits, kind):
        from tfq.quantizers import n2uq
        if kind == "activation":
            return n2uq.N2UQActivationQuantizer(bits, param_lr_scale=self.param_lr_scale,
                                                input_init=self.input_init, init=self.init)
        return lsq.activation_quantizer(bits, config=4, init="lsq+")


def N2UQScheme(weight_bits=2, activation_bits=2, first_last_bits=8, param_lr_scale=0.1, init="data",
               input_init="lsq+", intermediate_bits=8, quantize_inputs=True):
    """N2UQ (n2uq.txt): ``weight_bits`` 2..7; ``param_lr_scale`` is the learning-rate factor of the
    activation thresholds, start and scales (paper: 1/10), valid for any optimizer (see
    ``tfq.quantizers.n2uq``); ``init`` "data" (default: each quantizer starts equal to an LSQ+
    quantizer fitted to the first batch, so a pretrained model's activations and BatchNorm
    statistics still match) or "paper" (sec. 4.1: uniform on [0, 2], beta1 = beta2 = 1; after a
    short fine-tuning BatchNorm's moving statistics still hold the float model's, see
    docs/n2uq.md); ``input_init`` initialises the 8-bit grid the thresholds act on."""
    from tfq.quantizers import n2uq
    qbase.check_bits(weight_bits, "weight_bits", high=n2uq.MAX_WEIGHT_BITS)
    return TFQScheme(N2UQQuantizers(param_lr_scale, input_init, init), weight_bits, activation_bits,
                     first_last_bits, intermediate_bits, quantize_inputs)


register_method("n2uq", N2UQScheme)

# --- DDQ (ddq.txt) -------------------------------------------------------------------------
# (DDQ section)
class DDQQuantizers(MethodQuantizers):
    """ddq.txt: DDQ weights (learned levels; learned bit-width in ``mode="mixed"``) and DDQ
    activations for inputs of weighted layers (learned levels on an 8-bit LSQ+ grid, fixed bits).

    ``weight_quantizer(layer, bits)`` gets ``target_bits`` for the middle layers: in mixed mode
    they start at ``max_bits`` with trainable gates (``tfq.callbacks.DDQGateSchedule`` brings the
    footprint to ``target_bits`` per weight); any other ``bits`` (first/last layers) and fixed mode
    give a fixed-precision DDQ quantizer (DDQ(fix)). Conv/DepthwiseConv kernels have levels per
    output channel, Dense kernels per tensor; gates are per layer."""

    name = "ddq"

    def __init__(self, target_bits=4, mode="mixed", max_bits=8, min_bits=2, level_bits=8, grad_correction=0.1):
        from tfq.quantizers import ddq
        qbase.check_choice(mode, ("mixed", "fixed"), "mode")
        self.target_bits = qbase.check_bits(target_bits, "target_bits")
        self.mode = mode
        self.max_bits = qbase.check_bits(max_bits, "max_bits", high=level_bits)
        if mode == "mixed" and max_bits < target_bits:
            raise ValueError(f"max_bits ({max_bits}) must be >= target_bits ({target_bits}) in mixed mode")
        self.min_bits = min_bits
        self.level_bits = level_bits
        self.grad_correction = grad_correction
        ddq.DDQQuantizer(max_bits, min(min_bits, max_bits), level_bits, grad_correction=grad_correction)  # validates

    def weight_quantizer(self, layer, bits):
        from tfq.quantizers import ddq
        kind = type(layer).__name__
        axes = configs.PER_CHANNEL_AXES[kind] if kind in ("Conv2D", "DepthwiseConv2D") else None
        mixed = self.mode == "mixed" and bits == self.target_bits
        max_bits = self.max_bits if mixed else bits
        return ddq.weight_quantizer(max_bits, per_axis=axes, min_bits=min(self.min_bits, max_bits),
                                    level_bits=max(self.level_bits, max_bits), grad_correction=self.grad_correction,
                                    fixed=not mixed)

    def activation_quantizer(self, bits, kind):
        from tfq.quantizers import ddq
        if kind == "activation":
            return ddq.activation_quantizer(bits, min_bits=min(self.min_bits, bits), level_bits=8,
                                            grad_correction=self.grad_correction, fixed=True)
        return lsq.activation_quantizer(bits, config=4, init="lsq+")


def DDQScheme(target_bits=None, activation_bits=8, mode="mixed", max_bits=8, min_bits=2, level_bits=8,
              grad_correction=0.1, first_last_bits=8, intermediate_bits=8, quantize_inputs=True, weight_bits=None):
    """DDQ (ddq.txt). ``target_bits`` (alias ``weight_bits``; default 4): the weight-memory budget in
    bits per weight (``mode="mixed"``, layers start at ``max_bits`` and stay >= ``min_bits``) or the
    weights' bits (``mode="fixed"``, DDQ(fix)); ``grad_correction``: lambda of eq. 9 (0 turns the
    correction off; the paper gives no value: 0.1 makes lambda (x_q - x) as large as dL/dx_q for
    typical mobile_swish kernels);
    ``level_bits``: the grid of the levels (eq. 4, b_q = 8); first/last layers at ``first_last_bits``."""
    if target_bits is not None and weight_bits is not None and target_bits != weight_bits:
        raise ValueError(f"target_bits ({target_bits}) and weight_bits ({weight_bits}) name the same "
                         "setting for DDQ; give one")
    target = target_bits if target_bits is not None else (weight_bits if weight_bits is not None else 4)
    quantizers = DDQQuantizers(target, mode, max_bits, min_bits, level_bits, grad_correction)
    return TFQScheme(quantizers, target, activation_bits, first_last_bits, intermediate_bits, quantize_inputs)


def _ddq_callbacks(weight_bits, method_options, log_dir, **options):
    """Mixed mode trains with the gate schedule toward ``target_bits`` (default ``weight_bits``)."""
    if method_options.get("mode", "mixed") != "mixed":
        return []
    from tfq.callbacks import DDQGateSchedule
    return [DDQGateSchedule(method_options.get("target_bits", weight_bits), log_dir=log_dir, **options)]


register_method("ddq", DDQScheme, training_callbacks=_ddq_callbacks)

# --- AdaQAT (adaqat.txt) -------------------------------------------------------------------
# (AdaQAT section)
class AdaQATQuantizers(MethodQuantizers):
    """adaqat.txt sec. III-A: DoReFa weights (SAT rescaling) and PACT activations whose bits are
    ceil(N_w), ceil(N_a) (learned by ``tfq.callbacks.AdaQAT``). The first and last layers stay at
    ``first_last_bits`` with LSQ+ weights (an 8-bit DoReFa grid needs 9-bit codes, beyond int8);
    "intermediate" tensors get LSQ+ configuration 4 as in every tfq scheme."""

    name = "adaqat"

    def __init__(self, init_weight_bits, init_activation_bits, alpha_init=8.0, rescale="constant",
                 signed_activations="asymmetric"):
        from tfq.quantizers import adaqat
        self.init_weight_bits = qbase.check_bits(init_weight_bits, "init_weight_bits")
        self.init_activation_bits = qbase.check_bits(init_activation_bits, "init_activation_bits")
        adaqat.DoReFaWeightQuantizer(init_weight_bits, rescale)   # validates rescale now
        adaqat.PACTQuantizer(init_activation_bits, alpha_init)    # validates alpha_init now
        qbase.check_choice(signed_activations, SIGNED_PACT_GRIDS, "signed_activations")
        self.signed_activations = signed_activations
        self.alpha_init = alpha_init
        self.rescale = rescale
        self.fixed_layers = set()  # names of the first and last weighted layers (set by the scheme)

    def weight_quantizer(self, layer, bits):
        from tfq.quantizers import adaqat
        if layer.name in self.fixed_layers:
            kind = type(layer).__name__
            axes = configs.PER_CHANNEL_AXES[kind] if kind in ("Conv2D", "DepthwiseConv2D") else None
            return lsq.weight_quantizer(bits, per_axis=axes, init="lsq+")
        return adaqat.DoReFaWeightQuantizer(init_bits=self.init_weight_bits, rescale=self.rescale)

    def activation_quantizer(self, bits, kind):
        from tfq.quantizers import adaqat
        if kind == "activation":
            return adaqat.PACTQuantizer(init_bits=self.init_activation_bits, alpha_init=self.alpha_init)
        return lsq.activation_quantizer(bits, config=4, init="lsq+")


#: grids of PACT on tensors that can be negative: [-alpha, alpha], or a calibrated share below zero
SIGNED_PACT_GRIDS = ("asymmetric", "symmetric")
#: producers whose output is never negative (PACT's unsigned grid fits them)
_NON_NEGATIVE_ACTIVATIONS = ("relu", "relu6", "sigmoid", "hard_sigmoid", "softmax", "softplus", "exponential")
_NON_NEGATIVE_TF_OPS = ("nn.relu", "nn.relu6", "math.sigmoid")
#: layers whose output is non-negative when all their inputs are
_SIGN_PRESERVING = PASS_THROUGH + ("Add", "Multiply", "Concatenate", "Average", "Maximum", "AveragePooling2D",
                                   "GlobalAveragePooling2D", "UpSampling2D", "QuantizeLayer")


def _non_negative(view, name):
    """Whether layer ``name``'s output is >= 0 by construction (ReLU-like, or built from such)."""
    layer, kind = view.layers[name], view.type_name(name)
    if kind == "ReLU":
        return layer.get_config().get("negative_slope", 0) in (0, 0.0)
    if kind == "Activation":
        return graph.activation_name(layer) in _NON_NEGATIVE_ACTIVATIONS
    if kind == "TFOpLambda":
        return layer.get_config().get("function") in _NON_NEGATIVE_TF_OPS
    if kind in _SIGN_PRESERVING and kind != "InputLayer":
        producers = view.producers[name]
        return bool(producers) and all(_non_negative(view, p) for p in producers)
    return False


class _AdaQATTFQScheme(TFQScheme):
    """TFQScheme that tells its quantizers which weighted layers are first/last (fixed bits) and
    gives PACT's signed variant (``signed_activations``: asymmetric or symmetric grid) to tensors
    that can be negative (swish, residual sums, ...)."""

    def _first_last(self, view, weighted):
        first, last = TFQScheme._first_last(view, weighted)
        self.quantizers.fixed_layers = set(first) | set(last)
        return first, last

    def plan(self, model, quantize_only=None):
        from tfq.quantizers import adaqat
        decisions = super().plan(model, quantize_only)
        view = graph.GraphView(model)
        for name, decision in decisions.items():
            q = decision.output_quantizer
            if isinstance(q, adaqat.PACTQuantizer) and not _non_negative(view, name):
                asymmetric = self.quantizers.signed_activations == "asymmetric"
                decision.output_quantizer = adaqat.PACTQuantizer(q.init_bits, q.alpha_init, signed=True,
                                                                 asymmetric=asymmetric)
        return decisions


def AdaQATScheme(init_weight_bits=8, init_activation_bits=8, first_last_bits=8, intermediate_bits=8,
                 quantize_inputs=True, alpha_init=8.0, rescale="constant", signed_activations="asymmetric"):
    """AdaQAT (adaqat.txt): learned shared bit-widths starting at ``init_weight_bits`` /
    ``init_activation_bits``; train with the ``tfq.callbacks.AdaQAT`` callback.
    ``signed_activations``: PACT grid of tensors that can be negative, "asymmetric" (a share of
    the steps below zero calibrated from the first batch) or "symmetric" ([-alpha, alpha])."""
    quantizers = AdaQATQuantizers(init_weight_bits, init_activation_bits, alpha_init, rescale,
                                  signed_activations)
    return _AdaQATTFQScheme(quantizers, init_weight_bits, init_activation_bits, first_last_bits,
                            intermediate_bits, quantize_inputs)


def _adaqat_method(weight_bits=None, activation_bits=None, **options):
    """``quantize_model(method="adaqat", weight_bits=..., activation_bits=...)``: the bits are the
    initial N_w, N_a (aliases of ``init_weight_bits``/``init_activation_bits``)."""
    for given, option, alias in ((weight_bits, "init_weight_bits", "weight_bits"),
                                 (activation_bits, "init_activation_bits", "activation_bits")):
        if given is not None:
            if option in options:
                raise ValueError(f"method='adaqat': give {alias} or {option}, not both")
            options[option] = given
    return AdaQATScheme(**options)


def _adaqat_callbacks(weight_bits, method_options, log_dir, **options):
    """The bit-width updates (``tfq.callbacks.AdaQAT``)."""
    from tfq.callbacks import AdaQAT
    return [AdaQAT(log_dir=log_dir, **options)]


register_method("adaqat", _adaqat_method, training_callbacks=_adaqat_callbacks)
