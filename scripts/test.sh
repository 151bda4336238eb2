#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then runs every test
# of every crate, then the CUDA kernels' compile check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --workspace --locked 2>&1
# Every CUDA kernel compiles with NVRTC (no GPU needed), and the `cuda` feature builds.
bash scripts/nvrtc.sh --locked 2>&1
# Kubernetes manifests: every overlay renders with kustomize and passes schema validation.
if command -v kubectl >/dev/null 2>&1 || [ -n "${KUSTOMIZE:-}" ]; then
  bash scripts/k8s-validate.sh 2>&1
else
  echo "skipping the Kubernetes manifest check: no kubectl (with kustomize) or \$KUSTOMIZE" >&2
fi
