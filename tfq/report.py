"""``tfq report RUN_DIR``: what a quantized run learned, layer by layer.

Works on any run directory holding ``quantized.h5`` (``tfq train``, ``tfq ptq``) and never asks
which method made a quantizer: it reads

* the integer grids (``integer_grid``: UniformGrid scale/zero point, ThresholdGrid thresholds,
  CodebookGrid levels, PiecewiseGrid breakpoints; a PWLQ ``ShiftedGrid`` is unwrapped),
* ``effective_bits`` through ``tfq.costs`` (bits, weight memory, BitOPs),
* the quantizers' forward at ``training=False`` (weight quantization MSE: mean of
  ``(W - Q(W))^2``; activation MSE on a few test examples),
* the scalars the run's callbacks logged to TensorBoard (bit-width trajectories: AdaQAT's
  ``adaqat/weight_N`` ..., DDQ's ``ddq/bits/<layer>``).

Writes ``RUN_DIR/report/``: ``report.md``, ``report.json``, PNG plots (``bits.png``,
``trajectories.png`` when the run logged bit-widths, ``weight_levels.png``,
``activation_levels.png``) and the same numbers to ``report/tensorboard`` (tf.summary).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

REPORT_DIR = "report"
#: test examples pushed through the model for activation histograms and MSE
DEFAULT_EXAMPLES = 256
#: at most this many values of one tensor are kept for a histogram
_SAMPLE = 20000
#: uniform grids with more codes than this are drawn by their range only
_MAX_DRAWN_LEVELS = 64
#: a weight MSE below this fraction of mean(W^2) means the kernel already holds grid values
_ON_GRID = 1e-12
#: suffixes of logged scalars that are bit-widths (trajectory plots)
_BIT_TAG_ENDINGS = ("_N", "_bits", "bits_per_weight")


# --- integer grids ---------------------------------------------------------------------------
def _unwrap(grid):
    """(inner grid, per-channel shift or None): PWLQ's exact bias correction wraps its grid."""
    inner = getattr(grid, "grid", None)
    if inner is not None and hasattr(grid, "shift"):
        return inner, np.asarray(grid.shift)
    return grid, None


def _span(values, fmt="{:.4g}"):
    values = np.asarray(values, np.float64).ravel()
    if values.size == 1 or np.all(values == values[0]):
        return fmt.format(values[0])
    return f"{fmt.format(values.min())}..{fmt.format(values.max())} ({values.size} ch)"


def _uniform(grid):
    data = {"grid": "UniformGrid", "bits": int(grid.bits), "qmin": int(grid.qmin), "qmax": int(grid.qmax),
            "scale": grid.scale.tolist(), "zero_point": grid.zero_point.tolist(),
            "per_channel": grid.axis is not None}
    text = f"uniform [{grid.qmin}, {grid.qmax}] s={_span(grid.scale)} z={_span(grid.zero_point, '{:.0f}')}"
    return data, text


def _threshold(grid):
    data = {"grid": "ThresholdGrid", "bits": int(grid.bits), "thresholds": grid.thresholds.tolist(),
            "out_scale": float(grid.out_scale), "out_zero_point": int(grid.out_zero_point)}
    shown = ", ".join(f"{t:.3g}" for t in grid.thresholds[:7]) + (" ..." if grid.thresholds.size > 7 else "")
    return data, f"thresholds {shown}; out step {grid.out_scale:.4g}"


def _codebook(grid):
    levels = np.atleast_2d(grid.levels_int8)
    data = {"grid": "CodebookGrid", "bits": int(grid.bits), "levels_int8": grid.levels_int8.tolist(),
            "scale": grid.scale.tolist(), "zero_point": int(grid.zero_point),
            "per_channel": grid.axis is not None}
    first = np.unique(levels[0])
    shown = ", ".join(str(int(c)) for c in first[:8]) + (" ..." if first.size > 8 else "")
    where = " (ch 0)" if levels.shape[0] > 1 else ""
    return data, f"codebook {first.size} levels{where}: codes {shown}; s={_span(grid.scale)}"


