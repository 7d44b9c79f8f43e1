"""Latency harness (tfq.export.bench): host statistics, XNNPACK coverage, Android via a fake adb, emulation."""
import json
import os
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from tfq.export import bench

FIXTURES = Path(__file__).parent / "fixtures" / "android"
SERIAL = "28021FDH2000AB"


# ------------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """fp32 and full-int8 .tflite files of a small conv net (converted once per module)."""
    import tensorflow as tf
    import tf_keras as keras
    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((12, 12, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(4)])
    fp32 = folder / "tiny_fp32.tflite"
    fp32.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())

    def representative():
        rng = np.random.default_rng(0)
        for _ in range(4):
            yield [rng.random((1, 12, 12, 3), np.float32)]
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    int8 = folder / "tiny_int8.tflite"
    int8.write_bytes(converter.convert())
    converter.inference_input_type = converter.inference_output_type = tf.float32
    float_io = folder / "tiny_int8_float_io.tflite"
    float_io.write_bytes(converter.convert())
    return str(fp32), str(int8), str(float_io)


# --------------------------------------------------------------------------------------- statistics

def test_summarize_matches_hand_computed_values():
    stats = bench.summarize([4.0, 1.0, 10.0, 2.0, 3.0])
    # sorted 1 2 3 4 10: median 3, mean 4, p90 at rank 0.9*4 = 3.6 -> 4 + 0.6*(10-4) = 7.6
    assert stats["median_ms"] == 3.0 and stats["mean_ms"] == 4.0
    assert stats["p90_ms"] == pytest.approx(7.6)
    assert (stats["min_ms"], stats["max_ms"]) == (1.0, 10.0)
    assert stats["std_ms"] == pytest.approx(np.sqrt((9 + 4 + 1 + 0 + 36) / 5))
    with pytest.raises(ValueError, match="samples_ms"):
        bench.summarize([])


def test_run_interleaved_alternates_models():
    order = []

    class Fake:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def invoke_ms(self):
            order.append(self.name)
            return self.ms

    samples = bench.run_interleaved([Fake("A", 1.0), Fake("B", 2.0), Fake("C", 3.0)], runs=3)
    assert order == ["A", "B", "C"] * 3
    assert samples == [[1.0] * 3, [2.0] * 3, [3.0] * 3]


def _op(index, name, inputs, outputs):
    return {"index": index, "op_name": name, "inputs": np.array(inputs), "outputs": np.array(outputs)}


def test_xnnpack_coverage_finds_partitions_and_ops_left_out():
    # t0 -> CONV(0) -> t2 -> HARD_SWISH(1) -> t3 -> CONV(2) -> t5 -> MEAN(3) -> t6; t1, t4 constants.
    ops = [_op(0, "CONV_2D", [0, 1, -1], [2]), _op(1, "HARD_SWISH", [2], [3]), _op(2, "CONV_2D", [3, 4], [5]),
           _op(3, "MEAN", [5, 7], [6]),
           # two partitions: {CONV 0} and {CONV 2}; HARD_SWISH and MEAN stay outside
           _op(4, "DELEGATE", [0, 1], [2]), _op(5, "DELEGATE", [3, 4], [5])]
    coverage = bench.xnnpack_coverage(ops)
    assert coverage["ops"] == 4 and coverage["xnnpack_partitions"] == 2 and coverage["delegated_ops"] == 2
    assert [o["op"] for o in coverage["ops_outside_xnnpack"]] == ["HARD_SWISH", "MEAN"]
    assert coverage["op_counts"] == {"CONV_2D": 2, "HARD_SWISH": 1, "MEAN": 1}
    whole = bench.xnnpack_coverage(ops[:4] + [_op(4, "DELEGATE", [0, 1, 4, 7], [6])])
    assert whole["xnnpack_partitions"] == 1 and whole["ops_outside_xnnpack"] == []
    undelegated = bench.xnnpack_coverage(ops[:4])
    assert undelegated["xnnpack_partitions"] == 0 and len(undelegated["ops_outside_xnnpack"]) == 4


# ---------------------------------------------------------------------------------------------- host

