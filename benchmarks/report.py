"""Turns benchmarks/results/*.json into the results tables of README and docs/*.md (between the
markers ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``), so they never hold a number that
no JSON backs.

    python -m benchmarks.report
"""
import fnmatch
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _variant_name(v):
    name = v["method"]
    if v.get("options") and "activation_config" in v["options"]:
        name += f" config {v['options']['activation_config']}"
    return name


def lsq_table(results):
    epochs = results["protocol"]["epochs"]
    epoch_col = "epoch s (median 2..E)" if epochs > 1 else "epoch s (1 epoch, incl. tracing)"
    rows = [f"| variant | W/A bits | Keras test acc. | Δ vs float (pt) | {epoch_col} | × float epoch |",
            "|---|---|---|---|---|---|"]
    float_acc = next((v.get("keras_accuracy") for v in results["variants"] if v["method"] == "float"), None)
    for v in results["variants"]:
        name = _variant_name(v)
        bits = "32/32" if v["method"] == "float" else f"{v['weight_bits']}/{v['activation_bits']}"
        if "error" in v:
            rows.append(f"| {name} | {bits} | cannot quantize this model: {v['error'][:120]} | | | |")
            continue
        acc = v.get("keras_accuracy")
        delta = None if acc is None or float_acc is None else 100 * (acc - float_acc)
        rows.append(f"| {name} | {bits} | {_fmt(acc, '.4f')} | {_fmt(delta, '+.2f')} | "
                    f"{_fmt(v.get('median_epoch_seconds'), '.1f')} | {_fmt(v.get('epoch_ratio_to_float'), '.2f')} |")
    annotated = next((v["tfmot_annotated_layers"] for v in results["variants"] if v.get("tfmot_annotated_layers")), None)
    m = results["machine"]
    rows.append("")
    if annotated:
        rows.append(f"tfmot rows: the layers tfmot's registries reject ({', '.join(annotated)}) were given tfmot's "
                    "own output quantizer at the row's bit-width (`benchmarks.common.tfmot_peer`).")
        rows.append("")
    rows.append(f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), TensorFlow {m['tensorflow']}, "
                f"tfmot {m['tfmot']}; command: `{results['command']}`; fine-tuning epochs: "
                f"{results['protocol']['epochs']}, float epochs: {results['protocol']['float_epochs']}, "
                f"fine-tuning examples: {results['protocol'].get('limit') or 'all 60000'}.")
    return "\n".join(rows)


def _machine_line(results):
    m = results["machine"]
    return (f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), TensorFlow {m['tensorflow']}, "
            f"LiteRT {m.get('litert', '?')}; command: `{results['command']}`.")


