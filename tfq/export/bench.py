"""Latency harness for exported .tflite files: host, aarch64 (native or emulated) and Android targets.

    stats = benchmark("model.tflite", target="host", threads=1, runs=50, warmup=5)
    rows = compare(["fp32.tflite", "int8.tflite"], target="host")   # interleaved A B A B ...
    print(run_cli(["fp32.tflite", "int8.tflite"], target="host"))

Targets
-------
* ``host``: the LiteRT interpreter in this process.  Each model is loaded (timed: ``init_ms``), run once
  (``first_ms``, where XNNPACK packs its weights) and warmed up; then the timed runs of all models are
  interleaved (A B A B ...) so that a load change on the machine hits every model alike.
* ``aarch64``: on an aarch64 machine the same code path as ``host``.  On another machine only
  ``emulate=True`` is possible: the model runs under Debian's qemu-user-static with an arm64 Python and
  LiteRT's aarch64 wheel (``ai-edge-litert`` 1.4.0; sysroot made by ``export/prepare_aarch64_sysroot.sh``)
  and its outputs are compared with the host's reference kernels.  Emulated timings are not latency: every
  timing key is ``None``.
* ``android``: drives ``adb`` and TFLite's ``benchmark_model`` binary (supplied by the user, flag or
  ``TFQ_BENCHMARK_MODEL``), parsing its ``Inference timings in us`` and memory lines.

Every result is a dict with ``median_ms mean_ms p90_ms min_ms max_ms std_ms init_ms first_ms
peak_memory_mb`` (``None`` where the target cannot measure it), ``memory_note`` (what the memory number
is), ``device`` (a description) and ``graph`` (op counts and the ops that run outside XNNPACK).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = ("host", "aarch64", "android")
BINARY_ENV = "TFQ_BENCHMARK_MODEL"
SYSROOT_ENV = "TFQ_AARCH64_SYSROOT"
EXPORT_DIR_ENV = "TFQ_EXPORT_DIR"
DEFAULT_SYSROOT = Path.home() / ".cache" / "tfq" / "aarch64-sysroot"
REMOTE_DIR = "/data/local/tmp/tfq"
GUEST_PYTHON = "usr/bin/python3.11"
GUEST_SITE = "opt/tfq-site"
GUEST_RUNTIMES = ("ai_edge_litert", "tflite_runtime")  # the guest interpreter packages run_tflite.py can use
_AARCH64 = ("aarch64", "arm64")
_TIMING_KEYS = ("median_ms", "mean_ms", "p90_ms", "min_ms", "max_ms", "std_ms")


class BenchmarkError(RuntimeError):
    """The machine lacks something the chosen target needs (tool, device, binary, sysroot)."""


# ----------------------------------------------------------------------------------------- arguments

def _check_positive_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_tflite_file(path, argument="tflite_path"):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{argument}: no such file {path!r}")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[4:8] != b"TFL3":
        raise ValueError(f"{argument}: {path!r} is not a TFLite flatbuffer (no 'TFL3' identifier)")
    return path


def _check_cpu_mask(cpu_mask):
    if cpu_mask is None:
        return None
    text = format(cpu_mask, "x") if isinstance(cpu_mask, int) and not isinstance(cpu_mask, bool) \
        else str(cpu_mask).lower().removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]+", text) or int(text, 16) == 0:
        raise ValueError(f"cpu_mask must be a non-zero hexadecimal CPU mask such as 'f0' or 0xf0 "
                         f"(taskset syntax), got {cpu_mask!r}")
    return text


# ---------------------------------------------------------------------------------------- statistics

def summarize(samples_ms):
    """median / mean / p90 (linear interpolation) / min / max / std (population) of timings in ms."""
    samples = np.asarray(samples_ms, np.float64)
    if samples.size == 0:
        raise ValueError("samples_ms is empty")
    return {"median_ms": float(np.median(samples)), "mean_ms": float(samples.mean()),
            "p90_ms": float(np.percentile(samples, 90)), "min_ms": float(samples.min()),
            "max_ms": float(samples.max()), "std_ms": float(samples.std())}


# ----------------------------------------------------------------------------- graph / XNNPACK coverage

def xnnpack_coverage(ops):
    """Which operators a delegate took, from the interpreter's node list after delegation.

    ``ops``: dicts with ``index``, ``op_name``, ``inputs``, ``outputs`` (``Interpreter._get_ops_details()``):
    the original nodes followed by one ``DELEGATE`` node per partition.  A partition is the set of
    original nodes reached walking backwards from the delegate node's outputs until its inputs.
    """
    originals = [op for op in ops if op["op_name"] != "DELEGATE"]
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    by_index = {op["index"]: op for op in originals}
    producer = {int(t): op["index"] for op in originals for t in op["outputs"]}
    covered = set()
    for delegate in delegates:
        boundary = {int(t) for t in delegate["inputs"]}
        pending = [int(t) for t in delegate["outputs"]]
        seen = set()
        while pending:
            tensor = pending.pop()
            if tensor < 0 or tensor in boundary or tensor in seen or tensor not in producer:
                continue
            seen.add(tensor)
            covered.add(producer[tensor])
            pending.extend(int(t) for t in by_index[producer[tensor]]["inputs"])
    counts = {}
    for op in originals:
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    outside = [{"op": op["op_name"], "index": op["index"]} for op in originals
               if op["index"] not in covered]
    return {"ops": len(originals), "op_counts": dict(sorted(counts.items())),
            "quantize_ops": counts.get("QUANTIZE", 0), "dequantize_ops": counts.get("DEQUANTIZE", 0),
            "xnnpack_partitions": len(delegates), "delegated_ops": len(covered),
            "ops_outside_xnnpack": outside if delegates else [{"op": o["op_name"], "index": o["index"]}
                                                               for o in originals]}


def graph_summary(tflite_path, use_xnnpack=True):
    """Op counts, QUANTIZE/DEQUANTIZE and requantising QUANTIZE counts, input/output types, XNNPACK
    partitions and the ops left outside them."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    path = _check_tflite_file(tflite_path)
    resolver = OpResolverType.BUILTIN if use_xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=path, num_threads=1, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()
    summary = xnnpack_coverage(ops)
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
    # QUANTIZE from an integer tensor = a requantisation (int8 -> int8 at another scale / zero point)
    summary["requantize_ops"] = sum(1 for op in ops if op["op_name"] == "QUANTIZE" and len(op["inputs"])
                                    and np.issubdtype(dtypes.get(int(op["inputs"][0]), np.float32), np.integer))
    summary["io_types"] = {"inputs": [np.dtype(d["dtype"]).name for d in interpreter.get_input_details()],
                           "outputs": [np.dtype(d["dtype"]).name for d in interpreter.get_output_details()]}
    return summary


