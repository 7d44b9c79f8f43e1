"""PWLQ NumPy core (tfq/ptq/pwlq_core.py): expectations from pwlq.txt and SPEC.md, computed
independently of the implementation (hand values, closed forms, brute force)."""
import numpy as np
import pytest

from tfq.ptq import pwlq_core as pc
from tfq.quantizers.grid import PiecewiseGrid, UniformGrid


def _gauss_channels(seed, n=576, channels=96):
    return np.random.default_rng(seed).normal(size=(n, channels))


def _laplace_channels(seed, n=576, channels=96):
    return np.random.default_rng(seed).laplace(size=(n, channels))


# ------------------------------------------------------------------ breakpoints

def test_closed_form_breakpoints_match_spec_reference_values():
    x = np.array([3.0, 8.0])
    np.testing.assert_array_equal(np.round(pc.gaussian_breakpoint(x), 3), [1.161, 2.015])
    np.testing.assert_array_equal(np.round(pc.laplacian_breakpoint(x), 3), [1.074, 1.955])
    # vectorized: shape preserved, scalars work
    assert pc.gaussian_breakpoint(np.full((2, 3), 3.0)).shape == (2, 3)
    assert round(float(pc.laplacian_breakpoint(8.0)), 3) == 1.955


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_closed_form_breakpoints_reject_bad_input(bad):
    for fn in (pc.gaussian_breakpoint, pc.laplacian_breakpoint):
        with pytest.raises(ValueError, match="m_over_sigma"):
            fn([3.0, bad])


def test_search_is_on_the_thousandth_grid_and_close_to_brute_force():
    rng = np.random.default_rng(3)
    w = np.concatenate([rng.normal(size=(16, 300)), rng.laplace(size=(16, 300))])
    m = np.abs(w).max(axis=1)
    p = pc.search_breakpoint(w, 3)
    assert p.shape == (32,)
    ratio = p / m
    np.testing.assert_allclose(ratio * 1000, np.round(ratio * 1000), atol=1e-6)
    assert np.all((ratio > 0) & (ratio < 1))

    def sse(p_rows):
        q, _ = pc.piecewise_quantize(w, 3, p_rows)
        return ((q - w) ** 2).sum(axis=1)

    brute = np.min([sse(r / 1000.0 * m) for r in range(5, 1000, 5)], axis=0)
    assert sse(p).sum() <= 1.01 * brute.sum()


@pytest.mark.parametrize("sampler", [_gauss_channels, _laplace_channels])
def test_search_mse_not_above_closed_forms(sampler):
    w = sampler(7)
    mse = {bp: pc.quantize_channels(w, (1,), 4, breakpoint=bp, bias_correction=False)[1].mse
           for bp in ("gaussian", "laplacian", "search")}
    assert mse["search"] <= mse["gaussian"]
    assert mse["search"] <= mse["laplacian"]