def _piecewise(grid):
    data = {"grid": "PiecewiseGrid", "bits_per_piece": int(grid.bits_per_piece),
            "breakpoint": grid.breakpoint.tolist(), "centre_scale": grid.centre_scale.tolist(),
            "tail_scale": grid.tail_scale.tolist(), "per_channel": grid.axis is not None}
    return data, (f"piecewise {grid.bits_per_piece} b/piece, p={_span(grid.breakpoint)}, "
                  f"s_c={_span(grid.centre_scale)}, s_t={_span(grid.tail_scale)}")


def _describers():
    from tfq.quantizers import grid as g
    return {g.UniformGrid: _uniform, g.ThresholdGrid: _threshold, g.CodebookGrid: _codebook,
            g.PiecewiseGrid: _piecewise}


def describe_grid(grid):
    """``(json-able dict, one-line text)`` of an integer grid."""
    inner, shift = _unwrap(grid)
    describe = _describers().get(type(inner))
    if describe is None:
        return {"grid": type(inner).__name__}, type(inner).__name__
    data, text = describe(inner)
    if shift is not None:
        data["shift"] = shift.tolist()
        text += f" + shift {_span(shift)}"
    return data, text


def quantizer_grid(quantizer, qvars):
    """``(grid, None)`` or ``(None, reason)`` when the quantizer has no grid yet (uncalibrated,
    or a bit-width export cannot hold)."""
    if quantizer is None:
        return None, "float"
    try:
        return quantizer.integer_grid(qvars), None
    except Exception as err:  # noqa: BLE001  (the reason goes into the report)
        return None, f"no integer grid: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def _channel_rows(values, axis, ndim):
    """``values`` as ``[channels, -1]`` with the per-channel ``axis`` first (row-major)."""
    values = np.asarray(values)
    if axis is None:
        return values.reshape(1, -1)
    axes = sorted(a % ndim for a in ((axis,) if isinstance(axis, (int, np.integer)) else axis))
    rest = [a for a in range(ndim) if a not in axes]
    moved = np.transpose(values, axes + rest)
    return moved.reshape(int(np.prod([values.shape[a] for a in axes])), -1)


def _channel(value, index):
    flat = np.asarray(value, np.float64).ravel()
    return float(flat[index if flat.size > 1 else 0])


def grid_marks(grid, channel=0):
    """Real values to draw over a histogram: ``{"levels": [...], "thresholds": [...],
    "breakpoints": [...], "range": (lo, hi)}`` for one channel of a per-channel grid."""
    from tfq.quantizers import grid as g
    inner, shift = _unwrap(grid)
    offset = 0.0 if shift is None else _channel(shift, channel)
    marks = {"levels": [], "thresholds": [], "breakpoints": [], "range": None}
    if isinstance(inner, g.UniformGrid):
        s, z = _channel(inner.scale, channel), _channel(inner.zero_point, channel)
        lo, hi = (inner.qmin - z) * s + offset, (inner.qmax - z) * s + offset
        marks["range"] = (lo, hi)
        if inner.num_codes <= _MAX_DRAWN_LEVELS:
            marks["levels"] = ((np.arange(inner.qmin, inner.qmax + 1) - z) * s + offset).tolist()
    elif isinstance(inner, g.ThresholdGrid):
        marks["thresholds"] = inner.thresholds.tolist()
    elif isinstance(inner, g.CodebookGrid):
        rows = np.atleast_2d(inner.levels_int8)
        row = rows[channel if rows.shape[0] > 1 else 0]
        levels = (np.unique(row) - inner.zero_point) * _channel(inner.scale, channel) + offset
        marks["levels"] = levels.tolist()
        marks["range"] = (float(levels.min()), float(levels.max()))
    elif isinstance(inner, g.PiecewiseGrid):
        p = _channel(inner.breakpoint, channel)
        codes = np.arange(2 ** inner.bits_per_piece)
        magnitudes = np.concatenate([codes * _channel(inner.centre_scale, channel),
                                     p + codes * _channel(inner.tail_scale, channel)])
        marks["levels"] = (np.unique(np.concatenate([-magnitudes, magnitudes])) + offset).tolist()
        marks["breakpoints"] = [-p + offset, p + offset]
        marks["range"] = (float(min(marks["levels"])), float(max(marks["levels"])))
    return marks


