#!/usr/bin/env bash
# Time to detect and time to resume after a worker is SIGKILLed, for a job whose checkpoint
# is a GPT-2-124M-shaped model (12 layers, 12 heads, 768 wide, GPT-2 vocabulary: 124M
# parameters, a 1.5 GB checkpoint with the Adam moments).
#
# Starts a coordinator (embedded store) and three workers on 127.0.0.1, runs the job on two
# of them, kills one right after the first checkpoint is published and reads the job's
# history: kill -> RECOVERING (detection), kill -> the first step after the resume (which
# includes loading the checkpoint on the new ranks). Prints one Markdown row.
#   bench/recovery.sh [corpus.txt]      (default: ../shared/data/tinyshakespeare.txt)
#   HEARTBEAT=5s THREADS=1 ROUNDS=1
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:-../shared/data/tinyshakespeare.txt}
heartbeat=${HEARTBEAT:-5s}
threads=${THREADS:-1}
F=${FERRITE:-target/release/ferrite}
[ -x "$F" ] || cargo build --release --bin ferrite >&2

source bench/cluster-lib.sh

"$F" data prepare --tokenizer gpt2 --out "$work/data" "$corpus" >&2
start coordinator coordinator --insecure --listen 127.0.0.1:0 --heartbeat-timeout "$heartbeat" \
    --store "embedded:$work/coord.redb"
url="http://$addr"
declare -A worker_pid
for n in 0 1 2; do
    start "worker-$n" worker --coordinator "$url" --threads "$threads" --listen 127.0.0.1:0
    worker_pid[$worker]=$pid
done

cat >"$work/job.toml" <<EOF
name = "recovery-124m"
[model]
n_layer = 12
n_head = 12
n_embd = 768
block_size = 64
[data]
dir = "$work/data"
[train]
batch_size = 1
max_steps = 6
learning_rate = 1e-4
warmup_steps = 1
lr_decay_steps = 6
eval_interval = 0
seed = 1
[output]
dir = "$work/out"
checkpoint_interval = 2
keep_checkpoints = 1
[cluster]
workers = 2
EOF

id=$("$F" job submit "$work/job.toml" --coordinator "$url" | grep -o 'job-[0-9]*' | head -n 1)
until "$F" checkpoints list --job "$id" --coordinator "$url" | grep -q step-; do sleep 0.05; done
victim=$("$F" job status "$id" --json --coordinator "$url" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["assigned_workers"][1])')
killed_ms=$(date +%s%3N)
kill -9 "${worker_pid[$victim]}"
wait_succeeded "$id" "$url"
"$F" job status "$id" --json --coordinator "$url" >"$work/job.json"
JOB="$work/job.json" KILLED="$killed_ms" python3 - <<'PY'
import json, os, sys
job = json.load(open(os.environ["JOB"]))
killed = int(os.environ["KILLED"])
h = job["history"]
for c in h:
    print(c["at_unix_ms"] - killed, c["to"], c["reason"], file=sys.stderr)
rec = next(c for c in h if c["to"] == "RECOVERING")
run = [c for c in h if c["to"] == "RUNNING"][-1]
detect = (rec["at_unix_ms"] - killed) / 1e3
resume = (run["at_unix_ms"] - killed) / 1e3
print("| job | detect (kill -> RECOVERING) | resume (kill -> first step) | first step after resume |")
print("|---|---|---|---|")
print(f"| GPT-2-124M shape, 2 workers | {detect:.2f} s | {resume:.2f} s | {run['reason']} |")
PY
