#!/usr/bin/env bash
# Ferrite beside PyTorch on this machine, in one run: f32 matmul, the GPT-2-124M-shaped
# training step, and nanoGPT's char Shakespeare config (2000 steps). Prints a Markdown table
# of both figures and their ratio; BENCHMARKS.md records its output.
#   bench/run.sh [path/to/tinyshakespeare.txt]     (THREADS=2 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/tinyshakespeare.txt}
threads=${THREADS:-2}
bash bench/setup.sh >&2
cargo build --release --bin ferrite >&2
F=target/release/ferrite
P=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
last() { tail -n 1; }

fm=$($F bench matmul --threads "$threads" | last)
pm=$($P bench/torch_gpt.py matmul --threads "$threads" --reps 20 | last)
fs=$($F bench step --threads "$threads" --steps 3 | last)
ps=$($P bench/torch_gpt.py gpt2 --threads "$threads" --steps 3 | last)

$F data prepare --tokenizer char --val-fraction 0.1 --out "$work/data" "$data" >&2
sed -e "s|data-out/shakespeare_char|$work/data|" -e "s|out/shakespeare_char|$work/out|" \
    -e "s|threads = 2|threads = $threads|" examples/shakespeare_char.toml > "$work/job.toml"
$F train "$work/job.toml" --plain 2>"$work/train.log"
pc=$($P bench/torch_gpt.py char --threads "$threads" --data "$data" --steps 2000 \
    --eval-interval 250 --eval-steps 20 | last)

FM="$fm" PM="$pm" FS="$fs" PS="$ps" PC="$pc" METRICS="$work/out/metrics.jsonl" python3 - <<'PY'
import json, os, statistics
fm, pm = json.loads(os.environ["FM"]), json.loads(os.environ["PM"])
fs, ps = json.loads(os.environ["FS"]), json.loads(os.environ["PS"])
pc = json.loads(os.environ["PC"])
rows = [json.loads(l) for l in open(os.environ["METRICS"])]
ms = statistics.mean(r["step_ms"] for r in rows[10:])
val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
print("| benchmark | Ferrite | PyTorch | Ferrite / PyTorch |")
print("|---|---|---|---|")
print(f"| f32 matmul 1024×3072×768, GFLOP/s | {fm['gflops']:.0f} | {pm['gflops']:.0f} | {fm['gflops']/pm['gflops']:.2f}× throughput |")
print(f"| GPT-2-124M shape step (B4, T256), ms | {fs['ms_per_step']:.0f} | {ps['ms_per_step']:.0f} | {fs['ms_per_step']/ps['ms_per_step']:.2f}× time |")
print(f"| char Shakespeare step (B12, T64), ms/iter | {ms:.1f} | {pc['ms_per_iter']:.1f} | {ms/pc['ms_per_iter']:.2f}× time |")
print(f"| char Shakespeare tokens/s | {768/ms*1e3:.0f} | {pc['tokens_per_s']:.0f} | |")
print(f"| char Shakespeare val loss at step 2000 | {val:.4f} | {pc['val_loss']:.4f} | |")
PY
