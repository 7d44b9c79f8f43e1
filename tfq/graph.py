"""Model graph utilities: canonical form for quantization and a read-only view of the graph.

``canonicalize(model)`` returns an equivalent Functional model in which
  * a Sequential model has become Functional,
  * every ``activation=`` argument of Conv2D / DepthwiseConv2D / Dense is a separate
    ``Activation`` layer named ``<layer>_activation``,
  * every SeparableConv2D is a DepthwiseConv2D (``<layer>_depthwise``) followed by a 1x1
    Conv2D keeping the original name,
  * every swish Activation is ``x * sigmoid(x)``: an Activation sigmoid (``<layer>_sigmoid``) and
    a Multiply keeping the original name (the int8 graph's LOGISTIC + MUL),
with identical weights and outputs. It edits the model's config (names are kept), rebuilds it
and copies the weights, so any Functional graph works, including keras.applications models.
"""
from __future__ import annotations

import copy

import tf_keras as keras

from tfq._keras import check_keras2_model

ACTIVATION_SPLIT_LAYERS = ("Conv2D", "DepthwiseConv2D", "Dense", "Conv1D", "SeparableConv2D")


class UnsupportedModelError(ValueError):
    pass


def _is_linear(activation):
    return activation in (None, "linear") or (isinstance(activation, dict)
                                              and activation.get("config", {}).get("name") == "linear")


SWISH_NAMES = ("swish", "silu")
#: layers whose output holds the values of their input: an integer model keeps their producer's grid
VALUE_PRESERVING = ("Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "Flatten", "Reshape",
                    "MaxPooling2D", "GlobalMaxPooling2D", "ZeroPadding2D", "Cropping2D", "Identity",
                    "InputLayer", "Permute")


def activation_name(layer):
    """The registered name of an Activation layer's function ("relu", "swish", "hard_swish", ...)."""
    name = keras.activations.serialize(layer.activation)
    return name if isinstance(name, str) else name.get("config", {}).get("name", "")


#: Activation-layer function names -> the fused kernels' activation (``tfq.kernels.ACTIVATIONS``)
_KERNEL_ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "tfq>hard_swish": "hard_swish"}


def kernel_activation(layer):
    """The fused kernels' name for what an Activation or ReLU layer computes ("relu", "relu6",
    "swish", "hard_swish"), or None for any other layer or function (leaky or thresholded ReLU,
    sigmoid, tfq.export's TFLite hard swish, ...)."""
    kind = type(layer).__name__
    if kind == "ReLU":
        cfg = layer.get_config()
        if float(cfg.get("negative_slope") or 0) != 0 or float(cfg.get("threshold") or 0) != 0:
            return None
        max_value = cfg.get("max_value")
        if max_value is None:
            return "relu"
        return "relu6" if float(max_value) == 6 else None
    if kind == "Activation":
        return _KERNEL_ACTIVATIONS.get(activation_name(layer))
    return None


def _activation_name(layer_cfg):
    activation = layer_cfg["config"].get("activation")
    if isinstance(activation, dict):
        return activation.get("config", {}).get("name") or activation.get("class_name")
    return activation


def to_functional(model):
    """A Functional model sharing ``model``'s layers (Sequential) or ``model`` itself."""
    check_keras2_model(model)
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise ValueError("model must be built (call model.build(input_shape) first)")
        inputs = keras.Input(batch_shape=model.input_shape, name=f"{model.name}_input")
        x = inputs
        for layer in model.layers:
            x = layer(x)
        return keras.Model(inputs, x, name=model.name)
    if not getattr(model, "_is_graph_network", False):
        raise UnsupportedModelError(
            f"Model {model.name!r} ({type(model).__name__}) is a subclassed model; tfq quantizes "
            "Sequential and Functional models (build the network with keras.Input / the "
            "Functional API, or quantize the sub-models it is made of)")
    return model


def check_structure(model):
    """Reject nested models and shared layers, naming all of them."""
    nested = [l.name for l in model.layers if isinstance(l, keras.Model)]
    shared = [l.name for l in model.layers
              if not isinstance(l, keras.layers.InputLayer) and len(_own_nodes(model, l)) > 1]
    problems = []
    if nested:
        problems.append(f"nested models {nested} (flatten them: build one Functional model "
                        "from their layers)")
    if shared:
        problems.append(f"layers called more than once {shared} (each call needs its own "
                        "quantizer statistics: use separate layer instances)")
    if problems:
        raise UnsupportedModelError(f"Model {model.name!r} cannot be quantized: " + "; ".join(problems))


