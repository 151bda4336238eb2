#!/usr/bin/env bash
# Checks that ferrite checkpoints and Hugging Face `transformers` GPT-2 models load in each
# other and give the same greedy tokens and log-probabilities (bench/hf_compat.py).
#
# A documented manual check: CI does not run it, because it needs a Python venv with torch,
# transformers and safetensors (about 5 GB). Set PYTHON to that venv's python (default:
# .venv/bin/python). Steps: build ferrite; in a temporary folder prepare a tiny dataset with
# the gpt2 tokenizer and train a 2-layer, 2-head, 64-wide model (context 32) for 20 steps;
# then run the Python checks on the last checkpoint. Exits non-zero if any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python=${PYTHON:-$root/.venv/bin/python}
text=${TEXT:-$root/../shared/data/tinyshakespeare.txt}

cargo build --release --bin ferrite
bin=${CARGO_TARGET_DIR:-$root/target}/release/ferrite

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The first 200 KB are plenty for 20 steps.
head -c 200000 "$text" > "$work/input.txt"
"$bin" data prepare --tokenizer gpt2 --val-fraction 0.1 --out "$work/data" "$work/input.txt"

cat > "$work/job.toml" <<TOML
[model]
n_layer = 2
n_head = 2
n_embd = 64
block_size = 32

[data]
dir = "$work/data"

[train]
batch_size = 8
max_steps = 20
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = 5
lr_decay_steps = 20
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
grad_accum = 1
eval_interval = 10
eval_steps = 2
seed = 1337
threads = 2

[output]
dir = "$work/out"
checkpoint_interval = 20
TOML
"$bin" train --plain "$work/job.toml"
checkpoint=$(ls -d "$work"/out/checkpoints/step-* | tail -n 1)
echo "--- checking $checkpoint against transformers"
"$python" "$root/bench/hf_compat.py" --ferrite "$bin" --checkpoint "$checkpoint" "$@"