def test_closed_form_rule_is_what_quantize_channels_uses():
    w = _gauss_channels(11, n=200, channels=4)
    q, res = pc.quantize_channels(w, (1,), 4, breakpoint="laplacian", bias_correction=False)
    for c in range(4):
        col = w[:, c]
        m, sigma = np.abs(col).max(), col.std(ddof=1)
        p = pc.laplacian_breakpoint(m / sigma) * sigma
        np.testing.assert_allclose(res.grid.breakpoint[c], p, rtol=1e-12)
        expect, _ = pc.piecewise_quantize(col, 4, p)
        np.testing.assert_allclose(q[:, c], expect, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ PWLQ vs uniform

@pytest.mark.parametrize("sampler", [_gauss_channels, _laplace_channels])
@pytest.mark.parametrize("bits_mean", ["piece", "comp"])
def test_4bit_pwlq_mse_well_below_4bit_uniform(sampler, bits_mean):
    w = sampler(0) * np.random.default_rng(1).uniform(0.05, 3.0, size=96)  # per-channel scales
    uni = pc.quantize_channels(w, (1,), 4, method="uniform", bias_correction=False)[1].mse
    for bp in ("gaussian", "laplacian", "search"):
        for itr in (False, True):
            pw = pc.quantize_channels(w, (1,), 4, breakpoint=bp, bias_correction=False,
                                      bits_mean=bits_mean, integer_tail_ratio=itr)[1].mse
            assert pw <= 0.35 * uni, (bp, itr, pw / uni)


# ------------------------------------------------------------------ eq. 3 by hand

def test_piecewise_quantize_hand_computed():
    # b = 2 bits per piece (L = 3), p = 0.6, m = 1.0: centre step 0.2, tail step 0.4/3
    w = np.array([0.0, 0.13, -0.35, 0.55, 0.6, 0.74, -0.95, 1.0])
    q, info = pc.piecewise_quantize(w, 2, 0.6)
    t = 0.4 / 3
    expected = [0.0, 0.2, -0.4, 0.6, 0.6, 0.6 + t, -1.0, 1.0]
    np.testing.assert_allclose(q, expected, atol=1e-12)
    np.testing.assert_array_equal(info.codes, [0, 1, 2, 3, 3, 1, 3, 3])
    np.testing.assert_array_equal(info.tail, [False, False, False, False, False, True, True, True])
    np.testing.assert_array_equal(info.sign, [1, 1, -1, 1, 1, 1, -1, 1])
    assert float(info.centre_scale) == pytest.approx(0.2)
    assert float(info.tail_scale) == pytest.approx(t)
    assert float(info.breakpoint) == pytest.approx(0.6)


def test_piecewise_quantize_clips_to_max_abs_and_rows_are_independent():
    w = np.array([[0.1, 0.5, 2.0], [0.05, -0.3, 0.2]])
    q, info = pc.piecewise_quantize(w, 1, [0.4, 0.1], max_abs=[1.0, 0.3])
    # row 0: centre {0, 0.4}, tail {0.4, 1.0}; row 1: centre {0, 0.1}, tail {0.1, 0.3}
    np.testing.assert_allclose(q, [[0.0, 0.4, 1.0], [0.0, -0.3, 0.3]], atol=1e-12)
    np.testing.assert_allclose(info.centre_scale, [0.4, 0.1])
    np.testing.assert_allclose(info.tail_scale, [0.6, 0.2])


@pytest.mark.parametrize("b", [1, 2, 3, 4, 6, 8])
def test_codes_per_piece_within_2_to_the_b_levels(b):
    w = _laplace_channels(5, n=400, channels=6).T
    p = 0.3 * np.abs(w).max(axis=1)
    q, info = pc.piecewise_quantize(w, b, p)
    assert info.codes.min() >= 0 and info.codes.max() <= 2 ** b - 1
    for piece in (info.tail, ~info.tail):  # each piece uses at most 2^b magnitudes
        for r in range(w.shape[0]):
            assert len(np.unique(info.codes[r][piece[r]])) <= 2 ** b
    np.testing.assert_array_equal(info.tail, np.abs(w) > p[:, None])
    recon = info.sign * np.where(info.tail, info.breakpoint[:, None] + info.codes * info.tail_scale[:, None],
                                 info.codes * info.centre_scale[:, None])
    np.testing.assert_allclose(recon, q, atol=1e-12)
    # error bounded by half a step of the piece
    step = np.where(info.tail, info.tail_scale[:, None], info.centre_scale[:, None])
    assert np.all(np.abs(q - w) <= step / 2 + 1e-12)


# ------------------------------------------------------------------ uniform baseline

def test_uniform_quantize_hand_computed_and_grid():
    w = np.array([[-1.0, 0.3, 0.6, 0.1], [0.025, -0.04, 0.01, 0.0]])
    q, grid = pc.uniform_quantize(w, 3, axis=0)  # qmax = 3
    np.testing.assert_allclose(q[0], [-1.0, 1 / 3, 2 / 3, 0.0], atol=1e-12)
    s1 = 0.04 / 3  # 0.025/s1 = 1.875 -> 2, 0.01/s1 = 0.75 -> 1
    np.testing.assert_allclose(q[1], [2 * s1, -3 * s1, s1, 0.0], atol=1e-12)
    assert isinstance(grid, UniformGrid)
    assert (grid.qmin, grid.qmax, grid.bits) == (-3, 3, 3)
    np.testing.assert_allclose(grid.scale, [1 / 3, 0.04 / 3])
    np.testing.assert_allclose(grid.dequantize(grid.quantize(w)), q, atol=1e-12)


# ------------------------------------------------------------------ bias correction

@pytest.mark.parametrize("shape,axes", [((3, 3, 8, 5), (3,)), ((3, 3, 4, 2), (2, 3)), ((20, 6), (1,))])
def test_bias_correction_exact_restores_channel_mean_and_std(shape, axes):
    rng = np.random.default_rng(2)
    w = rng.normal(0.1, 1.0, size=shape) * rng.uniform(0.1, 3.0, size=shape[axes[0]:][:len(axes)])
    w_q = np.round(w * 2) / 2 + 0.05  # a biased, coarse quantization
    out = pc.bias_correct(w, w_q, axes)
    other = tuple(a for a in range(len(shape)) if a not in axes)
    np.testing.assert_allclose(out.kernel.mean(axis=other), w.mean(axis=other), atol=1e-6)
    np.testing.assert_allclose(out.kernel.std(axis=other, ddof=1), w.std(axis=other, ddof=1), atol=1e-6)
    # the documented decomposition: kernel = scale * w_q + offset per channel
    bshape = [shape[a] if a in axes else 1 for a in range(len(shape))]
    np.testing.assert_allclose(out.kernel, out.scale.reshape(bshape) * w_q + out.offset.reshape(bshape),
                               atol=1e-12)
    scaled = pc.bias_correct(w, w_q, axes, mode="scale")  # exportable: no additive term
    np.testing.assert_array_equal(scaled.offset, 0.0)
    np.testing.assert_allclose(scaled.kernel.std(axis=other, ddof=1), w.std(axis=other, ddof=1), atol=1e-6)
    np.testing.assert_allclose(scaled.kernel, scaled.scale.reshape(bshape) * w_q, atol=1e-12)


def test_bias_correction_results_stay_on_their_grid():
    w = np.random.default_rng(4).laplace(size=(3, 3, 16, 8)) + 0.02
    for bc in (True, "scale"):
        q, res = pc.quantize_channels(w, (3,), 4, bias_correction=bc)
        assert res.offset is None and res.bias_scale.shape == (8,)
        np.testing.assert_allclose(res.dequantize(), q, atol=1e-12)
        np.testing.assert_allclose(q.std(axis=(0, 1, 2), ddof=1), w.std(axis=(0, 1, 2), ddof=1), atol=1e-9)
    q, res = pc.quantize_channels(w, (3,), 4, bias_correction="exact")
    assert res.offset.shape == (8,)
    np.testing.assert_allclose(res.dequantize(), q, atol=1e-12)
    np.testing.assert_allclose(q.mean(axis=(0, 1, 2)), w.mean(axis=(0, 1, 2)), atol=1e-9)
    q0, res0 = pc.quantize_channels(w, (3,), 4, bias_correction=False)
    assert res0.offset is None and res0.bias_scale is None
    # the grid of the uncorrected kernel times alpha is the grid of the corrected one
    np.testing.assert_allclose(res.grid.centre_scale, res0.grid.centre_scale * res.bias_scale, rtol=1e-12)


# ------------------------------------------------------------------ calibration

def test_calibration_bounds_lower_median_of_top_k_averaged_over_batches():
    rng = np.random.default_rng(0)
    batches = []
    for i in range(3):
        x = rng.uniform(-1, 1, size=(4, 250))
        flat = x.reshape(-1)
        flat[:10] = -(10.0 + np.arange(10)) * (i + 1)   # 10 smallest: -10..-19 times (i+1)
        flat[10:20] = (10.0 + np.arange(10)) * (i + 1)  # 10 largest: 10..19 times (i+1)
        batches.append(x)
    lo, hi = pc.calibration_bounds(batches, k=10)
    # lower median of 10 sorted values = 5th: smallest side -15(i+1), largest side 14(i+1)
    assert lo == pytest.approx(-15.0 * 2)
    assert hi == pytest.approx(14.0 * 2)
    lo1, hi1 = pc.calibration_bounds(iter(batches), k=1)  # k = 1: plain min / max
    assert (lo1, hi1) == (pytest.approx(-19.0 * 2), pytest.approx(19.0 * 2))


def test_calibration_bounds_rejects_bad_batches():
    with pytest.raises(ValueError, match="batches"):
        pc.calibration_bounds([])
    with pytest.raises(ValueError, match=r"batches\[1\]"):
        pc.calibration_bounds([np.ones(20), np.array([1.0, np.nan])])
    with pytest.raises(ValueError, match=r"batches\[0\]"):
        pc.calibration_bounds([np.array([np.inf, 1.0])])
    with pytest.raises(ValueError, match=r"batches\[0\] is empty"):
        pc.calibration_bounds([np.zeros((0, 3))])
    with pytest.raises(ValueError, match="k must be"):
        pc.calibration_bounds([np.ones(20)], k=0)


# ------------------------------------------------------------------ layouts

def test_channel_axes_for_layers():
    assert pc.channel_axes_for("Conv2D") == (3,)
    assert pc.channel_axes_for("DepthwiseConv2D") == (2, 3)
    assert pc.channel_axes_for("Dense") == (1,)
    with pytest.raises(ValueError, match="layer_type_name.*'Conv2D'"):
        pc.channel_axes_for("Conv1D")


def _expected_channel(col, bits, rule):
    """Independent per-channel reference: closed-form p, eq. 3 on one flattened channel."""
    m, sigma = np.abs(col).max(), col.std(ddof=1)
    fn = pc.gaussian_breakpoint if rule == "gaussian" else pc.laplacian_breakpoint
    return pc.piecewise_quantize(col, bits, fn(m / sigma) * sigma)[0]


@pytest.mark.parametrize("layer,shape", [("Conv2D", (3, 3, 6, 5)), ("DepthwiseConv2D", (3, 3, 4, 2)),
                                         ("Dense", (24, 5))])
def test_per_channel_layouts(layer, shape):
    rng = np.random.default_rng(8)
    axes = pc.channel_axes_for(layer)
    ch_shape = tuple(shape[a] for a in axes)
    scales = 10.0 ** np.arange(-3, -3 + np.prod(ch_shape)).reshape(ch_shape)  # 1e-3 .. 1e+N
    bshape = [shape[a] if a in axes else 1 for a in range(len(shape))]
    w = rng.normal(size=shape) * scales.reshape(bshape)
    q, res = pc.quantize_channels(w, axes, 4, breakpoint="gaussian", bias_correction=False)
    assert isinstance(res.grid, PiecewiseGrid)
    assert res.grid.centre_scale.shape == ch_shape and res.grid.axis == (axes if len(axes) > 1 else axes[0])
    for idx in np.ndindex(*ch_shape):
        sl = [slice(None)] * len(shape)
        for a, i in zip(axes, idx):
            sl[a] = i
        col = w[tuple(sl)].reshape(-1)
        np.testing.assert_allclose(q[tuple(sl)].reshape(-1), _expected_channel(col, 4, "gaussian"),
                                   rtol=1e-12, atol=0)
        # scale of each channel follows its own range
        assert res.grid.centre_scale[idx] < np.abs(col).max() / 15 + 1e-300
    np.testing.assert_allclose(res.dequantize(), q, rtol=1e-12)
    # uniform baseline: per-channel max-abs scale on the same axes
    qu, ru = pc.quantize_channels(w, axes, 4, method="uniform", bias_correction=False)
    other = tuple(a for a in range(len(shape)) if a not in axes)
    np.testing.assert_allclose(ru.grid.scale, np.abs(w).max(axis=other) / 7, rtol=1e-12)
    np.testing.assert_allclose(ru.grid.dequantize(ru.codes), qu, rtol=1e-12)


def test_float32_kernel_stays_float32():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype(np.float32)
    q, _ = pc.quantize_channels(w, (3,), 4)
    assert q.dtype == np.float32


def test_all_zero_channel_is_zero_with_positive_scales():
    w = np.random.default_rng(0).normal(size=(10, 3))
    w[:, 1] = 0.0
    for itr in (False, True):
        q, res = pc.quantize_channels(w, (1,), 4, breakpoint="search", integer_tail_ratio=itr)
        np.testing.assert_array_equal(q[:, 1], 0.0)
        assert np.all(res.grid.centre_scale > 0) and np.all(res.grid.tail_scale > 0)
        assert np.all(np.isfinite(q))


# ------------------------------------------------------------------ groups

@pytest.mark.parametrize("shape,group", [((256, 16), 32), ((1, 1, 128, 8), 32), ((3, 3, 600, 4), 256)])
def test_group_granularity_not_worse_than_channel(shape, group):
    rng = np.random.default_rng(9)
    in_axis = len(shape) - 2
    in_scale = rng.uniform(0.2, 3.0, size=shape[in_axis])  # input-channel range variation
    bshape = [shape[in_axis] if a == in_axis else 1 for a in range(len(shape))]
    w = rng.laplace(size=shape) * in_scale.reshape(bshape)
    axes = (len(shape) - 1,)
    for bp in ("gaussian", "search"):
        qc, rc = pc.quantize_channels(w, axes, 4, breakpoint=bp, granularity="channel", bias_correction=False)
        qg, rg = pc.quantize_channels(w, axes, 4, breakpoint=bp, granularity="group", bias_correction=False)
        assert rg.mse <= rc.mse
        np.testing.assert_allclose(rg.dequantize(), qg, rtol=1e-12)
    # grid: per (input channel, output channel), constant within a group, groups differ
    assert rg.grid.axis == (in_axis, in_axis + 1)
    s = rg.grid.centre_scale
    assert s.shape == (shape[in_axis], shape[-1])
    starts = list(range(0, shape[in_axis], group))
    for st in starts:
        np.testing.assert_array_equal(s[st:st + group], np.broadcast_to(s[st], s[st:st + group].shape))
    assert len(starts) > 1 and not np.allclose(s[0], s[starts[1]])
    # each group is quantized alone: group 1 of output channel 0 equals a separate call
    sl = [slice(None)] * len(shape)
    sl[in_axis] = slice(group, 2 * group)
    sl[-1] = 0
    col = w[tuple(sl)].reshape(-1)
    q_alone, _ = pc.quantize_channels(col[:, None], (1,), 4, breakpoint="search", bias_correction=False)
    np.testing.assert_allclose(qg[tuple(sl)].reshape(-1), q_alone[:, 0], rtol=1e-12)


def test_group_on_depthwise_equals_channel():
    w = np.random.default_rng(1).normal(size=(3, 3, 8, 2))
    qc, _ = pc.quantize_channels(w, (2, 3), 4, granularity="channel")
    qg, _ = pc.quantize_channels(w, (2, 3), 4, granularity="group")
    np.testing.assert_array_equal(qc, qg)


# ------------------------------------------------------------------ integer tail ratio

@pytest.mark.parametrize("weight_bits,bits_mean", [(4, "piece"), (4, "comp"), (3, "piece"), (6, "piece"),
                                                    (5, "stor")])
@pytest.mark.parametrize("bp", ["gaussian", "laplacian", "search"])
def test_integer_tail_ratio_is_integer_and_int8_exact(weight_bits, bits_mean, bp):
    w = np.random.default_rng(6).laplace(size=(3, 3, 16, 12)) * np.random.default_rng(7).uniform(0.1, 2, 12)
    b = pc.bits_per_piece(weight_bits, bits_mean)
    levels = 2 ** b - 1
    q, res = pc.quantize_channels(w, (3,), weight_bits, breakpoint=bp, bits_mean=bits_mean,
                                  integer_tail_ratio=True, bias_correction=True)
    g = res.grid
    ratio = g.tail_scale / g.centre_scale
    np.testing.assert_allclose(ratio, np.round(ratio), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(np.round(ratio), res.tail_ratio)
    assert np.all(res.tail_ratio >= 1)
    np.testing.assert_allclose(g.breakpoint, levels * g.centre_scale, rtol=1e-12)
    n = res.integer_codes()
    assert np.abs(n).max() <= 127
    np.testing.assert_allclose(n * g.centre_scale, q, rtol=1e-12)  # one int8 conv, per-channel scale
    if pc.max_integer_tail_ratio(b) >= 3:  # with k = 1 only (b = 6) the grid is uniform
        free = pc.quantize_channels(w, (3,), weight_bits, breakpoint=bp, bits_mean=bits_mean,
                                    bias_correction=True)[1].mse
        assert res.mse <= 1.3 * free
    else:
        np.testing.assert_array_equal(res.tail_ratio, 1)


def test_integer_tail_ratio_closed_form_rounds_the_rule_ratio():
    w = _gauss_channels(12, n=300, channels=10)
    q, res = pc.quantize_channels(w, (1,), 4, breakpoint="gaussian", integer_tail_ratio=True,
                                  bias_correction=False)
    qs, rs = pc.quantize_channels(w, (1,), 4, breakpoint="search", integer_tail_ratio=True,
                                  bias_correction=False)
    fixed_m_best = []
    for c in range(w.shape[1]):
        col = w[:, c]
        m, sigma = np.abs(col).max(), col.std(ddof=1)
        p0 = pc.gaussian_breakpoint(m / sigma) * sigma
        r = (m - p0) / p0
        errs = {}
        for k in {int(np.floor(r)), int(np.ceil(r))}:  # range kept at m: p = m / (k + 1)
            errs[k] = ((pc.piecewise_quantize(col, 4, m / (k + 1))[0] - col) ** 2).sum()
        k_best = min(errs, key=errs.get)
        assert res.tail_ratio[c] == k_best
        np.testing.assert_allclose(res.grid.breakpoint[c], m / (k_best + 1), rtol=1e-12)
        # the search variant tries every k (and the range top): never worse per channel
        assert ((qs[:, c] - col) ** 2).sum() <= ((q[:, c] - col) ** 2).sum() + 1e-12
        fixed_m_best.append(min(((pc.piecewise_quantize(col, 4, m / (k + 1))[0] - col) ** 2).sum()
                                for k in range(1, 8)))
    # moving the range top (clipping or widening) beats the best k at top = m on Gaussians
    assert ((qs - w) ** 2).sum() <= 0.98 * sum(fixed_m_best)


def test_integer_tail_ratio_needs_codes_that_fit_int8():
    with pytest.raises(ValueError, match="integer_tail_ratio.*<= 6"):
        pc.quantize_channels(np.ones((4, 2)), (1,), 7, integer_tail_ratio=True)
    with pytest.raises(ValueError, match="method='pwlq'"):
        pc.quantize_channels(np.ones((4, 2)), (1,), 4, method="uniform", integer_tail_ratio=True)
    assert pc.max_integer_tail_ratio(4) == 7  # 15 * (7 + 1) = 120 <= 127 < 15 * 9


# ------------------------------------------------------------------ bit budgets and validation

def test_bits_per_piece_modes():
    assert [pc.bits_per_piece(4, m) for m in ("piece", "comp", "stor")] == [4, 3, 2]
    assert pc.bits_per_piece(2, "comp") == 1 and pc.bits_per_piece(8, "piece") == 8
    with pytest.raises(ValueError, match="bits_mean.*'piece', 'comp', 'stor'"):
        pc.bits_per_piece(4, "storage")
    with pytest.raises(ValueError, match="weight_bits >= 3"):
        pc.bits_per_piece(2, "stor")
    for bad in (1, 9, 4.0, True, "4"):
        with pytest.raises(ValueError, match=r"weight_bits must be an integer in 2\.\.8"):
            pc.bits_per_piece(bad, "piece")


def test_bad_inputs_name_the_argument():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 8))
    bad_w = w.copy()
    bad_w[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="kernel contains NaN or Inf"):
        pc.quantize_channels(bad_w, (3,), 4)
    bad_w[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="kernel contains NaN or Inf"):
        pc.quantize_channels(bad_w, (3,), 4)
    cases = [
        (dict(breakpoint="normal"), "breakpoint must be one of 'gaussian', 'laplacian', 'search'"),
        (dict(granularity="layer"), "granularity must be one of 'channel', 'group'"),
        (dict(method="pw-2"), "method must be one of 'pwlq', 'uniform'"),
        (dict(bias_correction="yes"), "bias_correction must be one of"),
        (dict(bits_mean="x"), "bits_mean must be one of"),
        (dict(integer_tail_ratio=1), "integer_tail_ratio must be one of False, True"),
        (dict(group_size=0), "group_size must be an integer"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            pc.quantize_channels(w, (3,), 4, **kwargs)
    with pytest.raises(ValueError, match="weight_bits"):
        pc.quantize_channels(w, (3,), 9)
    with pytest.raises(ValueError, match="weight_bits"):
        pc.quantize_channels(w, (3,), 1, method="uniform")
    with pytest.raises(ValueError, match="channel_axes"):
        pc.quantize_channels(w, (4,), 4)
    with pytest.raises(ValueError, match="channel_axes"):
        pc.quantize_channels(w, (3, 3), 4)
    with pytest.raises(ValueError, match="bits_per_piece must be an integer in 1..8"):
        pc.piecewise_quantize(w[..., 0].ravel(), 0, 0.5)
    with pytest.raises(ValueError, match="bits_per_piece"):
        pc.search_breakpoint(w.reshape(8, -1), 9)
    with pytest.raises(ValueError, match="breakpoint must satisfy"):
        pc.piecewise_quantize(np.array([0.5, 1.0]), 4, 1.0)
    with pytest.raises(ValueError, match="breakpoint must satisfy"):
        pc.piecewise_quantize(np.array([0.5, 1.0]), 4, -0.1)
    with pytest.raises(ValueError, match="breakpoint contains NaN"):
        pc.piecewise_quantize(np.array([0.5, 1.0]), 4, np.nan)
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        pc.uniform_quantize(w, 1, axis=3)
    with pytest.raises(ValueError, match="w contains NaN"):
        pc.uniform_quantize(np.array([1.0, np.nan]), 4)
    with pytest.raises(ValueError, match="same shape"):
        pc.bias_correct(w, w[..., :4], (3,))
    with pytest.raises(ValueError, match="mode must be one of 'exact', 'scale'"):
        pc.bias_correct(w, w, (3,), mode="mean")
    with pytest.raises(ValueError, match="w_q contains NaN"):
        pc.bias_correct(w, bad_w, (3,))
