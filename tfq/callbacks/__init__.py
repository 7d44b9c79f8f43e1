"""Keras callbacks that drive tfq's training-time schedules.

``tfq.callbacks.AdaQAT`` (adaqat.txt: finite-difference bit-width updates) and
``tfq.callbacks.DDQGateSchedule`` (ddq.txt: precision schedule under a memory budget). Each lives in
its own module beside this one; both names are importable from here.
"""
import importlib as _importlib

_EXPORTS = {"AdaQAT": "tfq.callbacks.adaqat", "DDQGateSchedule": "tfq.callbacks.ddq"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(_importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tfq.callbacks' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