# ---------------------------------------------------------------------------------------------- host

def _status_kb(key):
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss():
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def random_inputs(input_details, seed=0):
    """One deterministic array per model input: floats uniform in [0, 1), integers uniform over their
    range clipped to [-128, 255] (all int8 / uint8 codes)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for detail in input_details:
        dtype, shape = np.dtype(detail["dtype"]), tuple(int(d) for d in detail["shape"])
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.random(shape).astype(dtype))
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            low, high = max(info.min, -128), min(info.max, 255)
            arrays.append(rng.integers(low, high, shape, endpoint=True).astype(dtype))
        elif dtype == np.bool_:
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            raise ValueError(f"model input {detail['name']!r} has dtype {dtype}, which the harness "
                             "cannot fill with test data")
    return arrays


class HostModel:
    """One model in a LiteRT interpreter: timed load, first run, warm-up, then ``invoke_ms()``."""

    def __init__(self, path, threads=1, use_xnnpack=True, warmup=5, seed=0):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        self.path = _check_tflite_file(path)
        resolver = OpResolverType.BUILTIN if use_xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        start = time.perf_counter()
        self.interpreter = Interpreter(model_path=self.path, num_threads=threads,
                                       experimental_op_resolver_type=resolver)
        self.interpreter.allocate_tensors()
        self.init_ms = 1000 * (time.perf_counter() - start)
        for detail, array in zip(self.interpreter.get_input_details(),
                                 random_inputs(self.interpreter.get_input_details(), seed)):
            self.interpreter.set_tensor(detail["index"], array)
        self.first_ms = self.invoke_ms()
        for _ in range(warmup):
            self.invoke_ms()
        self.graph = xnnpack_coverage(self.interpreter._get_ops_details())

    def invoke_ms(self):
        """Wall time of one ``invoke()`` in ms (inputs are set once, outputs not read)."""
        start = time.perf_counter_ns()
        self.interpreter.invoke()
        return (time.perf_counter_ns() - start) / 1e6


MEMORY_NOTE = ("peak RSS growth (VmHWM reset, minus RSS before loading) of a fresh Python process that "
               "imports LiteRT, then loads, runs once and warms up this model alone: model file pages, tensor "
               "arena, delegate-packed weights and the runtime's one-time set-up")


def measure_memory_mb(path, threads=1, use_xnnpack=True, warmup=5):
    """Host peak memory of one model, measured in a child process (see MEMORY_NOTE); None off Linux."""
    import json
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-probe", os.fspath(path),
                           str(threads), "1" if use_xnnpack else "0", str(warmup)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise BenchmarkError(f"memory probe of {path} failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_memory_mb"]


def _memory_probe(path, threads, use_xnnpack, warmup):
    import json
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]   # no sibling-module shadowing
    import ai_edge_litert.interpreter  # noqa: F401  (the import's memory is the baseline, not the model's)
    if not reset_peak_rss():
        print(json.dumps({"peak_memory_mb": None}))
        return
    before = _status_kb("VmRSS")
    model = HostModel(path, threads, use_xnnpack, warmup)
    peak = _status_kb("VmHWM")
    del model
    print(json.dumps({"peak_memory_mb": (peak - before) / 1024}))


def run_interleaved(models, runs):
    """``runs`` rounds; each round times one invocation of every model in order (A B A B ...)."""
    samples = [[] for _ in models]
    for _ in range(runs):
        for index, model in enumerate(models):
            samples[index].append(model.invoke_ms())
    return samples


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _package_version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def host_device():
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    description = (f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores, "
                   f"ai-edge-litert {_package_version('ai-edge-litert')}")
    return {"description": description, "machine": platform.machine(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "runtime": f"ai-edge-litert {_package_version('ai-edge-litert')}",
            "load_average_1min": load}


def _host_compare(paths, threads, runs, warmup, use_xnnpack, seed, memory=True):
    device = host_device()
    memories = [measure_memory_mb(path, threads, use_xnnpack, warmup) if memory else None for path in paths]
    models = [HostModel(path, threads, use_xnnpack, warmup, seed) for path in paths]
    samples = run_interleaved(models, runs)
    results = []
    for model, timings, memory_mb in zip(models, samples, memories):
        result = _base_result(model.path, "host", threads, runs, warmup, use_xnnpack, device)
        result.update(summarize(timings))
        result.update(init_ms=model.init_ms, first_ms=model.first_ms, peak_memory_mb=memory_mb,
                      memory_note=MEMORY_NOTE if memory else "not measured (memory=False)",
                      graph=model.graph, timings_ms=timings)
        results.append(result)
    return results


def _base_result(path, target, threads, runs, warmup, use_xnnpack, device):
    result = {"model": os.fspath(path), "file_bytes": os.path.getsize(path), "target": target,
              "threads": threads, "runs": runs, "warmup": warmup, "use_xnnpack": use_xnnpack,
              "device": device}
    result.update({key: None for key in _TIMING_KEYS})
    result.update(init_ms=None, first_ms=None, peak_memory_mb=None, memory_note=None)
    return result


# -------------------------------------------------------------------------- aarch64 under emulation

def export_dir():
    """The repository's ``export/`` folder (device-side scripts); ``TFQ_EXPORT_DIR`` overrides."""
    folder = Path(os.environ.get(EXPORT_DIR_ENV) or Path(__file__).resolve().parents[2] / "export")
    if not (folder / "run_tflite.py").is_file():
        raise BenchmarkError(f"device-side scripts not found in {folder}: run from a tfq checkout or set "
                             f"{EXPORT_DIR_ENV} to its export/ folder")
    return folder