def test_host_benchmark_reports_consistent_statistics(tiny_models):
    fp32 = tiny_models[0]
    result = bench.benchmark(fp32, target="host", threads=1, runs=12, warmup=2)
    assert len(result["timings_ms"]) == 12
    expected = bench.summarize(result["timings_ms"])
    for key in ("median_ms", "mean_ms", "p90_ms", "min_ms", "max_ms"):
        assert result[key] == expected[key]
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["p90_ms"] <= result["max_ms"]
    assert result["init_ms"] > 0 and result["first_ms"] > 0
    assert result["peak_memory_mb"] > 0 and "VmHWM" in result["memory_note"]
    assert result["file_bytes"] == os.path.getsize(fp32)
    assert result["device"]["cores"] == os.cpu_count() and "ai-edge-litert" in result["device"]["description"]
    # CONV_2D, MAX_POOL_2D, RESHAPE, FULLY_CONNECTED: all run by one XNNPACK partition
    assert result["graph"]["op_counts"] == {"CONV_2D": 1, "FULLY_CONNECTED": 1, "MAX_POOL_2D": 1, "RESHAPE": 1}
    assert result["graph"]["xnnpack_partitions"] == 1 and result["graph"]["ops_outside_xnnpack"] == []


def test_host_without_xnnpack_has_no_partition(tiny_models):
    _, int8, _ = tiny_models
    result = bench.benchmark(int8, runs=3, warmup=0, use_xnnpack=False, memory=False)
    assert result["graph"]["xnnpack_partitions"] == 0
    assert len(result["graph"]["ops_outside_xnnpack"]) == result["graph"]["ops"] == 4
    assert result["peak_memory_mb"] is None


def test_cli_table_puts_models_side_by_side(tiny_models, tmp_path):
    fp32, int8, _ = tiny_models
    json_path = tmp_path / "r.json"
    table = bench.run_cli([fp32, int8], target="host", runs=4, warmup=1, json_path=str(json_path))
    lines = table.splitlines()
    assert lines[0].startswith("host: ") and "threads=1 runs=4" in lines[0]
    assert lines[1].split()[:4] == ["model", "size", "KB", "x"]
    assert lines[3].split()[0] == "tiny_fp32.tflite" and lines[4].split()[0] == "tiny_int8.tflite"
    results = json.loads(json_path.read_text())
    size_ratio = os.path.getsize(fp32) / os.path.getsize(int8)
    assert f"{size_ratio:.2f}" in lines[4].split()
    assert lines[3].split()[10] == "1.00"   # speed-up of the baseline against itself
    assert lines[4].split()[10] == f"{results[0]['median_ms'] / results[1]['median_ms']:.2f}"


