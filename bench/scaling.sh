#!/usr/bin/env bash
# Data-parallel scaling on this machine, beside PyTorch DDP (gloo): the GPT-2-124M-shaped
# step (12 layers, 768 wide, vocabulary 50304 padded, T=256) at a global batch of 8, on one
# worker with one thread against two workers with one thread each (batch 4 each), through
# the real cluster: a coordinator, `ferrite worker`s over the ring and a submitted job,
# timed from the `step_ms` of its metrics.jsonl (median after the first step).
# Prints a Markdown table: each side's step times and its scaling (1-worker time / 2-worker
# time, ideally 2), and the machine's ceiling: two independent processes that never
# communicate (the slower counts), against one alone. The two workers share this host, so
# their ring links use shared memory; FERRITE_RING_SHM=0 (passed on to the workers) keeps
# them on loopback TCP.
#   bench/scaling.sh [corpus.txt]      (default: ../shared/data/tinyshakespeare.txt)
#   STEPS=4 FERRITE_RING_SHM=0
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:-../shared/data/tinyshakespeare.txt}
steps=${STEPS:-4}
F=${FERRITE:-target/release/ferrite}
[ -x "$F" ] || cargo build --release --bin ferrite >&2
P=${PYTHON:-.venv/bin/python}
[ -x "$P" ] || bash bench/setup.sh >&2

source bench/cluster-lib.sh

"$F" data prepare --tokenizer gpt2 --out "$work/data" "$corpus" >&2
start coordinator coordinator --insecure --listen 127.0.0.1:0 --store "embedded:$work/coord.redb"
url="http://$addr"
for n in 0 1; do
    RUST_LOG=info,ferrite_worker::trainer=debug start "worker-$n" worker --coordinator "$url" --threads 1 --listen 127.0.0.1:0
done

# Writes $work/$1.toml: the job on $2 workers of batch $3, writing into $work/$1.
job_file() {
    local name=$1
    cat >"$work/$name.toml" <<TOML
name = "scaling-$name"
[model]
n_layer = 12
n_head = 12
n_embd = 768
block_size = 256
[data]
dir = "$work/data"
[train]
batch_size = $3
max_steps = $steps
learning_rate = 6e-4
warmup_steps = 1
lr_decay_steps = $steps
eval_interval = 0
seed = 1
threads = 1
[output]
dir = "$work/$name"
checkpoint_interval = 0
keep_checkpoints = 1
[cluster]
workers = $2
TOML
}

# The median step_ms after the first step of the run that wrote into $work/$1.
median_ms() {
    python3 - "$work/$1/metrics.jsonl" <<'PY'
import json, statistics, sys
ms = [json.loads(l)["step_ms"] for l in open(sys.argv[1])][1:]
print(round(statistics.median(ms), 1))
PY
}

# Runs the step on $1 workers of batch $2; prints its median step time.
ferrite_step_ms() {
    job_file "w$1" "$1" "$2"
    local id
    id=$("$F" job submit "$work/w$1.toml" --coordinator "$url" | grep -o 'job-[0-9]*' | head -n 1)
    wait_succeeded "$id" "$url"
    median_ms "w$1"
}

echo "ferrite: 1 worker x batch 8, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
f1=$(ferrite_step_ms 1 8)
echo "ferrite: 2 workers x batch 4, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
f2=$(ferrite_step_ms 2 4)
# Where the time went: every rank logs a `step phases` line per step (forward, backward,
# all-reduce wait, optimizer); show the last steps of both runs.
grep -h "step phases" "$work"/worker-*.log | tail -n "$((3 * steps))" >&2 || true
grep -h "ring connected" "$work"/worker-*.log >&2 || true
torch_ms() {
    "$P" bench/torch_gpt.py ddp --threads 1 --world "$1" --global-batch 8 --steps "$steps" \
        --vocab-size 50257 --block-size 256 |
        tail -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ms_per_step"])'
}
echo "pytorch DDP: world 1, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
t1=$(torch_ms 1)
echo "pytorch DDP: world 2, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
t2=$(torch_ms 2)
# The machine's own ceiling: the same training loop as `ferrite train` processes that never
# communicate, one of batch 8 alone, then two of batch 4 at once (the slower counts, as in
# lockstep training). Two cores that share memory bandwidth, caches and a turbo budget stay
# below 2 here, and no all-reduce beats it.
for name in alone:8 pair-a:4 pair-b:4; do job_file "${name%:*}" 1 "${name#*:}"; done
echo "ferrite train: batch 8 alone, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$F" train --plain "$work/alone.toml" >"$work/alone.out" 2>&1
echo "ferrite train: two of batch 4 at once, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$F" train --plain "$work/pair-a.toml" >"$work/pair-a.out" 2>&1 &
pair=$!
"$F" train --plain "$work/pair-b.toml" >"$work/pair-b.out" 2>&1
wait "$pair"
c1=$(median_ms alone)
c2a=$(median_ms pair-a)
c2b=$(median_ms pair-b)
link=$([ "${FERRITE_RING_SHM:-1}" = 0 ] && echo "loopback TCP" || echo "shared memory")
F1=$f1 F2=$f2 T1=$t1 T2=$t2 C1=$c1 C2A=$c2a C2B=$c2b LINK=$link python3 - <<'PY'
import os
f1, f2, t1, t2, c1 = (float(os.environ[k]) for k in ("F1", "F2", "T1", "T2", "C1"))
c2 = max(float(os.environ["C2A"]), float(os.environ["C2B"]))
link = os.environ["LINK"]
print("| GPT-2-124M step, global batch 8, T=256 | 1 × 1 thread, ms | 2 × 1 thread, ms | scaling |")
print("|---|---|---|---|")
print(f"| Ferrite (`ferrite worker`s, ring over {link}) | {f1:.0f} | {f2:.0f} | {f1 / f2:.2f} |")
print(f"| PyTorch DDP (gloo) | {t1:.0f} | {t2:.0f} | {t1 / t2:.2f} |")
print(f"| ceiling: `ferrite train` ×2 at once, no communication | {c1:.0f} | {c2:.0f} | {c1 / c2:.2f} |")
PY
