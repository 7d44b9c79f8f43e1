#!/usr/bin/env bash
# Measure .tflite files on an Android phone by hand, with the commands tfq.export.bench sends.
#
#   SERIAL=28021FDH2000AB CPU_MASK=f0 THREADS=1 RUNS=50 WARMUP=5 COOLDOWN=5 REPEATS=3 \
#     bash export/android_benchmark.sh /path/to/benchmark_model fp32.tflite int8.tflite
#
# benchmark_model: TFLite's tools/benchmark binary for the phone's ABI (see export/README.md).
# Prints each invocation's 'Inference timings in us' and memory lines; models alternate (A B A B ...).
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 BENCHMARK_MODEL MODEL.tflite [MODEL.tflite ...]" >&2
  exit 2
fi
command -v adb >/dev/null || { echo "adb not found: apt-get install adb (or Android platform-tools)" >&2; exit 1; }
binary="$1"; shift
[[ -f "$binary" ]] || { echo "no benchmark_model binary at $binary" >&2; exit 1; }

SERIAL="${SERIAL:-$(adb devices | awk 'NR > 1 && $2 == "device" {print $1; exit}')}"
[[ -n "$SERIAL" ]] || { echo "no device: enable USB debugging and check 'adb devices'" >&2; exit 1; }
THREADS="${THREADS:-1}"; RUNS="${RUNS:-50}"; WARMUP="${WARMUP:-5}"
COOLDOWN="${COOLDOWN:-5}"; REPEATS="${REPEATS:-3}"; XNNPACK="${XNNPACK:-true}"
REMOTE=/data/local/tmp/tfq
TASKSET=""
[[ -n "${CPU_MASK:-}" ]] && TASKSET="taskset $CPU_MASK"
adb_s() { adb -s "$SERIAL" "$@"; }

echo "device: $(adb_s shell getprop ro.product.manufacturer) $(adb_s shell getprop ro.product.model)" \
     "($(adb_s shell getprop ro.product.cpu.abi), Android $(adb_s shell getprop ro.build.version.release))"
adb_s shell mkdir -p "$REMOTE"
adb_s push "$binary" "$REMOTE/benchmark_model" >/dev/null
adb_s shell chmod 755 "$REMOTE/benchmark_model"
for model in "$@"; do
  adb_s push "$model" "$REMOTE/$(basename "$model")" >/dev/null
done

for ((repeat = 1; repeat <= REPEATS; repeat++)); do
  for model in "$@"; do
    echo "== $(basename "$model") (repeat $repeat/$REPEATS)"
    adb_s shell "$TASKSET $REMOTE/benchmark_model --graph=$REMOTE/$(basename "$model") \
      --num_threads=$THREADS --num_runs=$RUNS --warmup_runs=$WARMUP --min_secs=0 --warmup_min_secs=0 \
      --use_xnnpack=$XNNPACK" | grep -iE "count=|Inference timings|memory footprint|Replacing" || true
    sleep "$COOLDOWN"
  done
done