def find_emulator(sysroot=None):
    """(qemu binary, sysroot) for arm64 emulation, or a BenchmarkError naming what is missing."""
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    root = Path(sysroot or os.environ.get(SYSROOT_ENV) or DEFAULT_SYSROOT)
    missing = []
    if qemu is None:
        missing.append("qemu-aarch64-static is not on PATH (Debian: apt-get install qemu-user-static)")
    if not (root / GUEST_PYTHON).is_file():
        missing.append(f"no arm64 Python at {root / GUEST_PYTHON}")
    if not any((root / GUEST_SITE / package).is_dir() for package in GUEST_RUNTIMES):
        missing.append(f"no aarch64 LiteRT (ai_edge_litert, or the older tflite_runtime) under {root / GUEST_SITE}")
    if missing:
        raise BenchmarkError("emulated aarch64 run impossible: " + "; ".join(missing) +
                             f". Prepare the sysroot with: bash export/prepare_aarch64_sysroot.sh {root} "
                             f"(needs debootstrap, qemu-user-static and pip), or pass sysroot=/ "
                             f"{SYSROOT_ENV} pointing at one")
    return qemu, root


def reference_outputs(path, inputs):
    """Outputs of the host's LiteRT reference kernels (BUILTIN_REF) for each input set."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    interpreter = Interpreter(model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    outputs = []
    for sample in inputs:
        for detail, array in zip(interpreter.get_input_details(), sample):
            interpreter.set_tensor(detail["index"], array)
        interpreter.invoke()
        outputs.append([interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()])
    return outputs


def run_emulated(path, inputs, kernels="reference", sysroot=None, timeout=3600):
    """Run ``export/run_tflite.py`` under qemu with the arm64 Python; returns (outputs, runtime info)."""
    import json
    qemu, root = find_emulator(sysroot)
    script = export_dir() / "run_tflite.py"
    with tempfile.TemporaryDirectory(prefix="tfq-emulate-") as folder:
        in_path, out_path = os.path.join(folder, "inputs.npz"), os.path.join(folder, "outputs.npz")
        np.savez(in_path, **{f"s{s}_in{i}": a for s, sample in enumerate(inputs) for i, a in enumerate(sample)})
        command = [qemu, "-L", str(root), str(root / GUEST_PYTHON), str(script), "--model", os.path.abspath(path),
                   "--inputs", in_path, "--outputs", out_path, "--kernels", kernels]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root / GUEST_SITE), "PYTHONNOUSERSITE": "1",
               "HOME": folder, "LC_ALL": "C.UTF-8"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise BenchmarkError(f"emulated run of {path} failed (exit {done.returncode}): "
                                 f"{done.stderr.strip()[-2000:]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        with np.load(out_path) as archive:
            outputs = [[archive[f"s{s}_out{j}"] for j in range(info["num_outputs"])] for s in range(len(inputs))]
    return outputs, info


def compare_outputs(expected, actual, rtol=1e-5, atol=1e-6):
    """Exact comparison of two lists (per input set) of output arrays; float outputs that differ only by
    rounding (``np.allclose(rtol, atol)``: another summation order / FMA) count as ``close``."""
    mismatched, total, max_diff, close = 0, 0, 0.0, True
    for want_sample, got_sample in zip(expected, actual, strict=True):
        for want, got in zip(want_sample, got_sample, strict=True):
            if want.shape != got.shape or want.dtype != got.dtype:
                raise BenchmarkError(f"output shape/dtype differs: host {want.shape} {want.dtype}, "
                                     f"emulated {got.shape} {got.dtype}")
            diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
            mismatched += int(np.count_nonzero(want != got))
            close = close and bool(np.allclose(got, want, rtol=rtol, atol=atol)) \
                and np.issubdtype(want.dtype, np.floating)
            total += want.size
            max_diff = max(max_diff, float(diff.max()) if diff.size else 0.0)
    match = "identical" if mismatched == 0 else "close" if close else "different"
    return {"outputs_identical": mismatched == 0, "match": match, "mismatched_values": mismatched,
            "compared_values": total, "max_abs_diff": max_diff}


def _emulated_compare(paths, threads, runs, warmup, use_xnnpack, seed, samples, sysroot, kernels):
    from ai_edge_litert.interpreter import Interpreter
    find_emulator(sysroot)
    results = []
    for path in paths:
        details = Interpreter(model_path=path).get_input_details()
        inputs = [random_inputs(details, seed + k) for k in range(samples)]
        expected = reference_outputs(path, inputs)
        start = time.perf_counter()
        actual, info = run_emulated(path, inputs, kernels=kernels, sysroot=sysroot)
        seconds = time.perf_counter() - start
        device = {"description": f"aarch64 emulated by qemu-user-static, {info['runtime']} "
                                 f"({kernels} kernels); timings not reported",
                  "machine": "aarch64 (emulated)", "runtime": info["runtime"], "emulated": True}
        result = _base_result(path, "aarch64", threads, runs, warmup, use_xnnpack, device)
        result.update(compare_outputs(expected, actual))
        result.update(emulated=True, kernels=kernels, samples=samples, emulation_seconds=seconds,
                      memory_note="not measured under emulation",
                      reference="host ai-edge-litert BUILTIN_REF (reference kernels)")
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------- android

_PREFIX = re.compile(r"^(?:INFO: |I tflite\s*: |\w+/tflite\s*\(\s*\d+\): )")
_STAT = re.compile(r"count=(\d+) first=([\d.e+-]+) curr=([\d.e+-]+) min=([\d.e+-]+) max=([\d.e+-]+) "
                   r"avg=([\d.e+-]+) std=([\d.e+-]+)(?: p5=([\d.e+-]+) median=([\d.e+-]+) p95=([\d.e+-]+))?")
_SUMMARY = re.compile(r"Inference timings in us: Init: ([\d.e+-]+), First inference: ([\d.e+-]+), "
                      r"Warmup \(avg\): ([\d.e+-]+), Inference \(avg\): ([\d.e+-]+)")
_MEMORY = {
    "periodic": re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: ([\d.e+-]+)"),
    "peak": re.compile(r"Peak memory footprint \(MB\): init=([\d.e+-]+) overall=([\d.e+-]+)"),
    "delta": re.compile(r"Memory footprint delta from the start of the tool \(MB\): "
                        r"init=([\d.e+-]+) overall=([\d.e+-]+)"),
}
_REPLACING = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((\w+)\) node, "
                        r"yielding (\d+) partitions")
_PROFILE_ROW = re.compile(r"^\s*(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)"
                          r"\s+(\d+)\s+(.*?)\s*$")


def parse_op_profile(text):
    """Rows of the 'Run Order' table of the regular runs' operator-wise profile (enable_op_profiling)."""
    lines = [_PREFIX.sub("", line) for line in text.splitlines()]
    try:
        start = next(i for i, line in enumerate(lines)
                     if "Operator-wise Profiling Info for Regular Benchmark Runs" in line)
        start = next(i for i in range(start, len(lines)) if "Run Order" in lines[i]) + 2
    except StopIteration:
        return []
    rows = []
    for line in lines[start:]:
        match = _PROFILE_ROW.match(line)
        if not match:
            break
        rows.append({"node_type": match.group(1), "avg_ms": float(match.group(4)),
                     "percent": float(match.group(5)), "name": match.group(9)})
    return rows


