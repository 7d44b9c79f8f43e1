"""Piecewise linear post-training quantization (PWLQ): the NumPy numerical core.

Paper: Fang et al., "Near-Lossless Post-Training Quantization of Deep Neural Networks via a
Piecewise Linear Approximation" (papers/pwlq.txt); open points settled in SPEC.md, section PWLQ.
This module does not import TensorFlow; the grid classes (``tfq.quantizers.grid``) are imported
lazily by the functions that build grids, because that package loads TensorFlow.

Quantizer (eq. 3), per channel (or group) with ``m = max|w|`` and breakpoint ``0 < p < m``;
``L = 2^b - 1`` with ``b`` bits per piece:

* centre ``|w| <= p``:  ``w_q = sign(w) * c * s_c``,        ``s_c = p / L``,       ``c = round(|w| / s_c)``
* tail   ``|w| >  p``:  ``w_q = sign(w) * (p + c * s_t)``,  ``s_t = (m - p) / L``, ``c = round((|w| - p) / s_t)``

with ``c`` in ``[0, L]`` (eq. 1 applied to the magnitude on ``[0, p]`` and ``[p, m]``; offset ``p`` in
the tail, eq. 15). Sign and region are one extra bit each. Rounding is half to even, like
``tf.round``. This is exactly the contract of ``PiecewiseGrid``.

Breakpoint (SPEC): Gaussian ``p/sigma = ln(0.86143114 m/sigma + 0.6079011)``, Laplacian
``p/sigma = 0.80304483 sqrt(m/sigma) - 0.31667855`` (approximate solutions of eq. 10; sigma is the
unbiased std), or the coarse-to-fine search of sec. 5.1.1 minimising the L2 error.

Array conventions: the "row" functions (``piecewise_quantize``, ``search_breakpoint``) take the
values of one channel (or group) along the LAST axis and any leading axes as independent channels;
``quantize_channels`` does the kernel-layout work (output-channel axes, input-channel groups).
Computation is in float64; kernels are returned in the input's floating dtype.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Iterable, NamedTuple, Optional, Tuple

import numpy as np

MIN_BITS, MAX_BITS = 2, 8
BREAKPOINTS = ("gaussian", "laplacian", "search")
GRANULARITIES = ("channel", "group")
METHODS = ("pwlq", "uniform")
BITS_MEANS = ("piece", "comp", "stor")
BIAS_CORRECTIONS = (False, True, "scale", "exact")
# bits_mean -> (bits removed per piece, smallest weight_bits that leaves >= 1 bit per piece)
_BITS_MEAN_RULES = {"piece": (0, 2), "comp": (1, 2), "stor": (2, 3)}
LAYER_CHANNEL_AXES = {"Conv2D": (3,), "DepthwiseConv2D": (2, 3), "Dense": (1,)}
INT8_MAX_CODE = 127  # symmetric int8 weights (TFLite per-channel): codes in [-127, 127]
_RATIO_MIN, _RATIO_MAX = 1, 999  # breakpoint ratio p/m is searched in thousandths, inside (0, 1)

_G_COEF, _G_INTER = 0.86143114, 0.6079011
_L_COEF, _L_INTER = 0.80304483, -0.31667855


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------

def _check_int(value, name, lo, hi):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return int(value)


def _check_choice(value, name, allowed):
    # ``value in allowed`` would accept 1 for True; compare types too.
    if isinstance(value, np.bool_):
        value = bool(value)
    for a in allowed:
        if type(value) is type(a) and value == a:
            return value
    raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _finite_array(x, name, allow_empty=False):
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array: {err}") from None
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf values; quantization needs finite values")
    return arr


def _out_dtype(x):
    dt = np.asarray(x).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def _normalize_axes(axes, ndim, name="channel_axes"):
    if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
        axes = (axes,)
    try:
        axes = tuple(axes)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of ints, got {axes!r}") from None
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral) or not -ndim <= a < ndim:
            raise ValueError(f"{name} entries must be ints in [-{ndim}, {ndim - 1}] for a "
                             f"{ndim}-D kernel, got {axes!r}")
        out.append(int(a) % ndim)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{name} must name at least one axis, each once; got {axes!r}")
    return tuple(sorted(out))


def _levels(bits_per_piece):
    return float(2 ** bits_per_piece - 1)


def _row_std(w2):
    """Unbiased std of each row (population std for one-element rows, i.e. 0)."""
    return np.std(w2, axis=-1, ddof=1 if w2.shape[-1] > 1 else 0)


# ----------------------------------------------------------------------------------------------
# breakpoints (sec. 3.2, eq. 6 and 10; sec. 5.1.1)
# ----------------------------------------------------------------------------------------------

def _check_m_over_sigma(x):
    arr = _finite_array(x, "m_over_sigma")
    if np.any(arr <= 0):
        raise ValueError("m_over_sigma must be > 0 (max|w| / std(w))")
    return arr


def gaussian_breakpoint(m_over_sigma):
    """Optimal breakpoint p/sigma for a Gaussian (approximate root of eq. 10, SPEC).

    ``p/sigma = ln(0.86143114 * m/sigma + 0.6079011)``; vectorized over ``m_over_sigma``.
    """
    x = _check_m_over_sigma(m_over_sigma)
    return np.log(_G_COEF * x + _G_INTER)


def laplacian_breakpoint(m_over_sigma):
    """Optimal breakpoint p/sigma for a Laplacian (approximate root of eq. 10, SPEC).

    ``p/sigma = 0.80304483 * sqrt(m/sigma) - 0.31667855`` (the paper's "p/m" is a typo).
    """
    x = _check_m_over_sigma(m_over_sigma)
    return _L_COEF * np.sqrt(x) + _L_INTER


def _rows(w, name="w"):
    arr = _finite_array(w, name)
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (values of a channel on the last axis)")
    return arr.reshape(-1, arr.shape[-1]), arr.shape[:-1]


def _closed_form_ratio(w2, rule):
    """p/m per row from the Gaussian or Laplacian rule; degenerate rows get 0.5."""
    m = np.max(np.abs(w2), axis=-1)
    sigma = _row_std(w2)
    ok = (m > 0) & (sigma > 0)
    x = np.where(ok, m / np.where(ok, sigma, 1.0), 1.0)
    p_over_sigma = gaussian_breakpoint(x) if rule == "gaussian" else laplacian_breakpoint(x)
    ratio = np.where(ok, p_over_sigma / x, 0.5)
    return np.clip(ratio, _RATIO_MIN / 1000.0, _RATIO_MAX / 1000.0)


def _pw_rows(w2, levels, p, m):
    """Eq. 3 on rows: ``w2`` (R, n); ``p``, ``m`` (R,). Degenerate rows (m == 0) use p = 0, scales 1."""
    live = m > 0
    p = np.where(live, p, 0.0)
    s_c = np.where(live, p / levels, 1.0)
    s_t = np.where(live, (m - p) / levels, 1.0)
    s_t = np.where(s_t > 0, s_t, 1.0)  # p == m cannot reach here from the public API
    pc, mc, scc, stc = p[:, None], m[:, None], s_c[:, None], s_t[:, None]
    a = np.abs(w2)
    centre = a <= pc
    c_c = np.clip(np.round(a / scc), 0, levels)
    c_t = np.clip(np.round((np.minimum(a, mc) - pc) / stc), 0, levels)
    codes = np.where(centre, c_c, c_t)
    mag = np.where(centre, c_c * scc, pc + c_t * stc)
    sign = np.where(w2 < 0, -1, 1).astype(np.int8)
    return sign * mag, codes.astype(np.int64), sign, ~centre, p, s_c, s_t


def _sse_mag(a, levels, p, top):
    """Row sums of squared eq. 3 errors from magnitudes ``a = |w|`` (the sign cancels);
    ``p``, ``top`` (R,) with ``0 < p < top`` on rows with ``top > 0``. Same arithmetic as
    ``_pw_rows``, fewer passes: this is the inner loop of the searches."""
    live = top > 0
    p = np.where(live, p, 0.0)[:, None]
    s_c = np.where(live, p[:, 0] / levels, 1.0)[:, None]
    s_t = np.where(live & (top > p[:, 0]), (top - p[:, 0]) / levels, 1.0)[:, None]
    centre = a <= p
    step = np.where(centre, s_c, s_t)
    base = np.where(centre, 0.0, p)
    x = np.minimum(a, top[:, None]) - base
    x /= step
    np.round(x, out=x)
    x *= step
    x += base
    x -= a
    return np.einsum("ij,ij->i", x, x)


def _sse_at_ratio(w2, levels, ratio, m, a=None):
    return _sse_mag(np.abs(w2) if a is None else a, levels, ratio * m, m)


def _coarse_to_fine(err_fn, n_rows, first, lo, hi):
    """Per-row argmin of ``err_fn(k)`` over integer k (thousandths): the ``first`` grid, then
    +-100 around the best (step 10), then +-10 (step 1), clipped to [lo, hi]. Ties keep the
    earlier candidate. Returns (best k, best error), both shape (n_rows,)."""
    best_k = np.full(n_rows, first[0], dtype=np.int64)
    best_err = np.full(n_rows, np.inf)
    for offsets in (None, np.arange(-100, 101, 10), np.arange(-10, 11, 1)):
        centre = best_k.copy()
        candidates = first if offsets is None else offsets
        for c in candidates:
            k = np.full(n_rows, c, dtype=np.int64) if offsets is None else np.clip(centre + c, lo, hi)
            err = err_fn(k)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_k = np.where(better, k, best_k)
    return best_k, best_err


def _search_ratio(w2, levels):
    """Coarse-to-fine search of p/m (sec. 5.1.1): 0.1..0.9 step 0.1, then +-0.1 step 0.01, then
    +-0.01 step 0.001 (kept inside (0, 1)), vectorized over rows."""
    a = np.abs(w2)
    m = np.max(a, axis=-1)
    best, _ = _coarse_to_fine(lambda k: _sse_at_ratio(w2, levels, k / 1000.0, m, a), w2.shape[0],
                              np.arange(100, 901, 100), _RATIO_MIN, _RATIO_MAX)
    return best / 1000.0


def search_breakpoint(w, bits_per_piece):
    """Breakpoint p minimising the L2 error of eq. 3 by coarse-to-fine search (sec. 5.1.1).

    p/m is searched over 0.1..0.9 (step 0.1), then +-0.1 around the best (step 0.01), then
    +-0.01 (step 0.001), kept inside (0, 1). ``w``: values of one channel on the last axis,
    leading axes are channels (searched independently, vectorized). Returns p, shape
    ``w.shape[:-1]`` (0 for all-zero channels).
    """
    b = _check_int(bits_per_piece, "bits_per_piece", 1, MAX_BITS)
    w2, lead = _rows(w)
    m = np.max(np.abs(w2), axis=-1)
    return (_search_ratio(w2, _levels(b)) * m).reshape(lead)


class PiecewiseCodes(NamedTuple):
    """Integer description of eq. 3: ``w_q = sign * where(tail, p + codes*tail_scale, codes*centre_scale)``."""
    sign: np.ndarray          # int8, +1 / -1 (zero weights carry +1 with a centre code of 0)
    codes: np.ndarray         # int64 magnitude codes in [0, 2^b - 1]
    tail: np.ndarray          # bool, True where the code indexes the tail piece
    breakpoint: np.ndarray    # per channel (shape ``w.shape[:-1]``)
    centre_scale: np.ndarray  # p / (2^b - 1)
    tail_scale: np.ndarray    # (m - p) / (2^b - 1)


def piecewise_quantize(w, bits_per_piece, breakpoint, max_abs=None):
    """Piecewise linear quantization, eq. 3, with ``b = bits_per_piece`` bits per piece.

    Centre ``[-p, p]``: ``sign * round(|w|/s_c) * s_c`` with ``s_c = p/(2^b-1)``; tails
    ``(p, m]``: ``sign * (p + round((|w|-p)/s_t) * s_t)`` with ``s_t = (m-p)/(2^b-1)`` (eq. 1 on
    each magnitude piece, offsets 0 and p; the paper's four pieces). ``|w| = p`` is centre.
    ``w``: values of a channel on the last axis (leading axes = channels); ``breakpoint`` and
    ``max_abs`` (default ``max|w|`` per channel; larger magnitudes are clipped) broadcast to
    ``w.shape[:-1]`` and need ``0 < breakpoint < max_abs``. Returns ``(w_q, PiecewiseCodes)``.
    """
    b = _check_int(bits_per_piece, "bits_per_piece", 1, MAX_BITS)
    w2, lead = _rows(w)
    if max_abs is None:
        m = np.max(np.abs(w2), axis=-1)
    else:
        m = np.broadcast_to(_finite_array(max_abs, "max_abs"), lead).reshape(-1).copy()
        if np.any(m <= 0):
            raise ValueError("max_abs must be > 0")
    p = np.broadcast_to(_finite_array(breakpoint, "breakpoint"), lead).reshape(-1).astype(np.float64)
    live = m > 0
    if np.any(live & ((p <= 0) | (p >= m))):
        raise ValueError("breakpoint must satisfy 0 < breakpoint < max_abs (= max|w| per channel "
                         "unless given)")
    values, codes, sign, tail, p, s_c, s_t = _pw_rows(w2, _levels(b), p, m)
    shape = np.shape(w)
    info = PiecewiseCodes(sign.reshape(shape), codes.reshape(shape), tail.reshape(shape),
                          p.reshape(lead), s_c.reshape(lead), s_t.reshape(lead))
    return values.reshape(shape).astype(_out_dtype(w)), info


# ----------------------------------------------------------------------------------------------
# integer tail ratio (export: one int8 convolution)
# ----------------------------------------------------------------------------------------------

def max_integer_tail_ratio(bits_per_piece, max_code=INT8_MAX_CODE):
    """Largest k with every code of the integer-ratio grid inside ``[-max_code, max_code]``.

    With ``s_t = k s_c`` and ``p = (2^b-1) s_c`` the largest magnitude is ``(2^b-1)(k+1) s_c``.
    """
    levels = 2 ** _check_int(bits_per_piece, "bits_per_piece", 1, MAX_BITS) - 1
    return max_code // levels - 1


def _integer_ratio_sse(a, levels, k, top):
    """Squared error of the integer-ratio grid (``p = top/(k+1)``) from magnitudes ``a``."""
    return _sse_mag(a, levels, top / (k + 1.0), top)


def _integer_ratio_choice(w2, levels, ratio, exhaustive, kmax):
    """Integer ``k = s_t/s_c`` and range top per row (``s_c = top/(L(k+1))``, ``p = L s_c``).

    Closed-form rules (``exhaustive=False``): top = m (max|w|) and k is the floor or ceil of the
    rule's unconstrained ``(m - p)/p`` (clipped to [1, kmax]), the lower L2 error wins.
    Search: the best k in 1..kmax at top = m, then for it and its two neighbours a
    coarse-to-fine search of top/m over 0.5..1.5 (step 0.1, 0.01, 0.001; below 1 clips the
    largest weights, above 1 moves the breakpoint up); the lowest L2 error wins.
    """
    a = np.abs(w2)
    m = np.max(a, axis=-1)
    n = w2.shape[0]
    if not exhaustive:
        r = (1.0 - ratio) / ratio
        candidates = [np.clip(np.floor(r), 1, kmax).astype(np.int64),
                      np.clip(np.ceil(r), 1, kmax).astype(np.int64)]
    else:
        candidates = [np.full(n, k, dtype=np.int64) for k in range(1, kmax + 1)]
    best_k, best_err = candidates[0], np.full(n, np.inf)
    for k in candidates:
        err = _integer_ratio_sse(a, levels, k, m)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_k = np.where(better, k, best_k)
    if not exhaustive:
        return best_k, m
    k0, best_top = best_k, m.copy()
    for dk in (0, -1, 1):
        k = np.clip(k0 + dk, 1, kmax)
        t, err = _coarse_to_fine(lambda t: _integer_ratio_sse(a, levels, k, t / 1000.0 * m), n,
                                 np.arange(500, 1501, 100), 100, 2000)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_k = np.where(better, k, best_k)
        best_top = np.where(better, t / 1000.0 * m, best_top)
    return best_k, best_top


def _integer_ratio_quantize(w2, levels, k, top):
    """Eq. 3 with ``s_t = k s_c`` exactly: ``s_c = top/(L(k+1))``, ``p = L s_c``; magnitudes
    above ``top`` clip to it. Values are ``s_c * n`` with integer ``n`` (``|n| <= L(k+1)``)."""
    live = top > 0
    s_c = np.where(live, top / (levels * (k + 1.0)), 1.0)  # all-zero rows: s_c = 1, codes 0
    p = levels * s_c
    _, codes, sign, tail, _, _, _ = _pw_rows(w2, levels, np.where(live, p, 0.0),
                                             np.where(live, levels * (k + 1.0) * s_c, 0.0))
    n = np.where(tail, levels + k[:, None] * codes, codes)  # magnitude in units of s_c
    values = sign * n * s_c[:, None]
    s_t = k * s_c
    return values, codes, sign, tail, p, s_c, s_t


# ----------------------------------------------------------------------------------------------
# uniform baseline (eq. 1, symmetric signed, max-abs scaling)
# ----------------------------------------------------------------------------------------------

def _uniform_rows(w2, bits):
    qmax = 2 ** (bits - 1) - 1
    m = np.max(np.abs(w2), axis=-1)
    s = np.where(m > 0, m / qmax, 1.0)
    codes = np.clip(np.round(w2 / s[:, None]), -qmax, qmax)
    return codes * s[:, None], codes.astype(np.int64), s


def uniform_quantize(w, bits, axis=None):
    """Symmetric uniform baseline (eq. 1, z = 0): ``s = max|w| / (2^(b-1)-1)``, codes in
    ``[-(2^(b-1)-1), 2^(b-1)-1]`` (narrow signed range, like TFLite int8 weights).

    ``axis``: ``None`` per tensor, else the channel axes that get their own scale.
    Returns ``(w_q, UniformGrid)``.
    """
    from tfq.quantizers.grid import UniformGrid
    bits = _check_int(bits, "bits", MIN_BITS, MAX_BITS)
    arr = _finite_array(w, "w")
    if axis is None:
        values, codes, s = _uniform_rows(arr.reshape(1, -1), bits)
        scale = s.reshape(())
    else:
        axes = _normalize_axes(axis, arr.ndim, "axis")
        moved = np.moveaxis(arr, axes, range(len(axes)))
        ch_shape = moved.shape[:len(axes)]
        values, codes, s = _uniform_rows(moved.reshape(int(np.prod(ch_shape)), -1), bits)
        values = np.moveaxis(values.reshape(moved.shape), range(len(axes)), axes)
        scale = s.reshape(ch_shape)
        axis = axes if len(axes) > 1 else axes[0]
    qmax = 2 ** (bits - 1) - 1
    grid = UniformGrid(scale=scale, zero_point=np.zeros_like(scale, dtype=np.int64), bits=bits,
                       qmin=-qmax, qmax=qmax, axis=axis)
    return values.reshape(arr.shape).astype(_out_dtype(w)), grid


# ----------------------------------------------------------------------------------------------
# bit budgets, layer layouts
# ----------------------------------------------------------------------------------------------

def bits_per_piece(weight_bits, bits_mean="piece"):
    """Bits per piece for a ``weight_bits`` budget (sec. 5.2, tables 1, 2 and 4).

    ``"piece"``: b per piece, the paper's "b-bit piecewise" (tables 1-2; storage b+2 bits with
    sign and region bits). ``"comp"``: b-1 per piece, MAC operand (sign + magnitude) of b bits
    (PW-Comp). ``"stor"``: b-2 per piece, b bits stored per weight (PW-Stor); needs b >= 3.
    """
    if not isinstance(bits_mean, str) or bits_mean not in _BITS_MEAN_RULES:
        raise ValueError(f"bits_mean must be one of {', '.join(map(repr, BITS_MEANS))}; got {bits_mean!r}")
    drop, min_bits = _BITS_MEAN_RULES[bits_mean]
    if isinstance(weight_bits, numbers.Integral) and not isinstance(weight_bits, bool) \
            and MIN_BITS <= weight_bits < min_bits:
        raise ValueError(f"bits_mean={bits_mean!r} leaves weight_bits-{drop} bits per piece and "
                         f"needs weight_bits >= {min_bits}; got {weight_bits}")
    b = _check_int(weight_bits, "weight_bits", MIN_BITS, MAX_BITS)
    return b - drop


def channel_axes_for(layer_type_name):
    """Output-channel axes of a Keras kernel: Conv2D HWIO -> (3,), DepthwiseConv2D HW C M ->
    (2, 3), Dense IO -> (1,). Accepts a class name, a class or a layer instance."""
    name = layer_type_name
    if not isinstance(name, str):
        name = name.__name__ if isinstance(name, type) else type(name).__name__
    if name not in LAYER_CHANNEL_AXES:
        raise ValueError(f"layer_type_name must be one of {', '.join(map(repr, LAYER_CHANNEL_AXES))}; "
                         f"got {name!r}")
    return LAYER_CHANNEL_AXES[name]


def default_group_size(kernel_spatial_size):
    """Input channels per group (sec. 5.1.2): 32 when k_h*k_w < 9, else 256."""
    return 32 if kernel_spatial_size < 9 else 256


# ----------------------------------------------------------------------------------------------
# bias correction (sec. 5.1.2, SPEC)
# ----------------------------------------------------------------------------------------------

class BiasCorrection(NamedTuple):
    """``kernel = scale * w_q + offset`` per output channel (``scale``/``offset``: channel shape)."""
    kernel: np.ndarray
    scale: np.ndarray
    offset: np.ndarray


def bias_correct(w, w_q, channel_axes, mode="exact"):
    """Per-channel bias correction of the mean and std (sec. 5.1.2, after Banner et al. [1]).

    Written as ``alpha * w_q + d`` with ``alpha = std(w)/std(w_q)`` (unbiased stds):

    * ``mode="exact"``: ``d = mean(w) - alpha mean(w_q)``, i.e. ``mean(w) + (w_q - mean(w_q)) *
      alpha``; restores each channel's mean and std exactly. (SPEC's literal
      ``(w_q + mean(w) - mean(w_q)) * alpha``, as in the official code, restores the std but
      leaves the mean at ``alpha * mean(w)``; the two differ by ``(alpha - 1) mean(w)``.)
    * ``mode="scale"``: ``d = 0`` (``alpha * w_q``): the exportable form. ``alpha`` multiplies
      the grid's breakpoint and both scales, so the result stays on a ``PiecewiseGrid`` (or
      ``UniformGrid``) with the same codes; the std is restored, the mean becomes ``alpha mean(w_q)``.

    Why ``d`` is not exportable as a bias: ``sum_i (w_i + d) x_i = sum_i w_i x_i + d sum_i x_i``
    and ``d sum_i x_i`` depends on the input. Exactly it needs an extra "sum of inputs"
    accumulator (the paper's eq. 13 term ``<X_q, I>``), e.g. in TFLite a one-output-channel
    all-ones convolution (window sum of the input) times the per-channel ``d``, added to the
    layer output; it cannot live inside a single int8 convolution with zero weight zero point.

    Channels with ``std(w_q) = 0`` keep ``alpha = 1``. Returns ``BiasCorrection``.
    """
    mode = _check_choice(mode, "mode", ("exact", "scale"))
    w_arr = _finite_array(w, "w")
    q_arr = _finite_array(w_q, "w_q")
    if w_arr.shape != q_arr.shape:
        raise ValueError(f"w and w_q must have the same shape, got {w_arr.shape} and {q_arr.shape}")
    axes = _normalize_axes(channel_axes, w_arr.ndim)
    ch_shape = tuple(w_arr.shape[a] for a in axes)
    rows = np.moveaxis(w_arr, axes, range(len(axes))).reshape(int(np.prod(ch_shape)), -1)
    qrows = np.moveaxis(q_arr, axes, range(len(axes))).reshape(rows.shape)
    alpha, d = _bias_terms(rows, qrows, mode)
    out = alpha[:, None] * qrows + d[:, None]
    moved_shape = tuple(ch_shape) + tuple(s for i, s in enumerate(w_arr.shape) if i not in axes)
    out = np.moveaxis(out.reshape(moved_shape), range(len(axes)), axes)
    return BiasCorrection(out.astype(_out_dtype(w_q)), alpha.reshape(ch_shape), d.reshape(ch_shape))


def _bias_terms(rows, qrows, mode):
    sd, sq = _row_std(rows), _row_std(qrows)
    alpha = np.where(sq > 0, sd / np.where(sq > 0, sq, 1.0), 1.0)
    if mode == "exact":
        d = np.mean(rows, axis=-1) - alpha * np.mean(qrows, axis=-1)
    else:
        d = np.zeros_like(alpha)
    return alpha, d


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChannelQuantization:
    """What ``quantize_channels`` chose, in integers plus per-channel scales.

    ``grid``: ``PiecewiseGrid`` (pwlq) or ``UniformGrid`` (uniform); its ``axis`` are the kernel's
    output-channel axes, plus the input-channel axis for groups (parameters repeated over each
    group's input channels). Bias-correction scaling is already folded into the grid.
    ``codes``: kernel-shaped int64 (pwlq: magnitude codes in [0, 2^b-1]; uniform: signed codes);
    ``sign`` (int8 +-1) and ``tail`` (bool) for pwlq. ``tail_ratio``: integer ``s_t/s_c`` per grid
    entry when ``integer_tail_ratio``. ``offset``: per output channel additive term of
    ``bias_correction="exact"`` (see ``bias_correct``), else ``None``. ``bias_scale``: the folded
    ``alpha`` per output channel (``None`` without bias correction). ``mse``: mean squared error.
    """

    grid: object
    codes: np.ndarray
    sign: Optional[np.ndarray]
    tail: Optional[np.ndarray]
    tail_ratio: Optional[np.ndarray]
    offset: Optional[np.ndarray]
    bias_scale: Optional[np.ndarray]
    channel_axes: Tuple[int, ...]
    mse: float

    def dequantize(self) -> np.ndarray:
        """Real kernel from codes and grid (plus ``offset``), float64."""
        g = self.grid
        shape = self.codes.shape
        if self.sign is None:
            values = g.dequantize(self.codes)
        else:
            p, s_c, s_t = (_broadcast_param(v, g.axis, shape)
                           for v in (g.breakpoint, g.centre_scale, g.tail_scale))
            values = self.sign * np.where(self.tail, p + self.codes * s_t, self.codes * s_c)
        if self.offset is not None:
            values = values + _broadcast_param(self.offset, self.channel_axes, shape)
        return values

    def integer_codes(self) -> np.ndarray:
        """Signed magnitudes in units of ``centre_scale`` (integer tail ratio only): the int8
        kernel of a single convolution, ``kernel = integer_codes * centre_scale`` (+ offset)."""
        if self.tail_ratio is None:
            raise ValueError("integer_codes needs a result of integer_tail_ratio=True")
        g = self.grid
        levels = 2 ** g.bits_per_piece - 1
        k = _broadcast_param(self.tail_ratio, g.axis, self.codes.shape)
        return (self.sign * np.where(self.tail, levels + k * self.codes, self.codes)).astype(np.int64)


def _broadcast_param(value, axis, shape):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return np.asarray(value).reshape([shape[a] if a in axes else 1 for a in range(len(shape))])


def _group_axis(axes, ndim):
    """Input-channel axis: the one just before the single output-channel axis (HWIO -> 2,
    IO -> 0); ``None`` when each output channel has one input channel (depthwise, HW C M)."""
    if len(axes) == 1 and axes[0] >= 1:
        return axes[0] - 1
    return None


def quantize_channels(kernel, channel_axes, weight_bits, breakpoint="gaussian", granularity="channel",
                      method="pwlq", bias_correction=True, bits_mean="piece",
                      integer_tail_ratio=False, group_size=None):
    """Per-output-channel (or per-group) PWLQ or uniform quantization of a kernel.

    ``channel_axes``: output-channel axes (``channel_axes_for``). PWLQ: eq. 3 with a breakpoint
    from the Gaussian/Laplacian rule or the sec. 5.1.1 search; ``bits_mean`` sets bits per piece
    (``bits_per_piece``). ``granularity="group"`` (sec. 5.1.2): within each output channel,
    groups of ``group_size`` input channels (default 32 if k_h*k_w < 9 else 256; last group may
    be smaller) get their own breakpoint and scales. ``bias_correction``: ``False``;
    ``True``/``"scale"`` folds ``std(w)/std(w_q)`` into the grid scales (exportable);
    ``"exact"`` also adds the mean shift as ``offset`` (see ``bias_correct``), per output channel.

    ``integer_tail_ratio=True`` (pwlq): ``tail_scale = k * centre_scale`` with integer
    ``1 <= k <= max_integer_tail_ratio(b)`` so that every weight is ``n * centre_scale`` with
    ``|n| <= 127`` (one exact int8 convolution). Gaussian/Laplacian rules keep the range ``m``
    and move the breakpoint to ``p = m/(k+1)``, k the floor or ceil of the rule's ``(m-p)/p``
    (lower L2 error wins); ``"search"`` picks k and the range top (0.5m..1.5m) by L2 error
    (``_integer_ratio_choice``).

    Returns ``(quantized kernel, ChannelQuantization)``.
    """
    arr = _finite_array(kernel, "kernel")
    if arr.ndim < 1:
        raise ValueError("kernel must have at least one axis")
    axes = _normalize_axes(channel_axes, arr.ndim)
    method = _check_choice(method, "method", METHODS)
    breakpoint = _check_choice(breakpoint, "breakpoint", BREAKPOINTS)
    granularity = _check_choice(granularity, "granularity", GRANULARITIES)
    bias_correction = _check_choice(bias_correction, "bias_correction", BIAS_CORRECTIONS)
    integer_tail_ratio = _check_choice(integer_tail_ratio, "integer_tail_ratio", (False, True))
    if method == "pwlq":
        b = bits_per_piece(weight_bits, bits_mean)  # validates weight_bits and bits_mean
    else:  # bits_mean only concerns pieces; still reject unknown values
        _check_choice(bits_mean, "bits_mean", BITS_MEANS)
        b = _check_int(weight_bits, "weight_bits", MIN_BITS, MAX_BITS)
    if group_size is not None:
        group_size = _check_int(group_size, "group_size", 1, 2 ** 31)
    if method == "uniform" and integer_tail_ratio:
        raise ValueError("integer_tail_ratio=True applies to method='pwlq' only")
    kmax = max_integer_tail_ratio(b)
    if integer_tail_ratio and kmax < 1:
        raise ValueError(f"integer_tail_ratio=True needs codes within int8: bits per piece <= 6, got {b} "
                         f"(weight_bits={weight_bits}, bits_mean={bits_mean!r})")

    gaxis = _group_axis(axes, arr.ndim) if granularity == "group" else None
    rest = [a for a in range(arr.ndim) if a not in axes and a != gaxis]
    perm = list(axes) + ([gaxis] if gaxis is not None else []) + rest
    kt = np.transpose(arr, perm)
    ch_shape = kt.shape[:len(axes)]
    n_ch = int(np.prod(ch_shape))
    cin = kt.shape[len(axes)] if gaxis is not None else 1
    spatial = int(np.prod([arr.shape[a] for a in rest])) if rest else 1
    k3 = kt.reshape(n_ch, cin, -1)
    g = group_size or default_group_size(spatial)
    bounds = [(s, min(s + g, cin)) for s in range(0, cin, g)]

    # quantize each (channel, group) row; groups of equal size are stacked and done at once
    out = np.empty_like(k3)
    codes = np.empty(k3.shape, dtype=np.int64)
    sign = np.empty(k3.shape, dtype=np.int8)
    tail = np.zeros(k3.shape, dtype=bool)
    per_group = {name: np.empty((n_ch, len(bounds))) for name in ("p", "s_c", "s_t", "k")}
    n_full = cin // g
    batches = []
    if n_full:
        batches.append((0, n_full * g, n_full, g))
    if cin % g:
        batches.append((n_full * g, cin, 1, cin - n_full * g))
    for start, stop, n_groups, size in batches:
        block = k3[:, start:stop, :].reshape(n_ch, n_groups, size, -1)
        rows = block.reshape(n_ch * n_groups, -1)
        res = _quantize_rows(rows, method, breakpoint, b if method == "pwlq" else weight_bits,
                             integer_tail_ratio, kmax)
        gi = slice(start // g, start // g + n_groups)
        out[:, start:stop, :] = res["values"].reshape(block.shape).reshape(n_ch, stop - start, -1)
        codes[:, start:stop, :] = res["codes"].reshape(n_ch, stop - start, -1)
        if method == "pwlq":
            sign[:, start:stop, :] = res["sign"].reshape(n_ch, stop - start, -1)
            tail[:, start:stop, :] = res["tail"].reshape(n_ch, stop - start, -1)
        for name in per_group:
            if name in res:
                per_group[name][:, gi] = res[name].reshape(n_ch, n_groups)

    # bias correction per output channel; alpha folds into the scales
    alpha = offset = None
    if bias_correction is not False:
        mode = "exact" if bias_correction == "exact" else "scale"
        alpha, d = _bias_terms(k3.reshape(n_ch, -1), out.reshape(n_ch, -1), mode)
        out = alpha[:, None, None] * out + d[:, None, None]
        for name in ("p", "s_c", "s_t"):
            per_group[name] *= alpha[:, None]
        if integer_tail_ratio:  # keep s_t = k s_c and p = L s_c exact after scaling
            per_group["s_t"] = per_group["k"] * per_group["s_c"]
            per_group["p"] = _levels(b) * per_group["s_c"]
        offset = d.reshape(ch_shape) if mode == "exact" else None
        alpha = alpha.reshape(ch_shape)

    inv = np.argsort(perm)

    def to_kernel(x):
        return np.transpose(x.reshape(kt.shape), inv)

    # grid parameters: per output channel, or per (input channel, output channel) for groups
    if gaxis is not None:
        reps = [stop - start for start, stop in bounds]
        order = list(axes) + [gaxis]
        grid_axis = tuple(sorted(order))
        sort_perm = np.argsort(order)

        def to_grid(x):
            full = np.repeat(x, reps, axis=1).reshape(tuple(ch_shape) + (cin,))
            return np.transpose(full, sort_perm)
    else:
        grid_axis = axes

        def to_grid(x):
            return x.reshape(ch_shape)

    axis_attr = grid_axis if len(grid_axis) > 1 else grid_axis[0]
    from tfq.quantizers.grid import PiecewiseGrid, UniformGrid
    if method == "pwlq":
        grid = PiecewiseGrid(breakpoint=to_grid(per_group["p"]), centre_scale=to_grid(per_group["s_c"]),
                             tail_scale=to_grid(per_group["s_t"]), bits_per_piece=b, axis=axis_attr)
        ratio = to_grid(per_group["k"]).astype(np.int64) if integer_tail_ratio else None
        sign_k, tail_k = to_kernel(sign), to_kernel(tail)
    else:
        qmax = 2 ** (weight_bits - 1) - 1
        scale = to_grid(per_group["s_c"])
        grid = UniformGrid(scale=scale, zero_point=np.zeros(scale.shape, dtype=np.int64),
                           bits=weight_bits, qmin=-qmax, qmax=qmax, axis=axis_attr)
        ratio = sign_k = tail_k = None
    w_q = to_kernel(out)
    result = ChannelQuantization(grid=grid, codes=to_kernel(codes), sign=sign_k, tail=tail_k,
                                 tail_ratio=ratio, offset=offset, bias_scale=alpha,
                                 channel_axes=axes, mse=float(np.mean((w_q - arr) ** 2)))
    return w_q.astype(_out_dtype(kernel)), result


def _quantize_rows(rows, method, rule, bits, integer_tail_ratio, kmax):
    if method == "uniform":
        values, codes, s = _uniform_rows(rows, bits)
        return {"values": values, "codes": codes, "s_c": s}
    levels = _levels(bits)
    ratio = _search_ratio(rows, levels) if rule == "search" else _closed_form_ratio(rows, rule)
    if integer_tail_ratio:
        k, top = _integer_ratio_choice(rows, levels, ratio, rule == "search", kmax)
        values, codes, sign, tail, p, s_c, s_t = _integer_ratio_quantize(rows, levels, k, top)
    else:
        m = np.max(np.abs(rows), axis=-1)
        values, codes, sign, tail, p, s_c, s_t = _pw_rows(rows, levels, ratio * m, m)
        k = np.zeros(rows.shape[0])
    return {"values": values, "codes": codes, "sign": sign, "tail": tail,
            "p": p, "s_c": s_c, "s_t": s_t, "k": k}


# ----------------------------------------------------------------------------------------------
# activation calibration (sec. 5)
# ----------------------------------------------------------------------------------------------

def calibration_bounds(batches: Iterable, k: int = 10) -> Tuple[float, float]:
    """Activation clip bounds (sec. 5, SPEC): per batch the k smallest and k largest values;
    each bound is the mean over batches of the lower median of those k values.

    Lower median of k sorted values is the ``(k-1)//2``-th (k=10: 5th smallest, 6th largest).
    Batches with fewer than k values use all their values. Returns ``(lower, upper)``.
    """
    k = _check_int(k, "k", 1, 2 ** 31)
    if isinstance(batches, np.ndarray):
        raise ValueError("batches must be an iterable of arrays (one per batch), not a single array")
    lows, highs = [], []
    for i, batch in enumerate(batches):
        x = _finite_array(batch, f"batches[{i}]", allow_empty=True).reshape(-1)
        if x.size == 0:
            raise ValueError(f"batches[{i}] is empty")
        kk = min(k, x.size)
        smallest = np.sort(np.partition(x, kk - 1)[:kk])
        largest = np.sort(np.partition(x, x.size - kk)[x.size - kk:])
        lows.append(smallest[(kk - 1) // 2])
        highs.append(largest[(kk - 1) // 2])
    if not lows:
        raise ValueError("batches is empty: calibration needs at least one batch")
    return float(np.mean(lows)), float(np.mean(highs))
