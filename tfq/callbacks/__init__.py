"""Keras callbacks that drive tfq's training-time schedules.

``tfq.callbacks.AdaQAT`` (adaqat.txt: finite-difference bit-width updates) and
``tfq.callbacks.DDQGateSchedule`` (ddq.txt: precision schedule under a memory budget). Each lives in
its own module beside this one; both names are importable from here, as is
``tfq.callbacks.BiasGridProjection`` (bias_grid.py: folded biases kept on the int32 export grid).
"""
import importlib as _importlib

_EXPORTS = {"AdaQAT": "tfq.callbacks.adaqat", "DDQGateSchedule": "tfq.callbacks.ddq",
            "BiasGridProjection": "tfq.callbacks.bias_grid"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(_importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tfq.callbacks' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