def parse_benchmark_output(text):
    """Numbers from one ``benchmark_model`` run (times in ms, memory in MB); raises if it did not run."""
    lines = [_PREFIX.sub("", line.rstrip("\r")) for line in text.splitlines()]
    summary_at = next((i for i, line in enumerate(lines) if _SUMMARY.search(line)), None)
    if summary_at is None:
        tail = "\n".join(line for line in lines if line.strip())[-1500:]
        raise BenchmarkError(f"benchmark_model printed no 'Inference timings in us' line; its output ends:\n{tail}")
    init_us, first_us, warmup_us, avg_us = (float(v) for v in _SUMMARY.search(lines[summary_at]).groups())
    stats = [m for m in (_STAT.search(line) for line in lines[:summary_at]) if m]
    result = {"init_ms": init_us / 1000, "first_ms": first_us / 1000, "warmup_avg_ms": warmup_us / 1000,
              "mean_ms": avg_us / 1000, "count": None, "min_ms": None, "max_ms": None, "std_ms": None,
              "p5_ms": None, "median_ms": None, "p95_ms": None}
    if stats:
        values = stats[-1].groups()
        result.update(count=int(values[0]), min_ms=float(values[3]) / 1000, max_ms=float(values[4]) / 1000,
                      std_ms=float(values[6]) / 1000)
        if values[7] is not None:
            result.update(p5_ms=float(values[7]) / 1000, median_ms=float(values[8]) / 1000,
                          p95_ms=float(values[9]) / 1000)
    joined = "\n".join(lines)
    result["peak_memory_mb"], result["memory_init_mb"], result["memory_source"] = None, None, None
    for source, pattern in _MEMORY.items():
        match = pattern.search(joined)
        if match:
            numbers = [float(v) for v in match.groups()]
            result["peak_memory_mb"] = numbers[-1]
            result["memory_init_mb"] = numbers[0] if len(numbers) == 2 else None
            result["memory_source"] = source
            break
    replacing = _REPLACING.search(joined)
    result["delegation"] = None if replacing is None else {
        "delegated_nodes": int(replacing.group(1)), "total_nodes": int(replacing.group(2)),
        "delegate": replacing.group(3), "partitions": int(replacing.group(4))}
    result["op_profile"] = parse_op_profile(text)
    return result


