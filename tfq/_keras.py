"""Keras 2 (tf_keras) selection: tfmot needs the legacy Keras, so tfq forces it.

``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow is first imported; if TensorFlow was
imported earlier with Keras 3 active, ``tf.keras`` is Keras 3 and tfmot cannot work, so we
stop with an explanation instead of failing later in an obscure place.
"""
import os
import sys

_FIX = ("set TF_USE_LEGACY_KERAS=1 in the environment, or `import tfq` before importing "
        "tensorflow, and restart the Python process")


def ensure_legacy_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf_loaded = "tensorflow" in sys.modules
    if not tf_loaded:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        return
    if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes"):
        return
    import tensorflow as tf  # already imported: cheap
    if not tf.keras.__name__.startswith("tf_keras") and getattr(tf.keras, "__version__", "3").startswith("3"):
        raise ImportError(
            "tfq needs Keras 2 (tf_keras) but TensorFlow was already imported with Keras 3 active; "
            + _FIX + ".")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def check_keras2_model(model, argument="model"):
    """Raise a clear error when a Keras 3 (or non-Keras) object is handed to tfq."""
    import tf_keras
    if isinstance(model, tf_keras.Model):
        return
    module = type(model).__module__
    if module.startswith("keras"):
        raise TypeError(
            f"{argument} is a Keras 3 model ({type(model).__module__}.{type(model).__name__}); tfq "
            "works on Keras 2 models built with `tf_keras` (tfmot needs Keras 2). Rebuild it with "
            "`import tf_keras as keras` (or tf.keras after TF_USE_LEGACY_KERAS=1) and transfer the weights "
            "with get_weights()/set_weights().")
    raise TypeError(f"{argument} must be a tf_keras.Model, got {type(model).__name__}")
