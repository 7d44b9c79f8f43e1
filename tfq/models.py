"""Reference Keras 2 (tf_keras) classifiers used by the tests and benchmarks.

Every builder returns a Functional model whose last layer is a linear ``Dense``: the outputs are
*logits* (no softmax). Train with ``SparseCategoricalCrossentropy(from_logits=True)``.
"""
import tensorflow as tf
import tf_keras as keras

layers = keras.layers


@keras.utils.register_keras_serializable(package="tfq")
def hard_swish(x):
    """Hard swish: ``x * relu6(x + 3) / 6``."""
    return x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0)


def _serialize_by_name(fn):
    """Make ``keras.activations.serialize(fn)`` return the plain registered name.

    tf_keras writes a registered function as a ``{"class_name": "function", ...}`` dict, which its
    own legacy .h5 loader cannot read back (keras-team/keras#20833). Names found in the
    ``tf_keras`` activations module are written as plain strings, which both the .h5 and the
    SavedModel loaders resolve through the registry, so the registered name is added there.
    """
    try:
        from tf_keras.src import activations as keras_activations
    except ImportError:  # private layout changed: SavedModel still works, .h5 may need custom_objects
        return
    setattr(keras_activations, keras.utils.get_registered_name(fn), fn)


_serialize_by_name(hard_swish)


def _conv_bn_act(x, filters, kernel, strides, activation, name):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return _activation(activation, f"{name}_act")(x)


def _activation(kind, name):
    if kind == "relu":
        return layers.ReLU(name=name)
    if kind == "swish":
        return layers.Activation("swish", name=name)
    if kind == "hard_swish":
        return layers.Activation(hard_swish, name=name)
    raise ValueError(f"activation={kind!r} is not supported; allowed values: 'relu', 'swish', 'hard_swish'")


def small_cnn(input_shape=(28, 28, 1), num_classes=10, width=32):
    """Three Conv-BN-ReLU blocks (two followed by max pooling), global average pooling, Dense logits."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn_act(inputs, width, 3, 1, "relu", "block1")
    x = layers.MaxPooling2D(2, name="block1_pool")(x)
    x = _conv_bn_act(x, 2 * width, 3, 1, "relu", "block2")
    x = layers.MaxPooling2D(2, name="block2_pool")(x)
    x = _conv_bn_act(x, 2 * width, 3, 1, "relu", "block3")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def _squeeze_excite(x, channels, reduction, name):
    s = layers.GlobalAveragePooling2D(name=f"{name}_se_pool")(x)
    s = layers.Reshape((1, 1, channels), name=f"{name}_se_reshape")(s)
    s = layers.Conv2D(max(1, channels // reduction), 1, name=f"{name}_se_reduce")(s)
    s = layers.ReLU(name=f"{name}_se_relu")(s)
    s = layers.Conv2D(channels, 1, name=f"{name}_se_expand")(s)
    s = layers.Activation("sigmoid", name=f"{name}_se_gate")(s)
    return layers.Multiply(name=f"{name}_se_scale")([x, s])


def _separable_block(x, filters, strides, activation, name, squeeze_excite=False, residual=False):
    shortcut = x
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = layers.BatchNormalization(name=f"{name}_dw_bn")(x)
    x = _activation(activation, f"{name}_dw_act")(x)
    if squeeze_excite:
        x = _squeeze_excite(x, x.shape[-1], 4, name)
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pw")(x)
    x = layers.BatchNormalization(name=f"{name}_pw_bn")(x)
    x = _activation(activation, f"{name}_pw_act")(x)
    if residual:
        if shortcut.shape[1:] != x.shape[1:]:
            raise ValueError(f"{name}: residual needs equal shapes, got {shortcut.shape} and {x.shape}")
        x = layers.Add(name=f"{name}_add")([shortcut, x])
    return x


# (filters as a multiple of width, stride, activation, squeeze-excite, residual)
_MOBILE_SWISH_BLOCKS = (
    (2, 2, "swish", False, False),
    (2, 1, "hard_swish", False, True),
    (4, 2, "hard_swish", True, False),
    (4, 1, "swish", False, False),
    (8, 2, "hard_swish", False, False),
    (8, 1, "swish", False, False),
)


def mobile_swish(input_shape=(28, 28, 1), num_classes=10, width=16, dropout=0.2):
    """Small MobileNet-style net: swish / hard-swish depthwise-separable blocks, one squeeze-excite
    branch and one residual Add, then global pooling, dropout and Dense logits."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn_act(inputs, width, 3, 1, "swish", "stem")
    for i, (mult, strides, act, se, res) in enumerate(_MOBILE_SWISH_BLOCKS, start=1):
        x = _separable_block(x, mult * width, strides, act, f"block{i}", squeeze_excite=se, residual=res)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mobile_swish")


def mobilenet_v2(input_shape=(96, 96, 3), num_classes=10, alpha=0.35):
    """``keras.applications.MobileNetV2`` with random weights and a linear (logits) classifier."""
    return keras.applications.MobileNetV2(input_shape=tuple(input_shape), alpha=alpha, weights=None,
                                          classes=num_classes, classifier_activation=None)


MODELS = {"small_cnn": small_cnn, "mobile_swish": mobile_swish, "mobilenet_v2": mobilenet_v2}


def get(name, seed=None, **kwargs):
    """Build the model registered as ``name``; ``seed`` makes the initial weights deterministic."""
    if name not in MODELS:
        raise ValueError(f"name={name!r} is not a known model; allowed values: "
                         + ", ".join(repr(n) for n in MODELS))
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    return MODELS[name](**kwargs)