def _run(command, what, timeout=600):
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as error:
        raise BenchmarkError(f"{what}: cannot execute {command[0]!r} ({error})") from error
    if done.returncode != 0:
        raise BenchmarkError(f"{what} failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-1500:]}")
    return done.stdout


def find_adb(adb=None):
    found = adb if adb and os.path.isfile(adb) else shutil.which(adb or "adb")
    if not found:
        raise BenchmarkError("adb not found on PATH: install Android platform-tools (Debian/Ubuntu: "
                             "apt-get install adb) or pass adb=/path/to/adb")
    return found


def find_benchmark_binary(benchmark_binary=None):
    binary = benchmark_binary or os.environ.get(BINARY_ENV)
    if not binary:
        raise BenchmarkError(f"no benchmark_model binary: pass benchmark_binary=PATH (CLI --benchmark_binary) or "
                             f"set {BINARY_ENV}; it is TFLite's tools/benchmark:benchmark_model built for the "
                             "phone's ABI (e.g. bazel build -c opt --config=android_arm64 "
                             "//tensorflow/lite/tools/benchmark:benchmark_model, or TensorFlow's prebuilt "
                             "android_aarch64_benchmark_model); see export/README.md")
    if not os.path.isfile(binary):
        raise BenchmarkError(f"benchmark_model binary {binary!r} does not exist "
                             f"(from {'benchmark_binary' if benchmark_binary else BINARY_ENV})")
    return binary


_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86-64", 183: "aarch64"}
_ABI_MACHINES = {"arm64-v8a": {"aarch64", "arm"}, "armeabi-v7a": {"arm"}, "armeabi": {"arm"},
                 "x86_64": {"x86-64", "x86"}, "x86": {"x86"}}


def elf_machine(path):
    """'aarch64', 'arm', 'x86-64', 'x86' (from the ELF header), or None for a non-ELF file."""
    with open(path, "rb") as handle:
        header = handle.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    order = "little" if header[5] == 1 else "big"
    code = int.from_bytes(header[18:20], order)
    return _ELF_MACHINES.get(code, f"machine {code}")


def select_device(adb, serial=None):
    lines = _run([adb, "devices"], "adb devices").splitlines()
    states = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and not line.startswith(("List of devices", "*")):
            states[parts[0]] = parts[1]
    ready = [s for s, state in states.items() if state == "device"]
    if serial is not None:
        if serial not in states:
            raise BenchmarkError(f"serial {serial!r} is not connected; adb devices lists "
                                 f"{sorted(states) or 'nothing'}")
        if states[serial] != "device":
            raise BenchmarkError(f"device {serial!r} is {states[serial]!r}: unlock it and accept the USB "
                                 "debugging prompt")
        return serial
    if not ready:
        raise BenchmarkError("no Android device: connect a phone with USB debugging enabled (Settings > "
                             "Developer options) and check that `adb devices` lists it"
                             + (f"; listed but not ready: {states}" if states else ""))
    if len(ready) > 1:
        raise BenchmarkError(f"several devices connected {ready}: pass serial= (CLI --serial) to choose one")
    return ready[0]


def _adb(adb, serial, *args, what=None):
    return _run([adb, "-s", serial, *args], what or f"adb {' '.join(args[:2])}")