def test_graph_summary_counts_boundary_quantize_ops(tiny_models):
    _, int8, float_io = tiny_models
    inner = bench.graph_summary(int8)
    assert inner["io_types"] == {"inputs": ["int8"], "outputs": ["int8"]}
    assert (inner["quantize_ops"], inner["dequantize_ops"], inner["requantize_ops"]) == (0, 0, 0)
    boundary = bench.graph_summary(float_io)
    # float input -> QUANTIZE (not a requantisation), int8 logits -> DEQUANTIZE
    assert boundary["io_types"] == {"inputs": ["float32"], "outputs": ["float32"]}
    assert (boundary["quantize_ops"], boundary["dequantize_ops"], boundary["requantize_ops"]) == (1, 1, 0)
    assert boundary["ops"] == inner["ops"] + 2


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "gpu"}, "target must be one of"),
    ({"threads": 0}, "threads must be an integer >= 1"),
    ({"runs": 0}, "runs must be an integer >= 1"),
    ({"warmup": -1}, "warmup must be an integer >= 0"),
    ({"use_xnnpack": "yes"}, "use_xnnpack must be True or False"),
    ({"emulate": True}, "emulate=True is only for target='aarch64'"),
    ({"serial": "x"}, "target='android' only"),
    ({"cpu_mask": "f0"}, "target='android' only"),
])
def test_bad_arguments_name_the_argument(tiny_models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.benchmark(tiny_models[0], **kwargs)


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        bench.benchmark(tmp_path / "missing.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        bench.benchmark(junk)
    with pytest.raises(ValueError, match="cpu_mask must be a non-zero hexadecimal"):
        bench._check_cpu_mask("0xg1")


# ------------------------------------------------------------------------------------------- aarch64

def test_aarch64_without_emulation_or_sysroot_says_what_to_do(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.platform, "machine", lambda: "x86_64")
    with pytest.raises(bench.BenchmarkError, match="emulate=True"):
        bench.benchmark(tiny_models[1], target="aarch64")
    assert bench.main([tiny_models[1], "--target=aarch64"]) == 2   # the CLI prints the message, exits 2
    with pytest.raises(bench.BenchmarkError, match="prepare_aarch64_sysroot.sh") as error:
        bench.benchmark(tiny_models[1], target="aarch64", emulate=True, sysroot=tmp_path)
    assert "no arm64 Python" in str(error.value) and "no aarch64 LiteRT (ai_edge_litert" in str(error.value)


def test_compare_outputs_exact_close_and_different():
    ints = [[np.array([1, 2, 3], np.int8)]]
    assert bench.compare_outputs(ints, ints)["match"] == "identical"
    other = bench.compare_outputs(ints, [[np.array([1, 2, 4], np.int8)]])
    assert other["match"] == "different" and other["mismatched_values"] == 1 and other["max_abs_diff"] == 1
    floats = [[np.array([1.0, 2.0], np.float32)]]
    close = bench.compare_outputs(floats, [[np.array([1.0, 2.0 + 2e-7], np.float32)]])
    assert close["match"] == "close" and not close["outputs_identical"]


def _sysroot_ready():
    try:
        bench.find_emulator()
        return True
    except bench.BenchmarkError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _sysroot_ready(), reason="no qemu/arm64 sysroot (bash export/prepare_aarch64_sysroot.sh)")
def test_emulated_aarch64_int8_outputs_equal_host_reference_kernels(tiny_models):
    fp32, int8, _ = tiny_models
    results = bench.compare([int8, fp32], target="aarch64", emulate=True, samples=3)
    assert results[0]["match"] == "identical" and results[0]["compared_values"] == 3 * 4
    assert results[1]["match"] in ("identical", "close")
    assert all(r[k] is None for r in results for k in ("median_ms", "mean_ms", "p90_ms", "init_ms"))
    assert results[0]["device"]["runtime"] in results[0]["device"]["description"]
    assert results[0]["device"]["runtime"].startswith(("ai-edge-litert ", "tflite-runtime "))


# ------------------------------------------------------------------------------------ android (fake adb)

FAKE_ADB = r'''
import json, os, sys
config = json.load(open(os.environ["FAKE_ADB_CONFIG"]))
argv = sys.argv[1:]
with open(config["log"], "a") as log:
    log.write(json.dumps(argv) + "\n")
if argv == ["devices"]:
    sys.stdout.write(config["devices"])
    sys.exit(0)
if argv[0] != "-s":
    sys.exit("fake adb: expected -s SERIAL")
serial, command, rest = argv[1], argv[2], argv[3:]
ready = [l.split()[0] for l in config["devices"].splitlines()[1:] if l.strip().endswith("device")]
if serial not in ready:
    sys.stderr.write(f"adb: device '{serial}' not found\n")
    sys.exit(1)
if command == "push":
    if not os.path.isfile(rest[0]):
        sys.exit(f"adb: error: cannot stat '{rest[0]}'")
    print(f"{rest[0]}: 1 file pushed, 0 skipped. 12.3 MB/s ({os.path.getsize(rest[0])} bytes in 0.001s)")
elif command == "shell":
    line = " ".join(rest)
    if rest[0] == "getprop":
        print(config["getprop"][rest[1]])
    elif "--graph=" in line:
        graph = [w for w in line.split() if w.startswith("--graph=")][0].rsplit("/", 1)[1]
        key = "profile" if "--enable_op_profiling=true" in line else graph
        sys.stdout.write(open(config["outputs"][key]).read())
'''


def _elf(path, machine):
    # 64-bit little-endian ELF header up to e_machine (offset 18)
    Path(path).write_bytes(b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + struct.pack("<HH", 2, machine) + b"\x00" * 44)
    return str(path)


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    adb = bindir / "adb"
    adb.write_text(f"#!{sys.executable}\n{FAKE_ADB}")
    adb.chmod(adb.stat().st_mode | stat.S_IEXEC)
    models = []
    for name in ("a.tflite", "b.tflite"):
        models.append(tmp_path / name)
        models[-1].write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 32)
    config = {"log": str(tmp_path / "adb.log"), "devices": (FIXTURES / "devices.txt").read_text(),
              "getprop": json.loads((FIXTURES / "getprop.json").read_text()),
              "outputs": {"a.tflite": str(FIXTURES / "benchmark_model_xnnpack.txt"),
                          "b.tflite": str(FIXTURES / "benchmark_model_old.txt"),
                          "profile": str(FIXTURES / "benchmark_model_profile.txt")}}
    config_path = tmp_path / "adb.json"

    def write(**changes):
        config.update(changes)
        config_path.write_text(json.dumps(config))
    write()
    monkeypatch.setenv("FAKE_ADB_CONFIG", str(config_path))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(bench.BINARY_ENV, _elf(tmp_path / "benchmark_model", 183))
    sleeps = []
    monkeypatch.setattr(bench, "_cooldown", sleeps.append)

    def log():
        return [json.loads(line) for line in Path(config["log"]).read_text().splitlines()]
    return {"models": [str(m) for m in models], "log": log, "write": write, "sleeps": sleeps, "tmp": tmp_path}


