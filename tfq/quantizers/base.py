"""Shared machinery for tfq quantizers: registry, serialisation, lazy data-driven init.

A tfq quantizer is a tfmot ``Quantizer``: ``build`` creates its variables on the wrapping layer,
``__call__(x, training, weights)`` runs its forward (one ``tf.custom_gradient`` function per
method) and ``integer_grid(weights)`` describes what it computes at inference.

Data-dependent initialisation (LSQ+ eq. 7-8, N2UQ, ...) happens inside the graph on the first
call with ``training=True``: an ``initialized`` flag variable guards a ``tf.cond`` that assigns
the initial values, so it works eagerly, under ``tf.function`` and in ``model.fit``, and it is
saved with the model (a loaded model is not re-initialised). A step traced once the flag is
already set (after ``tfq.calibrate``) holds only a check of the flag, not the ``tf.cond``.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras import quantizers as tfmot_quantizers

from tfq.quantizers.grid import HasIntegerGrid, UncalibratedError

_REGISTRY = {}

MIN_BITS, MAX_BITS = 2, 8


def register(*names):
    """Class decorator: registers a quantizer under ``names`` (strings usable in configs) and
    with Keras serialisation (package ``tfq``)."""

    def wrap(cls):
        cls = keras.utils.register_keras_serializable(package="tfq")(cls)
        for name in names + (cls.__name__,):
            _REGISTRY[name.lower()] = cls
        return cls

    return wrap


def get(identifier, **kwargs):
    """A quantizer from a registered name (``"lsq"``), a config dict or an instance."""
    if isinstance(identifier, tfmot_quantizers.Quantizer):
        return identifier
    if isinstance(identifier, dict):
        return keras.utils.deserialize_keras_object(identifier)
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _REGISTRY:
            raise ValueError(f"Unknown quantizer {identifier!r}; registered: {sorted(_REGISTRY)}")
        return _REGISTRY[key](**kwargs)
    raise TypeError(f"Cannot build a quantizer from {type(identifier).__name__}")


def registered_names():
    return sorted(_REGISTRY)


def check_bits(bits, argument="bits", low=MIN_BITS, high=MAX_BITS):
    """Bit-widths must be whole numbers in [low, high]."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= high:
        raise ValueError(f"{argument} must be an integer in [{low}, {high}], got {bits!r}")
    return int(bits)


def check_choice(value, allowed, argument):
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {sorted(allowed)}, got {value!r}")
    return value


def normalize_axes(per_axis, rank=None):
    """``per_axis`` as a sorted tuple of non-negative axes (None stays None)."""
    if per_axis is None:
        return None
    axes = (per_axis,) if isinstance(per_axis, (int, np.integer)) else tuple(per_axis)
    if rank is not None:
        for a in axes:
            if not -rank <= a < rank:
                raise ValueError(f"per_axis={per_axis!r} is out of range for a rank-{rank} tensor")
        axes = tuple(sorted(a % rank for a in axes))
    return axes


def param_shape(tensor_shape, axes):
    """Shape of a per-axis parameter (the tensor's sizes on ``axes``); () per tensor."""
    if axes is None:
        return ()
    return tuple(int(tensor_shape[a]) for a in axes)


def broadcast_shape(rank, axes, shape):
    """Reshape target that lets a per-axis parameter broadcast against the tensor."""
    if axes is None:
        return None
    out = [1] * rank
    for a, n in zip(axes, shape):
        out[a] = n
    return out


def reduce_to_shape(grad, like):
    """Sum ``grad`` over the axes where ``like`` (broadcast against it) has size 1."""
    like_shape = like.shape
    if like_shape.rank == 0:
        return tf.reduce_sum(grad)
    axes = [i for i, n in enumerate(like_shape) if n == 1]
    return tf.reduce_sum(grad, axis=axes, keepdims=True) if axes else grad


