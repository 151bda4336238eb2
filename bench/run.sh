#!/usr/bin/env bash
# Ferrite beside PyTorch on this machine, in one run: f32 matmul, the GPT-2-124M-shaped
# training step, and nanoGPT's char Shakespeare config (2000 steps). Prints a Markdown table
# of both figures and their ratio; BENCHMARKS.md records its output.
#   bench/run.sh [path/to/tinyshakespeare.txt]     (THREADS=2 by default)
#
# PRECISION=bf16 runs Ferrite's linear layers in bf16 on AMX (`--precision`, the job's
# `matmul_precision`) and PyTorch twice, in f32 and under bf16 autocast, each with its ratio.
#
# `bench/run.sh decode` instead sets the serving decode speed (`ferrite bench decode`) beside
# Hugging Face transformers (`bench/hf_decode.py`): ROUNDS (3) rounds, each running Ferrite
# then transformers back to back, so both see the same load; every round's figures and
# ratio, then the medians (each run's JSON goes to stderr). DTYPE=f16 serves Ferrite's weight
# matrices as f16 (`--dtype`); transformers runs in f32 either way.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
bash bench/setup.sh >&2
cargo build --release --bin ferrite >&2
F=target/release/ferrite
P=.venv/bin/python

if [ "${1:-}" = decode ]; then
    rounds=${ROUNDS:-3}
    out=$(mktemp)
    trap 'rm -f "$out"' EXIT
    for r in $(seq "$rounds"); do
        echo "round $r/$rounds: ferrite, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        $F bench decode --threads "$threads" --reps 1 --dtype "${DTYPE:-f32}" | tail -n 1 | tee -a "$out" >&2
        echo "round $r/$rounds: transformers, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        $P bench/hf_decode.py --threads "$threads" --reps 1 | tail -n 1 | tee -a "$out" >&2
    done
    OUT="$out" python3 - <<'PY'
import json, os, statistics
runs = [json.loads(l) for l in open(os.environ["OUT"])]
f, h = runs[0::2], runs[1::2]
med = statistics.median_high
def row(name, key, fmt, better):
    fs, hs = [r[key] for r in f], [r[key] for r in h]
    ratios = [a / b for a, b in zip(fs, hs)]
    each = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"| {name} | {med(fs):{fmt}} | {med(hs):{fmt}} | {med(ratios):.2f}× {better} ({each}) |")
print("| decode, GPT-2-124M shape | Ferrite | transformers | Ferrite / transformers (each round) |")
print("|---|---|---|---|")
row("batch 1, tokens/s", "batch1_tokens_per_s", ".1f", "throughput")
row(f"{f[0]['streams']} streams, aggregate tokens/s", "aggregate_tokens_per_s", ".1f", "throughput")
for i, t in enumerate(f[0]["ttft"]):
    n = t["prompt"]
    fs = [r["ttft"][i]["ms"] for r in f]
    hs = [r["ttft"][i]["ms"] for r in h]
    ratios = [a / b for a, b in zip(fs, hs)]
    each = ", ".join(f"{x:.2f}" for x in ratios)
    print(f"| time to first token, {n}-token prompt, ms | {med(fs):.0f} | {med(hs):.0f} | {med(ratios):.2f}× time ({each}) |")
PY
    exit 0
fi

data=${1:-../shared/data/tinyshakespeare.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
last() { tail -n 1; }

precision=${PRECISION:-f32}
fm=$($F bench matmul --threads "$threads" --precision "$precision" | last)
pm=$($P bench/torch_gpt.py matmul --threads "$threads" --reps 20 | last)
fs=$($F bench step --threads "$threads" --steps 3 --precision "$precision" | last)
ps=$($P bench/torch_gpt.py gpt2 --threads "$threads" --steps 3 | last)

$F data prepare --tokenizer char --val-fraction 0.1 --out "$work/data" "$data" >&2
sed -e "s|data-out/shakespeare_char|$work/data|" -e "s|out/shakespeare_char|$work/out|" \
    -e "s|threads = 2|threads = $threads\nmatmul_precision = \"$precision\"|" \
    examples/shakespeare_char.toml > "$work/job.toml"
$F train "$work/job.toml" --plain 2>"$work/train.log"
char() { $P bench/torch_gpt.py char --threads "$threads" --data "$data" --steps 2000 \
    --eval-interval 250 --eval-steps 20 "$@" | last; }
pc=$(char)
# PyTorch under bf16 autocast too, when Ferrite runs bf16.
pm16=null ps16=null pc16=null
if [ "$precision" = bf16 ]; then
    pm16=$($P bench/torch_gpt.py matmul --threads "$threads" --reps 20 --autocast bf16 | last)
    ps16=$($P bench/torch_gpt.py gpt2 --threads "$threads" --steps 3 --autocast bf16 | last)
    pc16=$(char --autocast bf16)
fi

FM="$fm" PM="$pm" FS="$fs" PS="$ps" PC="$pc" PM16="$pm16" PS16="$ps16" PC16="$pc16" \
    PRECISION="$precision" METRICS="$work/out/metrics.jsonl" python3 - <<'PY'
import json, os, statistics
e = {k: json.loads(os.environ[k]) for k in ("FM", "PM", "FS", "PS", "PC", "PM16", "PS16", "PC16")}
bf16 = e["PM16"] is not None
rows = [json.loads(l) for l in open(os.environ["METRICS"])]
ms = statistics.mean(r["step_ms"] for r in rows[10:])
val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
head = f"| benchmark | Ferrite ({os.environ['PRECISION']}) | PyTorch f32 | Ferrite / PyTorch f32 |"
if bf16:
    head += " PyTorch bf16 autocast | Ferrite / PyTorch bf16 |"
print(head)
print("|---" * (6 if bf16 else 4) + "|")
def line(name, ours, theirs, fmt, how):
    out = f"| {name} | {ours:{fmt}} |"
    for t in theirs:
        r = ours / t
        out += f" {t:{fmt}} | {r:.2f}× {how} |" if how else f" {t:{fmt}} | |"
    print(out)
pick = lambda k, f: [f(e[k])] + ([f(e[k + "16"])] if bf16 else [])
line("matmul 1024×3072×768 of f32 operands, GFLOP/s", e["FM"]["gflops"], pick("PM", lambda j: j["gflops"]), ".0f", "throughput")
line("GPT-2-124M shape step (B4, T256), ms", e["FS"]["ms_per_step"], pick("PS", lambda j: j["ms_per_step"]), ".0f", "time")
line("char Shakespeare step (B12, T64), ms/iter", ms, pick("PC", lambda j: j["ms_per_iter"]), ".1f", "time")
line("char Shakespeare tokens/s", 768 / ms * 1e3, pick("PC", lambda j: j["tokens_per_s"]), ".0f", "")
line("char Shakespeare val loss at step 2000", val, pick("PC", lambda j: j["val_loss"]), ".4f", "")
PY
