#!/usr/bin/env bash
# Compile-checks every CUDA kernel with NVRTC, on any machine (no GPU, no CUDA toolkit):
# installs NVRTC from PyPI into target/nvrtc-venv (once), points the loader at its
# libnvrtc.so.13 and runs kernels/tests/nvrtc.rs with the `cuda` feature. Then builds every
# crate's `cuda` feature and its GPU tests (which skip here: no GPU).
#
# NVRTC 13.0 matches the GPU machines' driver (580, CUDA 13.0): PTX from a newer NVRTC can be
# refused by an older driver. NVRTC_PIP_SPEC overrides the pin. Extra arguments are
# `cargo test` options (e.g. `--locked`); the tests already run with `--nocapture`.
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
# --nocapture: the log shows each GPU test's "skipping: no CUDA device (…)" line.
# cuda_parity runs too: without a GPU its tests only say they skip, but it must compile.
# --lib adds the CUDA backend's host-side unit tests (cuBLAS call shapes, token buckets).
# Every build below selects the whole workspace with `cuda` on, so the dependencies keep the
# features `cargo test --workspace` resolved for them and their builds are reused: only the
# workspace's crates and cudarc compile again. (`-p <crate>` resolves the dependencies'
# features for that crate alone and rebuilt some 160 crates, a third of the CI run.)
cuda=(--workspace --features ferrite-cli/cuda "$@")
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" CI=true \
    cargo test "${cuda[@]}" --test nvrtc -- --nocapture
# The CUDA backend's unit tests, the GPU tests (which skip here: no GPU), the binary.
cargo test "${cuda[@]}" --lib -- cuda:: --nocapture
cargo test "${cuda[@]}" --test cuda_parity --test cuda_training --test cuda_nccl -- --nocapture
cargo test "${cuda[@]}" --bins --no-run
