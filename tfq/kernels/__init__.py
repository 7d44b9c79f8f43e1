"""Fused C++ kernels for the training step (built by ``make install`` or ``python -m tfq.kernels``).

``TfqLsqFakeQuant`` / ``TfqLsqFakeQuantGrad`` do LSQ's per-tensor forward (eq. 2) and backward
(eq. 3-4) in one pass each over the tensor, where the TensorFlow-op form takes about a dozen
element-wise passes; they are the activation quantizers' training path. Given an ``activation``
(``ACTIVATIONS``) they quantize that function's output in the same pass and return the gradient
with respect to its input, so an Activation layer and its output quantizer cost one pass each way
(``tfq.api.QuantizeWrapperV2``). The forward and the input gradient are bit-identical to the
TensorFlow ops (``fake_quant.cc`` says where TensorFlow's own sigmoid differs); the scale and offset
gradient sums agree to float rounding (float64 partial sums in fixed blocks, so they do not depend
on the thread count).

The library is compiled against the installed TensorFlow's headers with the machine's C++
compiler. When it is missing, was built for another TensorFlow version or fails to load, tfq warns
once and uses the TensorFlow ops, which give the same numbers more slowly. ``TFQ_FUSED_KERNELS=0``
turns the kernels off.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import warnings

import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "fake_quant.cc")
LIBRARY = os.path.join(HERE, "_fused_ops.so")
STAMP = LIBRARY + ".tfversion"
#: -ffp-contract=off: no FMA contraction, so ``code * s + b`` rounds like TensorFlow's Mul then Add;
#: -fno-trapping-math: no floating-point trap is observed, so GCC may vectorise loops that select
#: between computed values (it changes no result: the tests compare the bits)
CXXFLAGS = ["-shared", "-fPIC", "-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fopenmp-simd",
            "-Wno-deprecated-declarations", "-Wno-interference-size"]  # warnings from TensorFlow's headers
ENV_SWITCH = "TFQ_FUSED_KERNELS"
#: activation functions the kernels can apply before quantizing (the ops' ``activation`` attribute)
ACTIVATIONS = ("linear", "relu", "relu6", "hard_swish", "swish", "quantized_swish")

_state = {}


def build(compiler=None, verbose=True):
    """Compile ``fake_quant.cc`` into ``_fused_ops.so`` for the installed TensorFlow."""
    compiler = compiler or os.environ.get("CXX", "c++")
    # compiled beside the library and renamed over it: the linker rewrites an existing file in place,
    # which would corrupt the library under a process that has it loaded
    partial = f"{LIBRARY}.{os.getpid()}.partial"
    command = [compiler, *CXXFLAGS, *tf.sysconfig.get_compile_flags(), SOURCE, "-o", partial,
               *tf.sysconfig.get_link_flags()]
    if verbose:
        print("tfq: building fused kernels:", shlex.join(command))
    try:
        subprocess.run(command, check=True)
        os.replace(partial, LIBRARY)
    except FileNotFoundError as err:
        raise RuntimeError(f"tfq: no C++ compiler {compiler!r} to build the fused kernels (install g++, or set "
                           f"CXX); tfq works without them, with slower training steps") from err
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    with open(STAMP, "w") as handle:
        handle.write(tf.__version__)
    _state.clear()
    return LIBRARY


def _warn(reason):
    warnings.warn(f"tfq: fused LSQ kernels unavailable ({reason}); training uses TensorFlow ops, which give "
                  f"the same numbers with slower steps. Build them with `python -m tfq.kernels` "
                  f"(or `make install`); set {ENV_SWITCH}=0 to silence this.", RuntimeWarning, stacklevel=3)


@tf.autograph.experimental.do_not_convert
def ops():
    """The loaded op module, or None (kernels turned off, not built, or not loadable)."""
    if "ops" in _state:
        return _state["ops"]
    module = None
    setting = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if setting not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"{ENV_SWITCH} must be 0 or 1, got {setting!r}")
    if setting in ("1", "true", "on"):
        built_for = open(STAMP).read().strip() if os.path.exists(STAMP) else None
        if not os.path.exists(LIBRARY):
            _warn(f"{LIBRARY} is not built")
        elif built_for != tf.__version__:
            _warn(f"built for TensorFlow {built_for}, running {tf.__version__}")
        elif os.path.getmtime(SOURCE) > os.path.getmtime(LIBRARY):
            _warn(f"{LIBRARY} is older than {SOURCE}")
        else:
            try:
                module = tf.load_op_library(LIBRARY)
            except (tf.errors.NotFoundError, OSError) as err:
                _warn(f"loading failed: {str(err).splitlines()[0]}")
    _state["ops"] = module
    return module


@contextlib.contextmanager
def turned_off():
    """While active, quantizers traced into a graph use TensorFlow's ops instead of the kernels
    (as when they are not built), without a warning; the loaded state comes back afterwards."""
    ops()  # settle the cached state first
    saved = _state["ops"]
    _state["ops"] = None
    try:
        yield
    finally:
        _state["ops"] = saved


@contextlib.contextmanager
def activations_unfused():
    """While active, quantizers traced into a graph keep the activation function out of their fused
    kernels (``tfq.api.QuantizeWrapperV2`` applies it as TensorFlow ops first), as before the
    kernels took an ``activation``: for timing the fusion and for debugging."""
    saved = _state.get("fuse_activations", True)
    _state["fuse_activations"] = False
    try:
        yield
    finally:
        _state["fuse_activations"] = saved


def fuse_activations():
    """Whether quantizers may fuse an activation function into their kernels now."""
    return _state.get("fuse_activations", True) and available()


@tf.autograph.experimental.do_not_convert
def available():
    """Whether the fused kernels are loaded."""
    return ops() is not None


@tf.autograph.experimental.do_not_convert
def fusable(x, scale, offset):
    """Whether ``fake_quant`` can run this call: kernels loaded, float32, one scale and one offset,
    not traced for XLA (``jit_compile=True``), which has no kernel for tfq's ops, and not traced
    for a SavedModel, which must load and serve where tfq's library is not loaded."""
    def one_value(t):
        return t.shape.is_fully_defined() and t.shape.num_elements() == 1
    scale, offset = tf.convert_to_tensor(scale), tf.convert_to_tensor(offset)
    return (x.dtype == tf.float32 and scale.dtype == tf.float32 and offset.dtype == tf.float32
            and one_value(scale) and one_value(offset) and not _tracing_for_xla_or_saved_model() and available())