def export_table(results):
    rows = ["| model | W/A bits | Keras acc. before bias snap | Keras acc. | TFLite acc. | IntegerGraph acc. | "
            "TFLite within 1 step | IntegerGraph = reference kernels | fp32 KiB | int8 KiB | int4-w KiB | fp32/int8 | "
            "fp32/int8 ceiling | tfmot n-bit exports? |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        bits = f"{v['weight_bits']}/{v['activation_bits']}"
        if "error" in v:
            rows.append(f"| {v['model']} | {bits} | error: {v['error'][:100]} |" + " |" * 11)
            continue
        p = v["parity"]
        kib = lambda key: _fmt(v[key] / 1024 if key in v else None, ".1f")  # noqa: E731
        rows.append(
            f"| {v['model']} | {bits} | {_fmt(v.get('keras_accuracy_before_bias_snap'), '.4f')} | "
            f"{v['keras_accuracy']:.4f} | {v['tflite_accuracy']:.4f} | "
            f"{v['integer_graph_accuracy']:.4f} | {100 * p['xnnpack']['within_one_step']:.2f}% | "
            f"{p['integer_graph_vs_reference']['bit_exact']} | {kib('fp32_bytes')} | {kib('int8_bytes')} | "
            f"{kib('int4_weights_bytes')} | {v['fp32_bytes'] / v['int8_bytes']:.2f}x | {_ceiling(v)} | "
            f"{v['tfmot_nbit_exports'][:80]} |")
    protocol = results["protocol"]
    rows.append("")
    narrow = ", narrow-range (symmetric) weights" if protocol.get("narrow_range_weights") else ""
    rows.append(_machine_line(results) + f" LSQ+ config {protocol['config']}{narrow}, fine-tuning epochs "
                f"{protocol['epochs']} on {protocol.get('limit') or 'all 60000'} examples; accuracies on the full "
                "10,000-image test set; parity on the first 2,000 test images. Ceiling: the fp32/int8 ratio of a file "
                "holding only what this int8 file cannot drop (operators, tensors, shapes, constant data and one "
                "float32 scale per weight channel; no tensor names, no other quantization vectors); in brackets the "
                "data and weight scales alone, a bound for any per-channel int8 file of the network "
                "(`benchmarks.latency.size_ceiling`).")
    return "\n".join(rows)


def _ceiling(variant):
    ceiling = variant.get("size_ceiling")
    if not ceiling:
        return "-"
    return f"{ceiling['plus_graph']:.2f}x ({ceiling['data_and_weight_scales']:.2f}x)"


def latency_table(results):
    rows = ["| network | variant | size ratio to fp32 | speed-up 1 thread (median) | speed-up 2 threads (median) |",
            "|---|---|---|---|---|"]
    for net in results["networks"]:
        for name, v in net["variants"].items():
            if name == "fp32":
                continue
            rows.append(f"| {net['network']} | {name} | {_fmt(v.get('size_ratio_to_fp32'), '.2f')}x | "
                        f"{_fmt(v.get('speedup_1_threads'), '.2f')}x | {_fmt(v.get('speedup_2_threads'), '.2f')}x |")
        for name, err in net.get("export_errors", {}).items():
            rows.append(f"| {net['network']} | {name} | export failed: {str(err)[:100]} | | |")
    rows.append("")
    rows.append(_machine_line(results) + f" {results.get('note', '')}")
    return "\n".join(rows)


def large_models_table(results):
    rows = ["| model | method | layers | params (M) | quantize s | calibrate s | first train step s | second step s | "
            "export s | train-step peak MB (before) | export peak MB (before) | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in sorted(results["variants"], key=lambda v: (v["model"].split("_")[0], v.get("layers", 0), v["method"])):
        failed = next((f"{key}: {v[key]}" for key in ("error", "quantize_error", "calibrate_error", "train_step_error",
                                                         "export_error") if key in v), None)
        if failed and "layers" not in v:
            rows.append(f"| {v['model']} | {v['method']} | {failed[:140]} |" + " |" * 9)
            continue
        fix = re.search(r"before ([0-9a-f]{7})", v.get("run", ""))
        elsewhere = v.get("cpu") not in (None, results["machine"]["cpu"])
        note = "; ".join(([f"export before {fix.group(1)}"] if fix else []) + ([failed[:100]] if failed else [])
                         + ([f"on {v['cpu']}"] if elsewhere else []))
        peak = lambda step: (f"{v[step + '_peak_rss_mb']:.0f} ({v[step + '_rss_before_mb']:.0f})"  # noqa: E731
                             if step + "_peak_rss_mb" in v else "—")
        rows.append(f"| {v['model']} | {v['method']} | {v['layers']} | {v['params'] / 1e6:.2f} | "
                    f"{_fmt(v.get('quantize_seconds'), '.0f')} | {_fmt(v.get('calibrate_seconds'), '.0f')} | "
                    f"{_fmt(v.get('train_step_seconds'), '.0f')} | "
                    f"{_fmt(v.get('train_step2_seconds'), '.1f')} | {_fmt(v.get('export_seconds'), '.0f')} | "
                    f"{peak('train_step')} | {peak('export')} | {note} |")
    rows.append("")
    rows.append(_machine_line(results) + " Rows whose note names another CPU were measured there (the command "
                "lists every run). Seconds are wall time on a shared machine; peaks are each step's own "
                "(VmHWM reset before it) in a fresh process per row.")
    return "\n".join(rows)


_BUDGET_KEYS = ("model", "float_epochs", "epochs", "learning_rate", "limit", "scale_parameterization",
                "scale_lr_multiplier")


def _check_one_budget(files, keys, what):
    budgets = {tuple(r["protocol"].get(k) for k in keys) for r in files}
    if len(budgets) > 1:
        raise ValueError(f"{what} files with different budgets {sorted(budgets, key=str)} "
                         f"({', '.join(keys)}): one table cannot mix them")


def _seed_runs(files):
    """``({(bits, is_tfmot_8bit, name): {seed: {acc, delta, bn_delta}}}, {seed: float acc}, commands)``;
    each gap is to the float row of the row's own file."""
    by_variant, floats, commands = {}, {}, []
    for results in files:
        seed = results["protocol"].get("seed", 0)
        commands.append(results["command"])
        float_row = next((v for v in results["variants"] if v["method"] == "float" and "keras_accuracy" in v), None)
        if float_row is not None:
            floats.setdefault(seed, float_row["keras_accuracy"])
        float_bn = float_row.get("keras_accuracy_bn_reestimated") if float_row else None
        for v in results["variants"]:
            if v["method"] == "float" or "keras_accuracy" not in v:
                continue
            key = (v["weight_bits"], v["method"] == "tfmot-8bit", _variant_name(v))
            runs = by_variant.setdefault(key, {})
            bn = v.get("keras_accuracy_bn_reestimated")
            entry = {"acc": v["keras_accuracy"], "float": float_row["keras_accuracy"] if float_row else None,
                     "delta": 100 * (v["keras_accuracy"] - float_row["keras_accuracy"]) if float_row else None,
                     "bn_delta": 100 * (bn - float_bn) if bn is not None and float_bn is not None else None}
            if seed in runs:  # e.g. tfmot's 8-bit row, run with every bit-width: fine if it is the same number
                if runs[seed]["acc"] != v["keras_accuracy"]:
                    raise ValueError(f"{_variant_name(v)} W{v['weight_bits']} seed {seed} is in two result files "
                                     f"with different accuracies ({runs[seed]['acc']} and {v['keras_accuracy']})")
                if runs[seed]["bn_delta"] is None:
                    runs[seed]["bn_delta"] = entry["bn_delta"]
                continue
            runs[seed] = entry
    return by_variant, floats, commands


def _seed_cells(runs):
    """Cells: seeds, mean acc., min - max, mean gap, gap per seed, mean gap after BatchNorm re-estimation."""
    order = sorted(runs)
    accs = [runs[s]["acc"] for s in order]
    deltas = [runs[s]["delta"] for s in order if runs[s]["delta"] is not None]
    bn = [runs[s]["bn_delta"] for s in order if runs[s]["bn_delta"] is not None]
    per_seed = " / ".join(f"s{s}: {runs[s]['delta']:+.2f}" for s in order if runs[s]["delta"] is not None)
    return (f"{len(order)} | {statistics.mean(accs):.4f} | {min(accs):.4f} - {max(accs):.4f} | "
            f"{_fmt(statistics.mean(deltas) if deltas else None, '+.2f')} | {per_seed} | "
            f"{f'{statistics.mean(bn):+.2f} ({len(bn)})' if bn else '—'}")


def lsq_seeds_table(files):
    """Mean and range over seeds of the LSQ protocol runs (``lsq_protocol*.json``, one seed per file
    or several files per seed for different bit-widths), each row's gap to its own file's float row;
    a (seed, variant) measured twice with different accuracies is an error, not a silent choice."""
    _check_one_budget(files, _BUDGET_KEYS, "lsq_protocol*.json")
    by_variant, floats, commands = _seed_runs(files)
    rows = ["| variant | W/A bits | seeds | mean acc. | min - max | mean Δ vs float (pt) | Δ per seed (pt) | "
            "mean Δ after BatchNorm re-estimation (seeds) |",
            "|---|---|---|---|---|---|---|---|"]
    for (bits, _, name), runs in sorted(by_variant.items(), key=lambda kv: (kv[0][1], -kv[0][0])):
        rows.append(f"| {name} | {bits}/{bits} | {_seed_cells(runs)} |")
    rows.append("")
    rows.append(f"Seeds {', '.join(str(s) for s in sorted(floats))}; each gap is to the float row of the same run "
                "(same seed, same float checkpoint, same fine-tuning budget). Commands: "
                + "; ".join(f"`{c}`" for c in commands) + ".")
    return "\n".join(rows)


def _commands(files):
    """Each file's command, with its CPU when the files come from more than one machine."""
    cpus = [r.get("machine", {}).get("cpu") for r in files]
    several = len(set(cpus)) > 1
    return [f"`{r['command']}`" + (f" ({cpu})" if several and cpu else "") for r, cpu in zip(files, cpus)]


def _sweep_table(base_files, sweep_files, key, column, note):
    """The variants of ``sweep_files`` at every value of protocol setting ``key`` measured, the
    ``base_files`` included, over seeds; each gap is to the float row of its own file. Every other
    budget setting must agree."""
    files = list(base_files) + list(sweep_files)
    keys = tuple(k for k in _BUDGET_KEYS if k != key)
    _check_one_budget(files, keys, f"the {key} table's result")
    studied = {(v["weight_bits"], _variant_name(v)) for r in sweep_files for v in r["variants"]
               if v["method"] != "float"}
    by_value = {}
    for r in files:
        by_value.setdefault(r["protocol"][key], []).append(r)
    body = []
    for value in sorted(by_value):
        by_variant, _, _ = _seed_runs(by_value[value])
        for (bits, _, name), runs in by_variant.items():
            if (bits, name) in studied:
                own_floats = [run["float"] for run in runs.values() if run["float"] is not None]
                float_mean = f"{statistics.mean(own_floats):.4f}" if own_floats else "—"
                body.append(((-bits, name, value),
                             f"| {name} | {bits}/{bits} | {value:g} | {_seed_cells(runs)} | {float_mean} |"))
    rows = [f"| variant | W/A bits | {column} | seeds | mean acc. | min - max | mean Δ vs float (pt) | "
            "Δ per seed (pt) | mean Δ after BatchNorm re-estimation (seeds) | mean float acc. |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    rows += [line for _, line in sorted(body)]   # each variant's values side by side, higher bit-widths first
    rows.append("")
    rows.append(note + " Commands: " + "; ".join(_commands([r for v in sorted(by_value) for r in by_value[v]])) + ".")
    return "\n".join(rows)


def lsq_learning_rate_table(protocol_files, rate_files):
    """The variants of ``rate_files`` (``lsq_lr*.json``: runs at other fine-tuning learning rates) at
    every learning rate measured, the protocol runs (``protocol_files``) included."""
    return _sweep_table(protocol_files, rate_files, "learning_rate", "fine-tuning learning rate",
                        "Adam with cosine decay over the 3 fine-tuning epochs, the float row at the same rate in "
                        "each run.")


def lsq_budget_table(rate_files, epoch_files):
    """The variants of ``epoch_files`` (``lsq_e*.json``: longer fine-tuning at rate 1e-3) beside the
    3-epoch runs at that rate (``rate_files``, ``lsq_lr1e-3*.json``)."""
    return _sweep_table(rate_files, epoch_files, "epochs", "fine-tuning epochs",
                        "Adam(1e-3) with cosine decay over the fine-tuning epochs, the float row fine-tuned for "
                        "the same epochs in each run.")


#: tables built from several result files: name -> (file-name patterns, builder getting one list of
#: results per pattern)
MULTI_FILE_TABLES = {"lsq_seeds": (("lsq_protocol*.json",), lsq_seeds_table),
                     "lsq_learning_rate": (("lsq_protocol*.json", "lsq_lr*.json"), lsq_learning_rate_table),
                     "lsq_budget": (("lsq_lr1e-3*.json", "lsq_e*.json"), lsq_budget_table)}

TABLES = {"lsq": lsq_table, "lsq_protocol": lsq_table, "export": export_table, "latency": latency_table, "large_models": large_models_table}


def fill_markers(text, name, table):
    """``text`` with the lines between ``<!-- results:name -->`` and ``<!-- /results:name -->``
    (none, or an earlier table) replaced by ``table``."""
    pattern = re.compile(rf"(<!-- results:{name} -->)\n(?:.*?\n)?(<!-- /results:{name} -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + "\n" + table + "\n" + m.group(2), text)


def main():
    results, tables = {}, {}  # results: file name -> its contents, each file read once
    for path in sorted(glob.glob(os.path.join(HERE, "results", "*.json"))):
        with open(path) as f:
            results[os.path.basename(path)] = data = json.load(f)
        name = os.path.splitext(os.path.basename(path))[0]
        if name in TABLES:
            tables[name] = TABLES[name](data)
    for name, (patterns, build) in MULTI_FILE_TABLES.items():
        groups = [[data for file_name, data in results.items() if fnmatch.fnmatch(file_name, pattern)]
                  for pattern in patterns]
        if all(groups):
            tables[name] = build(*groups)
    docs = sorted(glob.glob(os.path.join(os.path.dirname(HERE), "docs", "*.md")))
    for page in [README] + docs:   # README and the docs pages hold the markers
        if not os.path.exists(page):
            continue
        with open(page) as f:
            text = f.read()
        for name, table in tables.items():
            text = fill_markers(text, name, table)
        with open(page, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