def _own_nodes(model, layer):
    """The inbound nodes of ``layer`` that belong to ``model``'s graph (a layer reused by
    tfmot's model clones has nodes in other graphs too)."""
    keys = getattr(model, "_network_nodes", None)
    if keys is None:
        return list(layer._inbound_nodes)
    return [node for i, node in enumerate(layer._inbound_nodes) if f"{layer.name}_ib-{i}" in keys]


def _replace_refs(obj, old, new):
    """Replace node references ``[old, node, tensor, ...]`` by ``new`` recursively."""
    if isinstance(obj, list):
        if len(obj) >= 3 and obj[0] == old and isinstance(obj[1], int) and isinstance(obj[2], int):
            obj[0] = new
            return obj
        for item in obj:
            _replace_refs(item, old, new)
    elif isinstance(obj, dict):
        for value in obj.values():
            _replace_refs(value, old, new)
    return obj


def _redirect(config, old, new):
    """Every consumer of ``old``'s output (and the model outputs) now reads ``new``."""
    for layer_cfg in config["layers"]:
        _replace_refs(layer_cfg["inbound_nodes"], old, new)
    _replace_refs(config["output_layers"], old, new)


def _unique(name, taken):
    candidate, i = name, 1
    while candidate in taken:
        candidate = f"{name}_{i}"
        i += 1
    taken.add(candidate)
    return candidate


def canonicalize(model, input_layer_factory=None):
    """See module docstring. ``input_layer_factory(input_name) -> layer config dict or None``
    inserts a layer after every model input (used for input quantizers).

    Returns ``(new_model, origin)`` where ``origin[new_layer_name]`` names the layer of the
    original model it came from.
    """
    functional = to_functional(model)
    check_structure(functional)
    edit = ConfigEdit(functional)
    config = edit.config
    for layer_cfg in list(config["layers"]):
        cls, name = layer_cfg["class_name"], layer_cfg["name"]
        if cls == "SeparableConv2D":
            edit.split_separable(layer_cfg)
            cls = "Conv2D"
        if cls in ACTIVATION_SPLIT_LAYERS and not _is_linear(layer_cfg["config"].get("activation")):
            activation = layer_cfg["config"]["activation"]
            layer_cfg["config"]["activation"] = "linear"
            edit.insert_after(name, {"class_name": "Activation", "name": f"{name}_activation",
                                     "config": {"activation": activation, "trainable": True,
                                                "dtype": layer_cfg["config"].get("dtype")}})
    for layer_cfg in list(config["layers"]):
        if layer_cfg["class_name"] == "Activation" and _activation_name(layer_cfg) in SWISH_NAMES:
            edit.split_swish(layer_cfg)
    if input_layer_factory is not None:
        for input_ref in list(config["input_layers"]):
            new_cfg = input_layer_factory(input_ref[0])
            if new_cfg is not None:
                edit.insert_after(input_ref[0], new_cfg)
    return edit.build(), edit.origin