# --- per-layer numbers -----------------------------------------------------------------------
def _kernel(layer):
    """(kernel variable, quantizer, quantizer variables) of a QuantizeWrapper, or Nones."""
    from tfq import costs
    entries = costs.weight_quantizers(layer)
    return entries[-1] if entries else (None, None, None)


def _is_calibrated(qvars):
    from tfq.quantizers import base
    return "initialized" not in (qvars or {}) or base.TFQQuantizer.is_initialized(qvars)


def weight_mse(quantizer, qvars, kernel):
    """``mean((W - Q(W))^2)`` with Q the quantizer's forward at ``training=False``; None when the
    quantizer has not been calibrated (the forward would initialise it)."""
    import tensorflow as tf
    if quantizer is None or kernel is None or not _is_calibrated(qvars):
        return None
    w = tf.convert_to_tensor(kernel)
    fake = quantizer(w, False, weights=qvars)
    return float(np.mean((w.numpy().astype(np.float64) - np.asarray(fake, np.float64)) ** 2))


def _sample(values, rng):
    flat = np.asarray(values, np.float32).ravel()
    if flat.size > _SAMPLE:
        flat = rng.choice(flat, _SAMPLE, replace=False)
    return flat


def quantizer_io(model, x, quantizers):
    """``{id(quantizer): (input values, fake-quantized values)}`` of the given activation
    quantizers, recorded while ``model(x, training=False)`` runs eagerly (each quantizer's
    ``_forward`` is wrapped for the duration of the call)."""
    recorded, patched = {}, []

    def recording(quantizer, forward):
        def run(inputs, training, weights):
            out = forward(inputs, training, weights)
            recorded[id(quantizer)] = (np.asarray(inputs), np.asarray(out))
            return out
        return run

    for q in {id(q): q for q in quantizers if q is not None and hasattr(q, "_forward")}.values():
        q._forward = recording(q, q._forward)
        patched.append(q)
    try:
        model(x, training=False)
    finally:
        for q in patched:
            del q._forward  # back to the class method
    return recorded


def layer_rows(model, x=None, seed=0):
    """One dict per weighted layer (``tfq.costs.layer_costs`` order): quantizers, bits, grids,
    weight memory (bits), BitOPs, weight MSE, activation MSE (when ``x`` is given) and the values
    the plots need (kept under ``"_plot"``)."""
    from tfq import costs
    rng = np.random.default_rng(seed)
    rows = []
    layer_list = costs.layer_costs(model)
    io = {}
    if x is not None:
        io = quantizer_io(model, x, [c.activation_quantizer for c in layer_list if _is_calibrated(c.activation_vars)])
    for c in layer_list:
        layer = model.get_layer(c.name)
        kernel, _, _ = _kernel(layer)
        wb, ab = float(costs.weight_bits(c)), float(costs.activation_bits(c))
        w_grid, w_reason = quantizer_grid(c.weight_quantizer, c.weight_vars)
        a_grid, a_reason = quantizer_grid(c.activation_quantizer, c.activation_vars)
        row = {"layer": c.name, "type": c.kind, "params": c.params, "macs": c.macs,
               "weight_quantizer": type(c.weight_quantizer).__name__ if c.weight_quantizer else None,
               "activation_quantizer": type(c.activation_quantizer).__name__ if c.activation_quantizer else None,
               "weight_bits": wb, "activation_bits": ab, "weight_memory_bits": c.params * wb,
               "bitops": c.macs * wb * ab,
               "weight_mse": weight_mse(c.weight_quantizer, c.weight_vars, kernel),
               "activation_mse": None, "kernel_on_grid": False}
        row["weight_grid"], row["weight_grid_text"] = describe_grid(w_grid) if w_grid is not None else ({}, w_reason)
        row["activation_grid"], row["activation_grid_text"] = (describe_grid(a_grid) if a_grid is not None
                                                               else ({}, a_reason))
        plot = {"weight_grid": w_grid, "activation_grid": a_grid, "weights": None, "activations": None,
                "channel_note": ""}
        if kernel is not None:
            values = kernel.numpy()
            if row["weight_mse"] is not None:
                # post-training models (PWLQ) store the quantized kernel itself: Q(W) = W
                row["kernel_on_grid"] = row["weight_mse"] <= _ON_GRID * float(np.mean(np.square(values)))
            axis = getattr(_unwrap(w_grid)[0], "axis", None) if w_grid is not None else None
            rows_by_channel = _channel_rows(values, axis, values.ndim)
            plot["weights"] = _sample(rows_by_channel[0], rng)
            plot["channel_note"] = " (channel 0)" if rows_by_channel.shape[0] > 1 else ""
            plot["all_weights"] = _sample(values, rng)
        recorded = io.get(id(c.activation_quantizer))
        if recorded is not None:
            inputs, outputs = recorded
            row["activation_mse"] = float(np.mean((inputs.astype(np.float64) - outputs.astype(np.float64)) ** 2))
            plot["activations"] = _sample(inputs, rng)
        row["_plot"] = plot
        rows.append(row)
    return rows


