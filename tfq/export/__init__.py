"""Export of tfq models: TFLite, integer graphs, parity reports and on-device latency.

``to_tflite``, ``to_integer_graph``, ``snap_biases``, ``snap_hard_swish``, ``guard_ties``, ``verify``, ``locate_divergence``, ``export_report`` and ``benchmark`` are the public
entry points (see ARCHITECTURE.md); submodules load lazily so ``import tfq.export`` stays cheap.
"""
import importlib as _importlib

_API = {"to_tflite": "tfq.export.tflite", "export_report": "tfq.export.tflite", "ExportError": "tfq.export.tflite",
        "verify": "tfq.export.verify", "IntegerGraph": "tfq.export.integer", "benchmark": "tfq.export.bench",
        "to_integer_graph": "tfq.export.tflite", "snap_biases": "tfq.export.tflite",
        "snap_hard_swish": "tfq.export.tflite", "locate_divergence": "tfq.export.verify",
        "guard_ties": "tfq.export.tflite"}


def __getattr__(name):
    if name in _API:
        return getattr(_importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tfq.export' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
