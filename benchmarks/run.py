"""`make bench [ONLY=name]`: runs the benchmarks, then rebuilds the README table from the JSON."""
import argparse
import importlib

BENCHMARKS = ("lsq", "step_time", "export", "latency", "pwlq", "n2uq", "ddq", "adaqat", "large_models")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=None, help=f"one of {BENCHMARKS}")
    args = parser.parse_args()
    names = BENCHMARKS if not args.only else (args.only,)
    for name in names:
        if name not in BENCHMARKS:
            raise SystemExit(f"--only must be one of {BENCHMARKS}, got {name!r}")
        importlib.import_module(f"benchmarks.{name}").main([])
    importlib.import_module("benchmarks.report").main()


if __name__ == "__main__":
    main()