def test_android_drives_adb_in_order_and_parses_timings(fake_adb):
    results = bench.compare(fake_adb["models"], target="android", threads=2, runs=20, warmup=3, serial=SERIAL,
                            cpu_mask=0xF0, repeats=2, cooldown_s=1.5)
    log = fake_adb["log"]()
    assert log[0] == ["devices"]
    assert all(entry[:2] == ["-s", SERIAL] for entry in log[1:])
    calls = [entry[2:] for entry in log[1:]]
    assert calls[:5] == [["shell", "getprop", key] for key in (
        "ro.product.manufacturer", "ro.product.model", "ro.product.cpu.abi", "ro.build.version.release",
        "ro.board.platform")]
    remote = "/data/local/tmp/tfq"
    assert calls[5:10] == [["shell", "mkdir", "-p", remote],
                           ["push", os.environ[bench.BINARY_ENV], f"{remote}/benchmark_model"],
                           ["shell", "chmod", "755", f"{remote}/benchmark_model"],
                           ["push", fake_adb["models"][0], f"{remote}/a.tflite"],
                           ["push", fake_adb["models"][1], f"{remote}/b.tflite"]]
    runs = [call[1] for call in calls[10:]]
    assert len(runs) == 4 and [r.split()[3] for r in runs] == [f"--graph={remote}/{m}.tflite" for m in "abab"]
    assert runs[0] == (f"taskset f0 {remote}/benchmark_model --graph={remote}/a.tflite --num_threads=2 "
                       "--num_runs=20 --warmup_runs=3 --min_secs=0 --warmup_min_secs=0 --use_xnnpack=true")
    assert fake_adb["sleeps"] == [1.5] * 4

    a, b = results
    assert a["device"]["description"] == f"Google Pixel 7 (arm64-v8a, Android 14, gs201), serial {SERIAL}"
    # benchmark_model_xnnpack.txt: count=20 min=10876 max=12410 avg=11203.5 median=11120 p95=11893 (us)
    assert a["median_ms"] == pytest.approx(11.120) and a["mean_ms"] == pytest.approx(11.2035)
    assert (a["min_ms"], a["max_ms"], a["p95_ms"]) == pytest.approx((10.876, 12.410, 11.893))
    assert a["p90_ms"] is None and "p90" in a["p90_note"]
    assert (a["init_ms"], a["first_ms"]) == pytest.approx((38.912, 15.873))
    assert a["peak_memory_mb"] == pytest.approx(21.4453) and "periodic monitoring" in a["memory_note"]
    assert a["delegation"] == {"delegated_nodes": 65, "total_nodes": 66, "delegate": "TfLiteXNNPackDelegate",
                               "partitions": 1}
    # benchmark_model_old.txt: no median -> median of the invocation averages (28156.4 us twice)
    assert b["median_ms"] == pytest.approx(28.1564) and "averages" in b["median_note"]
    assert (b["min_ms"], b["max_ms"]) == pytest.approx((27.508, 31.0))
    assert b["peak_memory_mb"] == pytest.approx(38.8086) and b["p95_ms"] is None
    assert b["delegation"] is None


