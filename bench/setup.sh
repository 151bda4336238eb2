#!/usr/bin/env bash
# Create <repo>/.venv with PyTorch and numpy for the PyTorch side of the benchmarks.
#
# Only the default PyPI index is reachable, and PyPI's Linux x86_64 torch wheel is
# the CUDA build: `import torch` preloads the CUDA libraries (cuBLAS, cuDNN, NCCL, ...)
# from the nvidia-*/cuda-* wheels and fails without them, so `--no-deps` is not enough.
# We therefore install torch with its full dependency set (several GB on disk) and
# simply run it on the CPU; no GPU is needed or used.
#
# Idempotent: does nothing when the venv already imports torch.
# Env: PYTHON (default python3), TORCH_SPEC (default torch==2.15.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.15.0}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import torch, numpy' 2>/dev/null; then
    echo "venv already has torch: $VENV" >&2
else
    start=$(date +%s)
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    nice -n 15 "$VENV/bin/pip" install --quiet --disable-pip-version-check "$TORCH_SPEC" numpy
    echo "installed in $(( $(date +%s) - start ))s; venv size: $(du -sh "$VENV" | cut -f1)" >&2
fi

"$VENV/bin/python" -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)'
