"""Turns benchmarks/results/*.json into the README's results tables (between the markers
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``), so README never holds a number that
no JSON backs.

    python -m benchmarks.report
"""
import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def lsq_table(results):
    epochs = results["protocol"]["epochs"]
    epoch_col = "epoch s (median 2..E)" if epochs > 1 else "epoch s (1 epoch, incl. tracing)"
    rows = [f"| variant | W/A bits | Keras test acc. | Δ vs float (pt) | {epoch_col} | × float epoch |",
            "|---|---|---|---|---|---|"]
    float_acc = next((v.get("keras_accuracy") for v in results["variants"] if v["method"] == "float"), None)
    for v in results["variants"]:
        name = v["method"]
        if v.get("options", {}) and "activation_config" in v["options"]:
            name += f" config {v['options']['activation_config']}"
        bits = "32/32" if v["method"] == "float" else f"{v['weight_bits']}/{v['activation_bits']}"
        if "error" in v:
            rows.append(f"| {name} | {bits} | cannot quantize this model: {v['error'][:120]} | | | |")
            continue
        acc = v.get("keras_accuracy")
        delta = None if acc is None or float_acc is None else 100 * (acc - float_acc)
        rows.append(f"| {name} | {bits} | {_fmt(acc, '.4f')} | {_fmt(delta, '+.2f')} | "
                    f"{_fmt(v.get('median_epoch_seconds'), '.1f')} | {_fmt(v.get('epoch_ratio_to_float'), '.2f')} |")
    m = results["machine"]
    rows.append("")
    rows.append(f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), TensorFlow {m['tensorflow']}, "
                f"tfmot {m['tfmot']}; command: `{results['command']}`; fine-tuning epochs: "
                f"{results['protocol']['epochs']}, float epochs: {results['protocol']['float_epochs']}, "
                f"fine-tuning examples: {results['protocol'].get('limit') or 'all 60000'}.")
    return "\n".join(rows)


TABLES = {"lsq": lsq_table}


def main():
    if not os.path.exists(README):
        return
    with open(README) as f:
        text = f.read()
    for path in sorted(glob.glob(os.path.join(HERE, "results", "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name not in TABLES:
            continue
        with open(path) as f:
            table = TABLES[name](json.load(f))
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + table + m.group(2), text)
    with open(README, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
