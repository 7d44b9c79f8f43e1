"""``benchmarks.common.finished_rows``: what ``--resume`` keeps from an interrupted benchmark run."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import finished_rows  # noqa: E402

KEY = lambda row: (row["method"], row["bits"])  # noqa: E731


def _results(cpu="CPU A", fused_kernels=False, **protocol):
    return {"benchmark": "toy", "command": "python -m benchmarks.toy --resume",
            "protocol": {"epochs": 3, "out": "x.json", "resume": True, **protocol},
            "machine": {"cpu": cpu, "fused_kernels": fused_kernels, "date": "2026-12-07"}, "variants": []}


def _write_earlier(path, **protocol):
    earlier = _results(**protocol)
    del earlier["machine"]["fused_kernels"]  # files from before tfq.kernels: measured without them
    earlier["protocol"]["resume"] = False
    earlier["command"] = "python -m benchmarks.toy"
    earlier["variants"] = [{"method": "float", "bits": None, "acc": 0.9},
                           {"method": "lsq", "bits": 4, "acc": 0.88},
                           {"method": "lsq", "bits": 2, "error": "ValueError: boom"}]
    earlier["histograms"] = {"layer": [1, 2]}
    path.write_text(json.dumps(earlier))


def test_keeps_finished_rows_and_what_the_earlier_run_added(tmp_path):
    out = tmp_path / "toy.json"
    _write_earlier(out)
    results = _results()
    kept = finished_rows(results, str(out), KEY)
    assert set(kept) == {("float", None), ("lsq", 4)}, "a failed variant must run again"
    assert kept[("lsq", 4)]["acc"] == 0.88
    assert results["histograms"] == {"layer": [1, 2]}
    assert results["variants"] == [] and results["resumed_from"] == [
        {"date": "2026-12-07", "command": "python -m benchmarks.toy"}]


def test_nothing_to_resume_is_an_empty_start(tmp_path):
    assert finished_rows(_results(), str(tmp_path / "missing.json"), KEY) == {}


def test_other_arguments_or_another_cpu_refuse_to_resume(tmp_path):
    out = tmp_path / "toy.json"
    _write_earlier(out)
    with pytest.raises(SystemExit, match=r"other arguments \(epochs: \[3\], now \[1\]\)"):
        finished_rows(_results(epochs=1), str(out), KEY)
    with pytest.raises(SystemExit, match="measured on 'CPU A', this is 'CPU B'"):
        finished_rows(_results(cpu="CPU B"), str(out), KEY)
    with pytest.raises(SystemExit, match="measured without tfq's fused kernels, this run is with them"):
        finished_rows(_results(fused_kernels=True), str(out), KEY)


def test_an_argument_added_since_counts_as_equal_at_its_default(tmp_path):
    out = tmp_path / "toy.json"
    _write_earlier(out)
    assert set(finished_rows(_results(plot="p.png"), str(out), KEY, defaults={"plot": "p.png"})) == {
        ("float", None), ("lsq", 4)}
    with pytest.raises(SystemExit, match=r"plot: \[None\], now \['q.png'\]"):
        finished_rows(_results(plot="q.png"), str(out), KEY, defaults={"plot": "p.png"})
