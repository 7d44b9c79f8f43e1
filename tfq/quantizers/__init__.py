"""tfq quantizers: one module per method, each a tfmot Quantizer built on one tf.custom_gradient
function, registered by name (``tfq.quantizers.get("lsq")``)."""
import importlib as _importlib

from tfq.quantizers.base import TFQQuantizer, get, registered_names  # noqa: F401
from tfq.quantizers.grid import (CodebookGrid, PiecewiseGrid, ThresholdGrid, UncalibratedError,  # noqa: F401
                                 UniformGrid)
from tfq.quantizers.fixed import FixedRangeQuantizer  # noqa: F401
from tfq.quantizers.lsq import LSQQuantizer  # noqa: F401

# Methods added by later modules register themselves on import; import the ones present.
for _module in ("n2uq", "ddq", "adaqat", "pwlq"):
    try:
        _importlib.import_module(f"tfq.quantizers.{_module}")
    except ModuleNotFoundError as _err:  # a method module that is not part of this build
        if _err.name != f"tfq.quantizers.{_module}":
            raise
from tfq.quantizers.base import _REGISTRY as _R  # noqa: E402

globals().update({cls.__name__: cls for cls in _R.values()})
