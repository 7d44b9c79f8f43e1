#!/usr/bin/env bash
# Prepare an arm64 sysroot for `tfq bench --target=aarch64 --emulate` on an x86 machine:
#   Debian bookworm arm64 base + python3.11 (debootstrap first stage, packages unpacked with dpkg-deb,
#   no chroot and no binfmt needed) and the aarch64 wheels of ai-edge-litert 1.4.0 (LiteRT; the newest
#   release with an aarch64 wheel on PyPI) and numpy 1.26.4 unpacked into SYSROOT/opt/tfq-site.
#   qemu-aarch64-static -L SYSROOT then runs SYSROOT/usr/bin/python3.11.
#
#   bash export/prepare_aarch64_sysroot.sh [SYSROOT]     (default ~/.cache/tfq/aarch64-sysroot, ~360 MB)
#
# Needs: debootstrap, qemu-user-static, dpkg-deb (Debian: apt-get install debootstrap qemu-user-static)
# and a Python with pip.  Environment: MIRROR (default http://deb.debian.org/debian), SUITE (bookworm),
# PYTHON (python3).  A site made by an older version of this script holds tflite-runtime 2.14: LiteRT is
# added beside it and export/run_tflite.py prefers LiteRT.
set -euo pipefail

SYSROOT="${1:-${TFQ_AARCH64_SYSROOT:-$HOME/.cache/tfq/aarch64-sysroot}}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE="${SUITE:-bookworm}"
PYTHON="${PYTHON:-python3}"
LITERT="ai-edge-litert==1.4.0"
NUMPY="numpy==1.26.4"

missing=()
command -v debootstrap >/dev/null || missing+=("debootstrap (apt-get install debootstrap)")
command -v qemu-aarch64-static >/dev/null || missing+=("qemu-aarch64-static (apt-get install qemu-user-static)")
command -v dpkg-deb >/dev/null || missing+=("dpkg-deb (a Debian-based host)")
"$PYTHON" -m pip --version >/dev/null 2>&1 || missing+=("pip for $PYTHON")
if ((${#missing[@]})); then
  printf 'prepare_aarch64_sysroot: missing %s\n' "${missing[@]}" >&2
  exit 1
fi

if [[ ! -x "$SYSROOT/usr/bin/python3.11" ]]; then
  mkdir -p "$SYSROOT"
  echo "debootstrap (first stage) of $SUITE arm64 into $SYSROOT"
  debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python3.11-minimal,libpython3.11-stdlib "$SUITE" "$SYSROOT" "$MIRROR"
  # The first stage unpacks only the essential packages; unpack every downloaded one (python included).
  for deb in "$SYSROOT"/var/cache/apt/archives/*.deb; do
    dpkg-deb -x "$deb" "$SYSROOT"
  done
fi

SITE="$SYSROOT/opt/tfq-site"
if [[ ! -d "$SITE/ai_edge_litert" ]]; then
  wheels="$(mktemp -d)"
  trap 'rm -rf "$wheels"' EXIT
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 311 \
    --platform manylinux_2_34_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    -d "$wheels" "$LITERT" "$NUMPY"
  mkdir -p "$SITE"
  for wheel in "$wheels"/*.whl; do
    "$PYTHON" -m zipfile -e "$wheel" "$SITE"
  done
fi

echo "smoke test under qemu:"
PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 qemu-aarch64-static -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -c \
  "import platform, numpy, ai_edge_litert.interpreter; from importlib import metadata; print(platform.machine(), 'numpy', numpy.__version__, 'ai-edge-litert', metadata.version('ai-edge-litert'))"
echo "sysroot ready: $SYSROOT (use --sysroot=$SYSROOT or TFQ_AARCH64_SYSROOT)"
