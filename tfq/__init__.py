"""tfq: learnable low-bit quantizers for Keras (tfmot), exported to TFLite and integer graphs."""
from tfq._keras import ensure_legacy_keras as _ensure_legacy_keras

_ensure_legacy_keras()

import importlib as _importlib

__version__ = "0.1.0"

_SUBMODULES = ("quantizers", "configs", "schemes", "callbacks", "costs", "ptq", "data", "models",
               "export", "cli", "graph", "train", "report", "api")
_API = {"quantize_model": "tfq.api", "quantize_scope": "tfq.api", "calibrate": "tfq.api"}


def __getattr__(name):
    if name in _SUBMODULES:
        return _importlib.import_module(f"tfq.{name}")
    if name in _API:
        return getattr(_importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tfq' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + list(_API))
