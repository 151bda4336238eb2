#!/usr/bin/env bash
# Compile-checks every CUDA kernel with NVRTC, on any machine (no GPU, no CUDA toolkit):
# installs NVRTC from PyPI into target/nvrtc-venv (once), points the loader at its
# libnvrtc.so.13 and runs kernels/tests/nvrtc.rs with the `cuda` feature.
#
# NVRTC 13.0 matches the GPU machines' driver (580, CUDA 13.0): PTX from a newer NVRTC can be
# refused by an older driver. NVRTC_PIP_SPEC overrides the pin. Extra arguments go to
# `cargo test` (e.g. `-- --nocapture`).
set -euo pipefail
cd "$(dirname "$0")/.."

spec="${NVRTC_PIP_SPEC:-nvidia-cuda-nvrtc==13.0.*}"
venv="target/nvrtc-venv"
stamp="$venv/.installed"

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$spec" ]]; then
    echo "nvrtc.sh: installing $spec into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec"
    echo "$spec" > "$stamp"
fi

lib="$(find "$venv" -name 'libnvrtc.so.*' -path '*/nvidia/*' -not -name '*alt*' -print -quit)"
if [[ -z "$lib" ]]; then
    echo "nvrtc.sh: $spec installed no libnvrtc.so.* under $venv" >&2
    exit 1
fi
libdir="$(cd "$(dirname "$lib")" && pwd)"
echo "nvrtc.sh: using $lib" >&2

# CI=true makes the test fail rather than skip if the library still cannot be loaded.
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" CI=true \
    cargo test -p ferrite-kernels --features cuda --test nvrtc "$@"