def android_device(adb, serial):
    props = {key: _adb(adb, serial, "shell", "getprop", f"ro.{key}").strip()
             for key in ("product.manufacturer", "product.model", "product.cpu.abi", "build.version.release",
                         "board.platform")}
    description = (f"{props['product.manufacturer']} {props['product.model']} ({props['product.cpu.abi']}, "
                   f"Android {props['build.version.release']}, {props['board.platform']}), serial {serial}")
    return {"description": description, "serial": serial, "manufacturer": props["product.manufacturer"],
            "model": props["product.model"], "abi": props["product.cpu.abi"],
            "android": props["build.version.release"], "platform": props["board.platform"]}


def _remote_names(paths):
    names, used = [], set()
    for index, path in enumerate(paths):
        name = os.path.basename(path)
        if name in used:
            name = f"{index}_{name}"
        used.add(name)
        names.append(name)
    return names


def _cooldown(seconds):
    """Rest between benchmark_model invocations so the phone's cores cool down (tests replace this)."""
    time.sleep(seconds)


def _combine_android(runs_parsed):
    """One result from the repeated benchmark_model invocations of one model."""
    means = [r["mean_ms"] for r in runs_parsed]
    counts = [r["count"] or 1 for r in runs_parsed]
    medians = [r["median_ms"] for r in runs_parsed]
    have_median = all(m is not None for m in medians)
    combined = {
        "mean_ms": float(np.average(means, weights=counts)),
        "median_ms": float(np.median(medians if have_median else means)),
        "median_note": ("median of benchmark_model's per-invocation medians" if have_median else
                        "median of per-invocation averages (this benchmark_model prints no median)"),
        "p90_ms": None,
        "p90_note": "benchmark_model reports no per-run times, so no p90; see p95_ms where it prints one",
        "p95_ms": max(r["p95_ms"] for r in runs_parsed) if all(r["p95_ms"] is not None for r in runs_parsed)
        else None,
        "min_ms": min(r["min_ms"] for r in runs_parsed) if all(r["min_ms"] is not None for r in runs_parsed)
        else None,
        "max_ms": max(r["max_ms"] for r in runs_parsed) if all(r["max_ms"] is not None for r in runs_parsed)
        else None,
        "std_ms": float(np.std(means)) if len(means) > 1 else runs_parsed[0]["std_ms"],
        "init_ms": float(np.median([r["init_ms"] for r in runs_parsed])),
        "first_ms": float(np.median([r["first_ms"] for r in runs_parsed])),
        "invocation_means_ms": means,
    }
    memories = [r["peak_memory_mb"] for r in runs_parsed if r["peak_memory_mb"] is not None]
    combined["peak_memory_mb"] = max(memories) if memories else None
    source = runs_parsed[0]["memory_source"]
    combined["memory_note"] = {
        "periodic": "benchmark_model's overall peak memory footprint via periodic monitoring (MB)",
        "peak": "benchmark_model's 'Peak memory footprint (MB)' overall value (approximate, per the tool)",
        "delta": "benchmark_model's 'Memory footprint delta from the start of the tool' overall value (MB)",
        None: "benchmark_model printed no memory line"}[source]
    return combined


def _android_compare(paths, threads, runs, warmup, use_xnnpack, serial, benchmark_binary, cpu_mask,
                     repeats, cooldown_s, op_profile, adb, extra_args):
    adb = find_adb(adb)
    binary = find_benchmark_binary(benchmark_binary)
    serial = select_device(adb, serial)
    device = android_device(adb, serial)
    machine = elf_machine(binary)
    allowed = _ABI_MACHINES.get(device["abi"])
    if machine is None:
        raise BenchmarkError(f"benchmark_model binary {binary!r} is not an ELF executable")
    if allowed is not None and machine not in allowed:
        raise BenchmarkError(f"benchmark_model binary {binary!r} is built for {machine}, but the device's ABI is "
                             f"{device['abi']}: use a build for {device['abi']} (e.g. --config=android_arm64)")
    remote_binary = f"{REMOTE_DIR}/benchmark_model"
    _adb(adb, serial, "shell", "mkdir", "-p", REMOTE_DIR)
    _adb(adb, serial, "push", binary, remote_binary, what="adb push benchmark_model")
    _adb(adb, serial, "shell", "chmod", "755", remote_binary)
    remote_models = []
    for path, name in zip(paths, _remote_names(paths)):
        remote_models.append(f"{REMOTE_DIR}/{name}")
        _adb(adb, serial, "push", path, remote_models[-1], what=f"adb push {path}")
    parsed = [[] for _ in paths]
    profiles = [[] for _ in paths]
    for repeat in range(repeats):
        for index, remote in enumerate(remote_models):
            command = ([] if cpu_mask is None else ["taskset", cpu_mask]) + [
                remote_binary, f"--graph={remote}", f"--num_threads={threads}", f"--num_runs={runs}",
                f"--warmup_runs={warmup}", "--min_secs=0", "--warmup_min_secs=0",
                f"--use_xnnpack={'true' if use_xnnpack else 'false'}"]
            profile_now = op_profile and repeat == 0
            if profile_now:
                command.append("--enable_op_profiling=true")
            command.extend(extra_args)
            output = _adb(adb, serial, "shell", shlex.join(command), what=f"benchmark_model on {paths[index]}")
            result = parse_benchmark_output(output)
            # The profiler's own overhead inflates timings: profiled invocations only give the op table.
            if profile_now:
                profiles[index] = result["op_profile"]
                if repeats > 1:
                    parsed[index].append(None)
                    _cooldown(cooldown_s)
                    continue
            parsed[index].append(result)
            _cooldown(cooldown_s)
    results = []
    for index, path in enumerate(paths):
        timed = [r for r in parsed[index] if r is not None]
        result = _base_result(path, "android", threads, runs, warmup, use_xnnpack, device)
        result.update(_combine_android(timed))
        delegation = timed[0]["delegation"]
        outside = [{"op": row["node_type"], "name": row["name"], "avg_ms": row["avg_ms"],
                    "percent": row["percent"]}
                   for row in profiles[index] if "delegate" not in row["node_type"].lower()]
        result.update(repeats=repeats, cpu_mask=cpu_mask, cooldown_s=cooldown_s, delegation=delegation,
                      op_profile=profiles[index] or None,
                      graph={"ops_outside_xnnpack": outside if op_profile else None,
                             "xnnpack_partitions": None if delegation is None else delegation["partitions"]})
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------- public API

