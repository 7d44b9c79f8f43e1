"""Post-training quantization: ``tfq.ptq.pwlq(model, calibration_data, ...)`` (pwlq.txt).

``tfq.ptq.pwlq`` is the module ``tfq/ptq/pwlq.py``, callable as the function ``pwlq``;
``tfq.ptq.fold`` folds BatchNorm into weights; ``tfq.ptq.pwlq_core`` is the NumPy core. Loaded
lazily: quantizer modules import ``pwlq_core`` without pulling in the Keras-level code.
"""
import importlib as _importlib


def __getattr__(name):
    if name in ("pwlq", "fold", "pwlq_core"):
        return _importlib.import_module(f"tfq.ptq.{name}")
    raise AttributeError(f"module 'tfq.ptq' has no attribute {name!r}")
