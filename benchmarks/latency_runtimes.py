"""MobileNetV2 int8 / fp32 speed-up under LiteRT's runtime settings, each model timed on its own.

``python -m benchmarks.latency_runtimes`` exports fp32 and tfq int8 MobileNetV2 (224x224, the files of
``benchmarks.latency``) and times both at 1 thread, each model alone (load, warm-up, ``--runs`` timed
invokes; fp32, int8, fp32 again), through:

- ``interpreter``: ``ai_edge_litert.interpreter.Interpreter`` with its default XNNPACK delegate (what
  ``tfq bench`` uses);
- ``interpreter-latest``: the same with ``experimental_default_delegate_latest_features=True``;
- ``compiled-<flags>``: the CompiledModel API on the CPU accelerator with XNNPACK delegate flags
  (``TFLITE_XNNPACK_DELEGATE_FLAG_*``: 1 QS8, 2 QU8, 64 latest operators, 256 Slinky), and with
  YNNPACK asked for (``CpuOptions(enable_ynnpack=True)``).

It answers one question: does any runtime setting of this LiteRT build change the int8 / fp32 ratio?
``benchmarks.latency`` interleaves the models instead (A B A B), which evicts each one's weights from the
caches between its runs.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks import latency
from benchmarks.common import new_results, write
from tfq.export import bench

RESULTS = os.path.join(os.path.dirname(__file__), "results")
FLAG_SETS = {"default (QS8|QU8)": 3, "latest operators": 3 | 64, "Slinky": 3 | 256, "latest operators + Slinky": 3 | 64 | 256}


def _interpreter_runner(path, **options):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path, num_threads=1, **options)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    for detail, array in zip(details, bench.random_inputs(details)):
        interpreter.set_tensor(detail["index"], array)
    return interpreter.invoke


def _compiled_runner(path, flags, ynnpack=False):
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import CpuOptions, Options
    model = CompiledModel.from_file(path, options=Options(
        hardware_accelerators=HardwareAccelerator.CPU, cpu_options=CpuOptions(num_threads=1, xnnpack_flags=flags, enable_ynnpack=ynnpack)))
    inputs, outputs = model.create_input_buffers(0), model.create_output_buffers(0)
    return lambda: model.run_by_index(0, inputs, outputs)


def median_ms(run, runs, warmup):
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return bench.summarize(samples)["median_ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(RESULTS, "latency_runtimes.json"))
    args = parser.parse_args(argv)
    results = new_results("latency_runtimes", args, argv)
    runtimes = {"interpreter": lambda p: _interpreter_runner(p),
                "interpreter-latest": lambda p: _interpreter_runner(p, experimental_default_delegate_latest_features=True)}
    runtimes.update({f"compiled {name}": (lambda p, f=flags: _compiled_runner(p, f)) for name, flags in FLAG_SETS.items()})
    runtimes["compiled YNNPACK"] = lambda p: _compiled_runner(p, None, ynnpack=True)
    with tempfile.TemporaryDirectory() as folder:
        paths, errors = latency.export_all("mobilenet_v2", ["fp32", "tfq-int8"], folder, seed=0)
        if errors:
            raise RuntimeError(f"export failed: {errors}")
        rows = []
        for name, make in runtimes.items():
            try:
                fp32 = [median_ms(make(paths["fp32"]), args.runs, args.warmup)]
                int8 = median_ms(make(paths["tfq-int8"]), args.runs, args.warmup)
                fp32.append(median_ms(make(paths["fp32"]), args.runs, args.warmup))
                row = {"runtime": name, "fp32_median_ms": fp32, "int8_median_ms": int8,
                       "speedup": min(fp32) / int8}
                print(f"{name:32s} fp32 {fp32[0]:.2f} / {fp32[1]:.2f} ms, int8 {int8:.2f} ms: "
                      f"{row['speedup']:.2f}x", flush=True)
            except Exception as error:   # a setting this build lacks is recorded, the others still run
                row = {"runtime": name, "error": f"{type(error).__name__}: {error}"[:500]}
                print(f"{name}: {row['error'][:200]}", flush=True)
            rows.append(row)
    results["variants"] = rows
    write(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