def compare(tflite_paths, target="host", threads=1, runs=50, warmup=5, use_xnnpack=True, *, seed=0,
            serial=None, benchmark_binary=None, cpu_mask=None, repeats=3, cooldown_s=2.0, op_profile=False,
            adb=None, extra_args=(), emulate=False, sysroot=None, samples=4, kernels="reference", memory=True):
    """Benchmark several models side by side (interleaved); one result dict per model, in order.

    host / native aarch64: ``runs`` interleaved rounds after per-model load + first run + ``warmup`` runs;
    ``memory`` measures each model's peak memory in a child process (``MEMORY_NOTE``).
    android: ``repeats`` rounds of one ``benchmark_model`` invocation per model (A B A B ...), each
    ``runs`` timed runs after ``warmup``, ``cooldown_s`` seconds of rest after each; optional ``taskset``
    ``cpu_mask``; ``op_profile`` adds one profiled invocation per model (excluded from the timings) and
    lists ops falling out of XNNPACK.  aarch64 on another machine: only ``emulate=True`` (outputs of
    ``samples`` random inputs compared with the host's reference kernels; no timings).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if isinstance(tflite_paths, (str, os.PathLike)):
        tflite_paths = [tflite_paths]
    paths = [_check_tflite_file(p, "tflite_paths") for p in tflite_paths]
    if not paths:
        raise ValueError("tflite_paths is empty: give at least one .tflite file")
    threads = _check_positive_int("threads", threads, 1)
    runs = _check_positive_int("runs", runs, 1)
    warmup = _check_positive_int("warmup", warmup, 0)
    if not isinstance(use_xnnpack, bool):
        raise ValueError(f"use_xnnpack must be True or False, got {use_xnnpack!r}")
    if emulate and target != "aarch64":
        raise ValueError(f"emulate=True is only for target='aarch64', got target={target!r}")
    if target != "android" and (serial is not None or benchmark_binary is not None or cpu_mask is not None
                                or op_profile or extra_args):
        raise ValueError("serial, benchmark_binary, cpu_mask, op_profile and extra_args apply to "
                         f"target='android' only, got target={target!r}")
    if target == "android":
        return _android_compare(paths, threads, runs, warmup, use_xnnpack, serial, benchmark_binary,
                                _check_cpu_mask(cpu_mask), _check_positive_int("repeats", repeats, 1),
                                float(cooldown_s), bool(op_profile), adb, list(extra_args))
    if target == "aarch64":
        if emulate:
            if kernels not in ("reference", "default"):
                raise ValueError(f"kernels must be 'reference' or 'default', got {kernels!r}")
            return _emulated_compare(paths, threads, runs, warmup, use_xnnpack, seed,
                                     _check_positive_int("samples", samples, 1), sysroot, kernels)
        if platform.machine().lower() not in _AARCH64:
            raise BenchmarkError(f"target='aarch64' on a {platform.machine()} machine: run this on the aarch64 "
                                 "board itself (pip install ai-edge-litert; see export/README.md), or pass "
                                 "emulate=True (CLI --emulate) to check the outputs under qemu (no timings)")
        results = _host_compare(paths, threads, runs, warmup, use_xnnpack, seed, memory)
        for result in results:
            result["target"] = "aarch64"
        return results
    return _host_compare(paths, threads, runs, warmup, use_xnnpack, seed, memory)


def benchmark(tflite_path, target="host", threads=1, runs=50, warmup=5, use_xnnpack=True, **options):
    """Latency statistics of one .tflite file on ``target``; see ``compare`` for the options."""
    if not isinstance(tflite_path, (str, os.PathLike)):
        raise ValueError(f"tflite_path must be one path (use compare() for several), got {tflite_path!r}")
    return compare([tflite_path], target, threads, runs, warmup, use_xnnpack, **options)[0]


# ------------------------------------------------------------------------------------------ table / CLI

def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


_MATCH_LABELS = {"identical": "identical", "close": "float rounding only", "different": "DIFFERENT"}


def format_table(results):
    """Models as rows, side by side; ``speedup`` = first model's median / this model's median."""
    if results and results[0].get("emulated"):
        header = ["model", "size KB", "vs host reference", "mismatched", "max |diff|", "emulated s"]
        rows = [[os.path.basename(r["model"]), f"{r['file_bytes'] / 1024:.1f}",
                 _MATCH_LABELS[r["match"]], f"{r['mismatched_values']}/{r['compared_values']}",
                 f"{r['max_abs_diff']:.3g}", f"{r['emulation_seconds']:.1f}"] for r in results]
        title = f"{results[0]['device']['description']}"
    else:
        base = results[0]
        header = ["model", "size KB", "x smaller", "median ms", "mean ms", "p90 ms", "min ms", "max ms",
                  "init ms", "peak MB", "speedup", "ops outside XNNPACK"]
        rows = []
        for r in results:
            outside = r.get("graph", {}).get("ops_outside_xnnpack")
            speedup = (base["median_ms"] / r["median_ms"]) if base["median_ms"] and r["median_ms"] else None
            rows.append([os.path.basename(r["model"]), f"{r['file_bytes'] / 1024:.1f}",
                         f"{base['file_bytes'] / r['file_bytes']:.2f}", _fmt(r["median_ms"], ".3f"),
                         _fmt(r["mean_ms"], ".3f"), _fmt(r["p90_ms"], ".3f"), _fmt(r["min_ms"], ".3f"),
                         _fmt(r["max_ms"], ".3f"), _fmt(r["init_ms"], ".1f"), _fmt(r["peak_memory_mb"], ".1f"),
                         _fmt(speedup), "-" if outside is None else
                         (", ".join(sorted({o["op"] for o in outside})) or "none")])
        title = (f"{base['target']}: {base['device']['description']}; threads={base['threads']} "
                 f"runs={base['runs']} warmup={base['warmup']} xnnpack={base['use_xnnpack']}")
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_cli(paths, target="host", threads=1, runs=50, warmup=5, use_xnnpack=True, serial=None,
            benchmark_binary=None, cpu_mask=None, repeats=3, cooldown_s=2.0, op_profile=False, emulate=False,
            sysroot=None, json_path=None):
    """What ``tfq bench MODEL.tflite ... --target=...`` prints: the side-by-side table (returned as a string).
    ``json_path``: also write the full result dicts there."""
    options = {}
    if target == "android":
        options.update(serial=serial, benchmark_binary=benchmark_binary, cpu_mask=cpu_mask, repeats=repeats,
                       cooldown_s=cooldown_s, op_profile=op_profile)
    elif any(v not in (None, False) for v in (serial, benchmark_binary, cpu_mask)) or op_profile:
        raise ValueError("--serial, --benchmark_binary, --cpu_mask and --op_profile need --target=android")
    if emulate or sysroot:
        options.update(emulate=emulate, sysroot=sysroot)
    results = compare(paths, target, threads, runs, warmup, use_xnnpack, **options)
    if json_path:
        import json
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=1)
    return format_table(results)


def build_parser():
    parser = argparse.ArgumentParser(prog="tfq bench", description="Latency of .tflite files, side by side.")
    parser.add_argument("models", nargs="+", help=".tflite files (the first is the speed-up baseline)")
    parser.add_argument("--target", default="host", choices=TARGETS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no_xnnpack", action="store_true", help="optimized kernels without XNNPACK")
    parser.add_argument("--serial", help="android: device serial (adb devices)")
    parser.add_argument("--benchmark_binary", help=f"android: benchmark_model binary (or ${BINARY_ENV})")
    parser.add_argument("--cpu_mask", help="android: taskset CPU mask in hex, e.g. f0 for the big cores")
    parser.add_argument("--repeats", type=int, default=3, help="android: benchmark_model invocations per model")
    parser.add_argument("--cooldown_s", type=float, default=2.0, help="android: rest after each invocation")
    parser.add_argument("--op_profile", action="store_true", help="android: list ops outside XNNPACK")
    parser.add_argument("--emulate", action="store_true", help="aarch64 on x86: check outputs under qemu")
    parser.add_argument("--sysroot", help=f"aarch64 emulation sysroot (or ${SYSROOT_ENV})")
    parser.add_argument("--json", dest="json_path", help="write the full results here")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        print(run_cli(args.models, args.target, args.threads, args.runs, args.warmup, not args.no_xnnpack,
                      args.serial, args.benchmark_binary, args.cpu_mask, args.repeats, args.cooldown_s,
                      args.op_profile, args.emulate, args.sysroot, args.json_path))
    except (ValueError, BenchmarkError) as error:
        print(f"tfq bench: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory-probe"]:
        _memory_probe(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]))
    else:
        sys.exit(main())