def test_android_op_profile_flags_ops_outside_xnnpack(fake_adb):
    result = bench.compare(fake_adb["models"][:1], target="android", serial=SERIAL, repeats=2, cooldown_s=0,
                           op_profile=True)[0]
    runs = [entry[3] for entry in fake_adb["log"]() if len(entry) == 4 and "--graph=" in entry[3]]
    assert ["--enable_op_profiling=true" in r for r in runs] == [True, False]
    assert "taskset" not in runs[0]
    # the profiled invocation is left out of the timings: only the plain one (fixture a) remains
    assert result["invocation_means_ms"] == pytest.approx([11.2035])
    outside = result["graph"]["ops_outside_xnnpack"]
    assert [(o["op"], o["avg_ms"]) for o in outside] == [("CONV_2D", 3.871), ("CONV_2D", 11.987), ("MEAN", 0.216)]
    assert outside[1]["name"] == "[model/block_1_project/Conv2D]:5"
    assert len(result["op_profile"]) == 6


def test_android_device_selection_errors(fake_adb):
    models = fake_adb["models"][:1]
    with pytest.raises(bench.BenchmarkError, match=r"several devices connected .*serial="):
        bench.compare(models, target="android")
    with pytest.raises(bench.BenchmarkError, match="'0A1B2C3D' is 'unauthorized'"):
        bench.compare(models, target="android", serial="0A1B2C3D")
    with pytest.raises(bench.BenchmarkError, match=r"'nope' is not connected; adb devices lists \['0A1B2C3D'"):
        bench.compare(models, target="android", serial="nope")
    fake_adb["write"](devices="List of devices attached\n\n")
    with pytest.raises(bench.BenchmarkError, match="no Android device: connect a phone with USB debugging"):
        bench.compare(models, target="android")
    fake_adb["write"](devices=f"List of devices attached\n{SERIAL}\tdevice\n")
    assert bench.compare(models, target="android", repeats=1, cooldown_s=0)[0]["device"]["serial"] == SERIAL


def test_android_missing_tools_say_what_to_install(fake_adb, monkeypatch):
    models = fake_adb["models"][:1]
    monkeypatch.delenv(bench.BINARY_ENV)
    with pytest.raises(bench.BenchmarkError, match="TFQ_BENCHMARK_MODEL"):
        bench.compare(models, target="android", serial=SERIAL)
    with pytest.raises(bench.BenchmarkError, match="does not exist"):
        bench.compare(models, target="android", serial=SERIAL, benchmark_binary=str(fake_adb["tmp"] / "nope"))
    x86 = _elf(fake_adb["tmp"] / "bm_x86", 62)
    with pytest.raises(bench.BenchmarkError, match="built for x86-64, but the device's ABI is arm64-v8a"):
        bench.compare(models, target="android", serial=SERIAL, benchmark_binary=x86)
    monkeypatch.setenv("PATH", str(fake_adb["tmp"] / "empty"))
    with pytest.raises(bench.BenchmarkError, match="adb not found on PATH.*apt-get install adb"):
        bench.compare(models, target="android", serial=SERIAL, benchmark_binary=x86)


def test_parse_benchmark_output_rejects_a_failed_run():
    text = "STARTING!\nERROR: Didn't find op for builtin opcode 'CONV_2D' version '7'\nBenchmarking failed.\n"
    with pytest.raises(bench.BenchmarkError, match="(?s)no 'Inference timings in us'.*version '7'"):
        bench.parse_benchmark_output(text)
