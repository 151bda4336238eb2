#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then runs every test
# of every crate, the docker-compose smoke test, then the CUDA kernels' compile check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --workspace --locked 2>&1
# The docker-compose cluster end to end (deploy/compose/smoke.sh: images from a local
# debootstrap base, a job, serving, a killed worker, a coordinator failover), on the binary
# the tests above just built. It needs a Docker engine; without one it says so and skips,
# except under CI=true, where that is a failure.
if docker info >/dev/null 2>&1; then
  FERRITE_BINARY=target/debug/ferrite bash deploy/compose/smoke.sh 2>&1
elif [ "${CI:-}" = true ]; then
  echo "the compose smoke test needs a Docker engine (docker info failed)" >&2
  exit 1
else
  echo "skipping the compose smoke test: no Docker engine (docker info failed)" >&2
fi
# Every CUDA kernel compiles with NVRTC (no GPU needed), and the `cuda` feature builds.
bash scripts/nvrtc.sh --locked 2>&1
# Kubernetes manifests: every overlay renders with kustomize and passes schema validation.
if command -v kubectl >/dev/null 2>&1 || [ -n "${KUSTOMIZE:-}" ]; then
  bash scripts/k8s-validate.sh 2>&1
else
  echo "skipping the Kubernetes manifest check: no kubectl (with kustomize) or \$KUSTOMIZE" >&2
fi
