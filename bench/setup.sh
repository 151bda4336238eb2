#!/usr/bin/env bash
# Create <repo>/.venv with PyTorch, numpy and transformers for the PyTorch side of the
# benchmarks (transformers for `bench/hf_decode.py`, the decode peer).
#
# Only the default PyPI index is reachable, and PyPI's Linux x86_64 torch wheel is
# the CUDA build: `import torch` preloads the CUDA libraries (cuBLAS, cuDNN, NCCL, ...)
# from the nvidia-*/cuda-* wheels and fails without them, so `--no-deps` is not enough.
# We therefore install torch with its full dependency set (several GB on disk) and
# simply run it on the CPU; no GPU is needed or used.
#
# Idempotent: does nothing when the venv already imports torch.
# Env: PYTHON (default python3), TORCH_SPEC (default torch==2.15.0),
# TRANSFORMERS_SPEC (default transformers).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.15.0}"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import torch, numpy' 2>/dev/null; then
    echo "venv already has torch: $VENV" >&2
else
    start=$(date +%s)
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    nice -n 15 "$VENV/bin/pip" install --quiet --disable-pip-version-check "$TORCH_SPEC" numpy
    echo "installed in $(( $(date +%s) - start ))s; venv size: $(du -sh "$VENV" | cut -f1)" >&2
fi
if ! "$VENV/bin/python" -c 'import transformers' 2>/dev/null; then
    nice -n 15 "$VENV/bin/pip" install --quiet --disable-pip-version-check "$TRANSFORMERS_SPEC"
fi

"$VENV/bin/python" -c 'import torch, numpy, transformers
print("torch", torch.__version__, "numpy", numpy.__version__, "transformers", transformers.__version__)'