# --- bit-width trajectories --------------------------------------------------------------------
def read_trajectories(log_dir):
    """``{tag: (steps, values)}`` of every bit-width scalar (tag ending in ``_N``, ``_bits`` or
    ``bits_per_weight``, or under ``.../bits/...``) in the TensorBoard event files below
    ``log_dir``."""
    import tensorflow as tf
    found = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents*"), recursive=True)):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                tag = value.tag
                if not (tag.endswith(_BIT_TAG_ENDINGS) or "/bits/" in tag):
                    continue
                if value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                elif value.HasField("simple_value"):
                    number = float(value.simple_value)
                else:
                    continue
                found.setdefault(tag, {})[int(event.step)] = number
    return {tag: (sorted(points), [points[s] for s in sorted(points)]) for tag, points in found.items()}


# --- plots ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_bits(rows, path):
    plt = _pyplot()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * n + 2), 3.5))
    index = np.arange(n)
    ax.bar(index - 0.2, [r["weight_bits"] for r in rows], 0.4, label="weights")
    ax.bar(index + 0.2, [r["activation_bits"] for r in rows], 0.4, label="input activations")
    ax.set_xticks(index, [r["layer"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("bits")
    ax.set_title("per-layer bit allocation (32 = float)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_trajectories(trajectories, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for tag, (steps, values) in sorted(trajectories.items()):
        ax.plot(steps, values, label=tag, drawstyle="steps-post" if tag.endswith("_bits") else "default")
    ax.set_xlabel("step (AdaQAT: training step; DDQ: epoch)")
    ax.set_ylabel("bits")
    ax.set_title("bit-widths over training")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def _draw_marks(ax, marks):
    if marks is None:
        return
    for value in marks["levels"]:
        ax.axvline(value, color="tab:red", lw=0.6, alpha=0.7)
    for value in marks["thresholds"]:
        ax.axvline(value, color="tab:green", lw=0.8, ls="--")
    for value in marks["breakpoints"]:
        ax.axvline(value, color="black", lw=1.2, ls=":")
    if marks["range"] is not None and not marks["levels"]:
        ax.axvspan(*marks["range"], color="tab:red", alpha=0.12)


def plot_levels(rows, key, grid_key, path, title):
    """One panel per layer: histogram of ``key`` values with the grid's levels (red),
    thresholds (green, dashed), breakpoints (black, dotted) or range (shaded)."""
    plt = _pyplot()
    panels = [r for r in rows if r["_plot"][key] is not None]
    if not panels:
        return None
    cols = min(3, len(panels))
    lines = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 2.6 * lines), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, row in zip(axes.ravel(), panels):
        plot = row["_plot"]
        ax.hist(plot[key], bins=80, color="tab:blue", alpha=0.7)
        grid = plot[grid_key]
        _draw_marks(ax, grid_marks(grid) if grid is not None else None)
        note = plot["channel_note"] if key == "weights" else ""
        bits = row["weight_bits"] if key == "weights" else row["activation_bits"]
        ax.set_title(f"{row['layer'][:28]}{note}, {bits:g} b", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# --- TensorBoard -----------------------------------------------------------------------------------
def write_tensorboard(rows, totals, trajectories, images, log_dir):
    import tensorflow as tf
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for r in rows:
            for key in ("weight_bits", "activation_bits", "weight_memory_bits", "bitops", "weight_mse",
                        "activation_mse"):
                if r[key] is not None:
                    tf.summary.scalar(f"report/{r['layer']}/{key}", r[key], step=0)
            plot = r["_plot"]
            if plot.get("all_weights") is not None:
                tf.summary.histogram(f"report/{r['layer']}/weights", plot["all_weights"], step=0)
            if plot["activations"] is not None:
                tf.summary.histogram(f"report/{r['layer']}/input_activations", plot["activations"], step=0)
            for name in ("weight_grid", "activation_grid"):
                if plot[name] is not None:
                    levels = grid_marks(plot[name])
                    values = levels["levels"] or levels["thresholds"]
                    if values:
                        tf.summary.histogram(f"report/{r['layer']}/{name}_levels", np.asarray(values), step=0)
        for key, value in totals.items():
            if isinstance(value, (int, float)):
                tf.summary.scalar(f"report/total/{key}", value, step=0)
        for tag, (steps, values) in trajectories.items():
            for step, value in zip(steps, values):
                tf.summary.scalar(f"trajectory/{tag}", value, step=step)
        for name, path in images.items():
            png = tf.io.decode_png(tf.io.read_file(path), channels=4)
            tf.summary.image(f"report/{name}", png[None], step=0)
    writer.flush()
    writer.close()


# --- report ----------------------------------------------------------------------------------------
def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def format_table(rows):
    """Markdown table of the per-layer rows."""
    lines = ["| layer | type | W quantizer / A quantizer | W bits | A bits | weight grid | activation grid | "
             "weight memory (bytes) | BitOPs | weight MSE | activation MSE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['type']} | {r['weight_quantizer'] or 'float'} / {r['activation_quantizer'] or 'float'}"
            f" | {r['weight_bits']:g} | {r['activation_bits']:g} | {r['weight_grid_text']} | "
            f"{r['activation_grid_text']} | {r['weight_memory_bits'] / 8:.0f} | {r['bitops']:.4g} | "
            f"{'0 (kernel on its grid)' if r['kernel_on_grid'] else _fmt(r['weight_mse'], '.3g')} | "
            f"{_fmt(r['activation_mse'], '.3g')} |")
    return "\n".join(lines)


def _examples(dataset, examples):
    from tfq import data
    if not examples:
        return None, "activation histograms skipped (examples=0)"
    try:
        x, _ = data.load_numpy(dataset, "test", limit=examples)
    except (FileNotFoundError, OSError, ValueError) as err:
        return None, f"activation histograms skipped: {dataset} test data unavailable ({err})"
    return x, f"activations from the first {len(x)} {dataset} test examples"


def write_report(run_dir, examples=DEFAULT_EXAMPLES, out_dir=None, log=print):
    """Write the report of ``run_dir`` (see module docstring); returns the ``report.json`` dict."""
    from tfq import costs
    from tfq.export.runs import load_run_model
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run_dir {run_dir!r} is not a directory: pass the output of `tfq train` or "
                                "`tfq ptq`")
    if isinstance(examples, bool) or not isinstance(examples, (int, np.integer)) or examples < 0:
        raise ValueError(f"examples must be an integer >= 0, got {examples!r}")
    model = load_run_model(run_dir)
    from tfq.export.runs import run_metrics
    metrics = run_metrics(run_dir)
    out_dir = out_dir or os.path.join(run_dir, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    dataset = metrics.get("dataset", "fashion_mnist")
    x, data_note = _examples(dataset, examples)
    rows = layer_rows(model, x)
    totals = {"params": sum(r["params"] for r in rows), "macs": sum(r["macs"] for r in rows),
              "weight_memory_bits": float(costs.weight_memory(model)), "bitops": float(costs.bitops(model))}
    totals["bits_per_weight"] = totals["weight_memory_bits"] / max(totals["params"], 1)

    trajectories = {}
    log_dir = os.path.join(run_dir, "logs")
    if os.path.isdir(log_dir):
        trajectories = read_trajectories(log_dir)
    if trajectories:
        trajectory_note = f"bit-width trajectories: {', '.join(sorted(trajectories))} (from {log_dir})"
    else:
        trajectory_note = ("no bit-width trajectory: this run logged no bit-width scalars (fixed-precision "
                           "method, or trained without the AdaQAT / DDQGateSchedule callback and its log_dir)")

    images = {"bits": plot_bits(rows, os.path.join(out_dir, "bits.png"))}
    if trajectories:
        images["trajectories"] = plot_trajectories(trajectories, os.path.join(out_dir, "trajectories.png"))
    path = plot_levels(rows, "weights", "weight_grid", os.path.join(out_dir, "weight_levels.png"),
                       "weights and their quantization levels (red), breakpoints (black)")
    if path:
        images["weight_levels"] = path
    path = plot_levels(rows, "activations", "activation_grid", os.path.join(out_dir, "activation_levels.png"),
                       "input activations, levels (red) / range (shaded) / thresholds (green)")
    if path:
        images["activation_levels"] = path
    write_tensorboard(rows, totals, trajectories, images, os.path.join(out_dir, "tensorboard"))

    public_rows = [{k: v for k, v in r.items() if k != "_plot"} for r in rows]
    report = {"run_dir": run_dir, "method": metrics.get("method"), "dataset": dataset,
              "float_accuracy": metrics.get("float_accuracy"), "quantized_accuracy": metrics.get("quantized_accuracy"),
              "layers": public_rows, "totals": totals,
              "trajectories": {tag: {"steps": s, "values": v} for tag, (s, v) in trajectories.items()},
              "trajectory_note": trajectory_note, "data_note": data_note,
              "plots": {name: os.path.basename(p) for name, p in images.items()}}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(format_markdown(report))
    log(f"report of {run_dir}: {len(rows)} weighted layers, weight memory "
        f"{totals['weight_memory_bits'] / 8 / 1024:.1f} KiB ({totals['bits_per_weight']:.2f} bits/weight), "
        f"BitOPs {totals['bitops']:.4g}\n  {trajectory_note}\n  wrote {out_dir}/report.md, report.json, "
        f"{', '.join(os.path.basename(p) for p in images.values())}, tensorboard/")
    return report


def format_markdown(report):
    t = report["totals"]
    acc = ""
    if report.get("quantized_accuracy") is not None:
        acc = f"; test accuracy {report['quantized_accuracy']:.4f}"
        if report.get("float_accuracy") is not None:
            acc += f" (float {report['float_accuracy']:.4f})"
    lines = [f"# tfq report: {report['run_dir']}", "",
             f"method `{report['method']}` on {report['dataset']}{acc}.", "",
             f"Weight memory {t['weight_memory_bits'] / 8:.0f} bytes ({t['bits_per_weight']:.2f} bits per weight, "
             f"{t['params']} weights); BitOPs {t['bitops']:.4g} per example ({t['macs']} MACs). Weight memory = "
             "params x weight bits (`tfq.costs.weight_memory`), BitOPs = MACs x W bits x A bits (`tfq.costs.bitops`); "
             "32 bits = float. MSE: mean (x - Q(x))^2 through the quantizer's forward at training=False "
             f"({report['data_note']}).", "",
             format_table(report["layers"]), ""]
    if any(r["kernel_on_grid"] for r in report["layers"]):
        lines += ["Kernels marked \"on its grid\" already hold their quantized values (post-training "
                  "quantization stores the quantized kernel), so their weight MSE is 0; their quantization "
                  "error is measured against the float model (float.h5), e.g. by its test accuracy.", ""]
    lines += [f"{report['trajectory_note']}.", ""]
    for name, file in report["plots"].items():
        lines.append(f"![{name}]({file})")
    lines.append("")
    return "\n".join(lines)

