#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then runs every test
# of every crate, then the CUDA kernels' compile check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --workspace --locked 2>&1
# Every CUDA kernel compiles with NVRTC (no GPU needed), and the `cuda` feature builds.
bash scripts/nvrtc.sh --locked 2>&1