#: name suffixes of the variables tfq quantizers create (``<tensor>_<role>``); method modules
#: add theirs with ``register_variable_roles``
VARIABLE_ROLES = ["scale", "offset", "initialized"]


def register_variable_roles(*roles):
    """Declare the name suffixes of a method's quantizer variables (used by ``tfq.calibrate``,
    reports and TensorBoard summaries to tell quantizer state from layer weights)."""
    for role in roles:
        if role not in VARIABLE_ROLES:
            VARIABLE_ROLES.append(role)


def variable_role(variable, roles=None):
    """The quantizer role (one of ``roles``, default every registered one) of a model variable,
    or None for other variables."""
    short = variable.name.split("/")[-1].split(":")[0]
    roles = VARIABLE_ROLES if roles is None else roles
    return next((role for role in sorted(roles, key=len, reverse=True) if short.endswith(f"_{role}")), None)


def gather_first_batch(inputs, initialized):
    """Under a multi-replica ``tf.distribute`` strategy (replica context): the global batch, i.e.
    every replica's ``inputs`` concatenated along axis 0 in replica order, while ``initialized``
    is False, and one example per replica once it is True; elsewhere ``inputs`` unchanged.

    Data-dependent initialisation computes its statistics from this, so every replica assigns
    the same values to its own copy of the quantizer variables (which keep Keras' default
    aggregation NONE: an assignment in replica context updates the local copy only, without
    the ``merge_call`` that ONLY_FIRST_REPLICA/MEAN would need and that ``tf.cond`` forbids),
    and the values equal a single-device run's on the same global batch. The collective sits
    outside any ``tf.cond``; after initialisation it exchanges one row per replica (not zero:
    gathering empty tensors crashes MirroredStrategy on TF 2.21).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return inputs
    local = tf.cond(initialized, lambda: inputs[:1], lambda: tf.identity(inputs))
    return context.all_gather(local, axis=0)


class PositiveConstraint(keras.constraints.Constraint):
    """Keeps a scale strictly positive after each optimizer step."""

    def __init__(self, epsilon=1e-8):
        self.epsilon = epsilon

    def __call__(self, w):
        return tf.maximum(w, self.epsilon)

    def get_config(self):
        return {"epsilon": self.epsilon}


keras.utils.register_keras_serializable(package="tfq")(PositiveConstraint)


class TFQQuantizer(tfmot_quantizers.Quantizer, HasIntegerGrid):
    """Base class. Subclasses set ``self._config`` keys in ``__init__`` and implement
    ``_build_variables``, ``_forward`` and optionally ``_initial_values``."""

    #: whether the quantizer needs to see data (activations) before it is calibrated
    data_dependent_init = True
    #: the ``initialized`` flag's value at build: True for quantizers that are ready without data
    #: or a post-training calibration (so ``tfq.train.finetune`` need not calibrate them)
    initialized_when_built = False

    def __init__(self, **config):
        self._config = dict(config)

    # --- tfmot interface -------------------------------------------------------------------
    def build(self, tensor_shape, name, layer):
        self._name = name
        self._layer_name = getattr(layer, "layer", layer).name  # the wrapped layer, for error messages
        weights = self._build_variables(tensor_shape, name, layer)
        weights["initialized"] = layer.add_weight(
            f"{name}_initialized", shape=(), dtype=tf.bool, trainable=False,
            initializer=keras.initializers.Constant(self.initialized_when_built))
        return weights

    def __call__(self, inputs, training, weights, **kwargs):
        deps = []
        if self.data_dependent_init and (training is True or not self._init_only_when_training):
            deps.append(self._initialization_op(inputs, weights))
        with tf.control_dependencies(deps):
            # variable reads inside _forward happen after the (possible) initialisation
            return self._forward(inputs, training, weights)

    def fused_activation(self, inputs, activation, weights):
        """This quantizer's training-mode output for ``activation(inputs)`` computed by one fused
        op (``activation``: a name in ``tfq.kernels.ACTIVATIONS``), or None when it has no such
        path for this call; the caller then applies the activation and calls the quantizer."""
        return None

    def get_config(self):
        return dict(self._config)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((type(self).__name__, repr(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"{type(self).__name__}({args})"

    # --- initialisation --------------------------------------------------------------------
    #: weights may be initialised on any first call; activations only from training batches
    _init_only_when_training = True

    def _initialization_op(self, inputs, weights):
        """The first-call initialisation, or only a check that it happened when the quantizer is
        already initialised at the time a ``tf.function`` traces this call.

        Tracing the initialisation branch of every quantizer takes most of the time of tracing
        a training step (ResNet50: minutes), so a step traced after ``tfq.calibrate`` leaves it
        out. Its check fails loudly if the quantizer is reset to uninitialised later (say by
        ``load_weights`` of an untrained model) while that traced step is still in use."""
        flag = weights["initialized"]
        if not tf.executing_eagerly():
            with tf.init_scope():  # the flag's value now, read outside the graph being traced
                initialized = self.is_initialized(weights)
            if initialized:
                return tf.debugging.Assert(flag, [
                    f"quantizer {getattr(self, '_name', '')!r} of layer {getattr(self, '_layer_name', '?')!r} "
                    "was reset to uninitialised after this step was traced without its initialisation; "
                    "compile the model again (or call tfq.calibrate) before training"])
        return self._maybe_initialize(inputs, weights)

    def _maybe_initialize(self, inputs, weights):
        flag = weights["initialized"]
        if self._init_only_when_training:
            # activations differ per replica: initialise every replica from the global batch
            inputs = gather_first_batch(tf.stop_gradient(inputs), flag)

        def do_init():
            values = self._initial_values(tf.stop_gradient(inputs), weights)
            assigns = [weights[k].assign(tf.cast(tf.reshape(v, weights[k].shape), weights[k].dtype))
                       for k, v in values.items()]
            with tf.control_dependencies(assigns):
                return tf.identity(flag.assign(True))  # a tensor (a replica-local assign returns one)

        return tf.cond(flag, lambda: tf.identity(flag), do_init)

    def _initial_values(self, inputs, weights):  # pragma: no cover - interface
        return {}

    @staticmethod
    def is_initialized(weights):
        return bool(keras.backend.get_value(weights["initialized"]))

    def _require_initialized(self, weights, what="quantizer"):
        if not self.is_initialized(weights):
            raise UncalibratedError(
                f"{what} {getattr(self, '_name', '')!r} ({type(self).__name__}) of layer "
                f"{getattr(self, '_layer_name', '?')!r} has not seen any data: train the model or run "
                "tfq.calibrate(model, data) before exporting")

    def _resolve_axes(self, tensor_shape, name):
        """Fix ``self.per_axis`` against the tensor's rank; sets ``_rank`` and ``_param_shape``
        (the shape of one per-axis parameter) and returns the tensor shape."""
        shape = tf.TensorShape(tensor_shape) if tensor_shape is not None else tf.TensorShape(None)
        if self.per_axis is not None:
            if shape.rank is None:
                raise ValueError(f"{name}: per_axis needs a known tensor shape")
            self.per_axis = normalize_axes(self.per_axis, shape.rank)
        self._rank = shape.rank
        self._param_shape = param_shape(shape, self.per_axis)
        return shape

    # --- costs -------------------------------------------------------------------------------
    def effective_bits(self, weights):
        """Bits per value this quantizer currently stores, as a float32 scalar tensor (read by
        ``tfq.costs``). Fixed-precision quantizers return their ``bits``; mixed-precision ones
        (DDQ gates, AdaQAT's ceil(N)) override it."""
        return tf.constant(float(self._config["bits"]), tf.float32)

    # --- subclass interface ----------------------------------------------------------------
    def _build_variables(self, tensor_shape, name, layer):  # pragma: no cover
        raise NotImplementedError

    def _forward(self, inputs, training, weights):  # pragma: no cover
        raise NotImplementedError