class ConfigEdit:
    """Edits a Functional model's config and rebuilds it with the original weights."""

    def __init__(self, functional, origin=None):
        self.source = functional
        self.config = copy.deepcopy(functional.get_config())
        self.taken = {l["name"] for l in self.config["layers"]}
        self.origin = dict(origin) if origin else {n: n for n in self.taken}
        self.weight_plan = {}  # new layer name -> how its weights come from its origin

    def insert_after(self, layer_name, new_layer_cfg):
        """Insert ``new_layer_cfg`` consuming ``layer_name``'s output; consumers follow it."""
        new_name = _unique(new_layer_cfg["name"], self.taken)
        new_layer_cfg["name"] = new_layer_cfg["config"]["name"] = new_name
        _redirect(self.config, layer_name, new_name)
        new_layer_cfg["inbound_nodes"] = [[[layer_name, 0, 0, {}]]]
        layers = self.config["layers"]
        index = next(i for i, l in enumerate(layers) if l["name"] == layer_name)
        layers.insert(index + 1, new_layer_cfg)
        self.origin[new_name] = self.origin.get(layer_name, layer_name)
        return new_name

    def split_separable(self, layer_cfg):
        """SeparableConv2D -> DepthwiseConv2D (``<name>_depthwise``) + 1x1 Conv2D (``<name>``)."""
        c, name = layer_cfg["config"], layer_cfg["name"]
        dw_name = _unique(f"{name}_depthwise", self.taken)
        dw = {"class_name": "DepthwiseConv2D", "name": dw_name, "inbound_nodes": layer_cfg["inbound_nodes"],
              "config": {"name": dw_name, "trainable": c.get("trainable", True), "dtype": c.get("dtype"),
                         "kernel_size": c["kernel_size"], "strides": c["strides"], "padding": c["padding"],
                         "data_format": c.get("data_format"), "dilation_rate": c.get("dilation_rate", (1, 1)),
                         "depth_multiplier": c.get("depth_multiplier", 1), "activation": "linear",
                         "use_bias": False}}
        pw_cfg = {k: c[k] for k in ("trainable", "dtype", "filters", "activation", "use_bias",
                                    "bias_initializer", "bias_regularizer", "bias_constraint",
                                    "activity_regularizer") if k in c}
        pw_cfg.update(name=name, kernel_size=(1, 1), strides=(1, 1), padding="valid",
                      data_format=c.get("data_format"), dilation_rate=(1, 1))
        layer_cfg.update(class_name="Conv2D", config=pw_cfg, inbound_nodes=[[[dw_name, 0, 0, {}]]])
        layers = self.config["layers"]
        layers.insert(layers.index(layer_cfg), dw)
        self.origin[dw_name] = self.origin.get(name, name)
        self.weight_plan[dw_name] = "separable_depthwise"
        self.weight_plan[name] = "separable_pointwise"

    def split_swish(self, layer_cfg):
        """Activation swish -> Activation sigmoid (``<name>_sigmoid``) and Multiply (``<name>``):
        the form the int8 graph computes (LOGISTIC then MUL), so the sigmoid output gets its own
        8-bit grid during training."""
        name = layer_cfg["name"]
        sig_name = _unique(f"{name}_sigmoid", self.taken)
        c = layer_cfg["config"]
        sig = {"class_name": "Activation", "name": sig_name, "inbound_nodes": copy.deepcopy(layer_cfg["inbound_nodes"]),
               "config": {"name": sig_name, "activation": "sigmoid", "trainable": c.get("trainable", True),
                          "dtype": c.get("dtype")}}
        source = layer_cfg["inbound_nodes"][0][0]
        layer_cfg.update(class_name="Multiply",
                         config={"name": name, "trainable": c.get("trainable", True), "dtype": c.get("dtype")},
                         inbound_nodes=[[list(source), [sig_name, 0, 0, {}]]])
        layers = self.config["layers"]
        layers.insert(layers.index(layer_cfg), sig)
        self.origin[sig_name] = self.origin.get(name, name)

    def build(self):
        from tfq.api import quantize_scope
        with quantize_scope():
            new_model = keras.Model.from_config(self.config)
        source_layers = {l.name: l for l in self.source.layers}
        for layer in new_model.layers:
            if isinstance(layer, keras.layers.InputLayer) or not layer.weights:
                continue
            if type(layer).__name__ == "QuantizeLayer":
                continue  # quantizers are placed before training: nothing to carry over
            how = self.weight_plan.get(layer.name, "copy")
            source = source_layers.get(layer.name if how == "copy" else self.origin.get(layer.name))
            if source is None:
                continue
            if how == "separable_depthwise":
                layer.set_weights([source.depthwise_kernel.numpy()])
            elif how == "separable_pointwise":
                layer.set_weights([source.pointwise_kernel.numpy()]
                                  + ([source.bias.numpy()] if source.use_bias else []))
            elif source.weights and type(source) is type(layer):
                layer.set_weights(source.get_weights())
        return new_model


class GraphView:
    """Producers/consumers of every layer of a single-call Functional model."""

    def __init__(self, model):
        self.model = model
        self.layers = {l.name: l for l in model.layers}
        self.consumers = {name: [] for name in self.layers}
        self.producers = {name: [] for name in self.layers}
        for layer in model.layers:
            for node in _own_nodes(model, layer):
                for inbound in node.inbound_layers if isinstance(node.inbound_layers, list) else [node.inbound_layers]:
                    if inbound.name in self.layers:
                        self.producers[layer.name].append(inbound.name)
                        self.consumers[inbound.name].append(layer.name)
        self.outputs = {t._keras_history.layer.name for t in model.outputs}
        self.inputs = {t._keras_history.layer.name for t in model.inputs}

    def type_name(self, name):
        return type(self.layers[name]).__name__