def _tracing_for_xla_or_saved_model():
    if tf.executing_eagerly():
        return False
    # the only ways to ask; TensorFlow has no public API for either
    from tensorflow.python.ops import control_flow_util
    from tensorflow.python.saved_model import save_context
    return save_context.in_save_context() or control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


@tf.autograph.experimental.do_not_convert  # plain graph building; autograph would re-read this file
def fake_quant(x, scale, offset, qmin, qmax, grad_scale, activation="linear"):
    """LSQ's eq. 2 forward and eq. 3-4 backward (scale and offset gradients times ``grad_scale``)
    through the fused kernels, of ``activation(x)`` (one of ``ACTIVATIONS``; the gradient is with
    respect to ``x``); the caller checks ``fusable`` first."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    fused = ops()
    qmin, qmax = float(qmin), float(qmax)
    grad_scale = tf.convert_to_tensor(grad_scale, tf.float32)

    def scalar(t):  # the kernels take 0-d scale and offset; no Reshape op when they already are
        return t if t.shape.rank == 0 else tf.reshape(t, [])

    @tf.custom_gradient
    def _fake_quant(x, s, b):
        s0, b0 = scalar(s), scalar(b)  # shared by the forward and the backward op
        out = fused.tfq_lsq_fake_quant(x, s0, b0, qmin=qmin, qmax=qmax, activation=activation)

        def grad(dy):
            dx, ds, db = fused.tfq_lsq_fake_quant_grad(dy, x, s0, b0, grad_scale, qmin=qmin, qmax=qmax,
                                                       activation=activation)
            if s.shape.rank != 0:
                ds = tf.reshape(ds, tf.shape(s))
            if b.shape.rank != 0:
                db = tf.reshape(db, tf.shape(b))
            return dx, ds, db

        return out, grad

    return _fake_quant(x, tf.convert_to_tensor(scale), tf.convert_to_tensor(offset))
