#!/usr/bin/env bash
# The GPU check: runs, on a GPU machine with no network and no cargo, what
# scripts/gpu-prepare.sh built elsewhere, and writes every result into one file.
#
#   gpu-check.sh [RESULTS_FILE]       # default: $OUT/gpu-check.txt, else ./gpu-check.txt
#
# Run it from the bundle (target/gpu-bundle/gpu-check.sh) or from the repository (it then
# uses target/gpu-bundle/). Steps, each under its own time limit, all within ~7 minutes:
#   1. environment: GPU, driver, the CUDA libraries found (libcuda, libnvrtc, libcublas,
#      libnccl; the loader path is extended with the usual toolkit folders);
#   2. NVRTC compiles every kernel with this machine's NVRTC (nvrtc test binary);
#   3. per-op parity of the CUDA backend against the CPU backend (cuda_parity);
#   4. a full training step's loss and gradients, and a 300-step Shakespeare run, against
#      the CPU (cuda_training);
#   5. the NCCL collective on one GPU (cuda_nccl);
#   6. the GPT-2 124M training-step benchmark at T=1024 (f32, then TF32): tokens/s and MFU;
#   7. `ferrite train --device cuda:0` on Shakespeare (nanoGPT's CPU config, 2000 steps),
#      and `--device cuda:99` failing with one line.
# The tests run with FERRITE_REQUIRE_GPU=1: a test that finds no GPU fails, never skips.
set -uo pipefail

started=$(date +%s)
here="$(cd "$(dirname "$0")" && pwd)"
if [[ -x "$here/bin/ferrite" ]]; then
    bundle="$here"
else
    bundle="$here/../target/gpu-bundle"
fi
bundle="$(cd "$bundle" 2>/dev/null && pwd)" || {
    echo "gpu-check: no bundle at $bundle; run scripts/gpu-prepare.sh first" >&2
    exit 2
}
results="${1:-${OUT:-.}/gpu-check.txt}"
mkdir -p "$(dirname "$results")"
: > "$results"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
budget_s=${GPU_CHECK_BUDGET_S:-450}
passed=0
failed=0

log() { echo "$*" | tee -a "$results" >&2; }
section() { log ""; log "=== $* (t+$(($(date +%s) - started))s)"; }

# Runs "$@" with a time limit, its output into the results; counts the step.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((budget_s - ($(date +%s) - started)))
    if ((left < 20)); then
        log "SKIP $name: the time budget is spent"
        failed=$((failed + 1))
        return
    fi
    ((limit > left)) && limit=$left
    section "$name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$results" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    if ((rc == 0)); then
        log "PASS $name (${took}s)"
        passed=$((passed + 1))
    else
        ((rc == 124)) && log "TIMEOUT $name after ${limit}s"
        log "FAIL $name (exit $rc, ${took}s)"
        failed=$((failed + 1))
    fi
}

# --- 1. environment -------------------------------------------------------------------
section "environment"
log "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -n)  kernel: $(uname -r)"
log "bundle: $bundle"
[[ -f "$bundle/BUILD_INFO" ]] && cat "$bundle/BUILD_INFO" >>"$results"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv >>"$results" 2>&1
    nvidia-smi -q | grep -iE "CUDA Version|Product Name|MIG Mode" -A0 >>"$results" 2>&1
else
    log "nvidia-smi: not found"
fi

# cudarc dlopens libcuda.so.1, libnvrtc.so.13, libcublas.so.13 and libnccl.so (not .so.2):
# put the usual toolkit folders on the loader path, and link libnccl.so if only .so.2 exists.
libdirs=()
IFS=: read -ra given <<<"${LD_LIBRARY_PATH:-}"
for d in "${given[@]}" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
    /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 \
    /usr/lib64; do
    [[ -d "$d" ]] && libdirs+=("$d")
done
ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
find_lib() { # NAME_GLOB: first match in the loader cache, the folders above, python wheels
    local hit
    hit=$("$ldconfig" -p 2>/dev/null | awk -v n="$1" '$1 ~ n {print $NF; exit}')
    if [[ -z "$hit" ]]; then
        hit=$(timeout 20 find "${libdirs[@]}" /opt /usr/local/lib /usr/lib/python3* \
            /usr/local/lib/python3* -maxdepth 6 -name "$1*" 2>/dev/null | head -1)
    fi
    echo "$hit"
}
mkdir -p "$work/lib"
for lib in libcuda.so libnvrtc.so libcublas.so libcublasLt.so libnccl.so; do
    path=$(find_lib "$lib")
    log "library $lib: ${path:-NOT FOUND}"
    if [[ -n "$path" ]]; then
        libdirs+=("$(dirname "$path")")
        base=$(basename "$path")
        # libnccl.so.2 only: cudarc asks for libnccl.so.
        [[ "$lib" == libnccl.so && "$base" != libnccl.so ]] && ln -sf "$path" "$work/lib/libnccl.so"
    fi
done
ld_path="$work/lib"
for d in "${libdirs[@]}"; do ld_path="$ld_path:$d"; done
export LD_LIBRARY_PATH="$ld_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
export FERRITE_REQUIRE_GPU=1 CI=true RUST_BACKTRACE=1
[[ -f "$bundle/tinyshakespeare.txt" ]] && export FERRITE_SHAKESPEARE="$bundle/tinyshakespeare.txt"
bin="$bundle/bin"

# --- 2-5. tests ---------------------------------------------------------------------------
step "nvrtc: every kernel compiles with this machine's NVRTC" 90 \
    "$bin/nvrtc" --test-threads=1 --nocapture
step "cuda_parity: every op vs the CPU backend" 150 \
    "$bin/cuda_parity" --test-threads=1 --nocapture
step "cuda_training: training step and Shakespeare run vs CPU" 180 \
    "$bin/cuda_training" --test-threads=1 --nocapture
step "cuda_nccl: NCCL collective, one GPU" 45 "$bin/cuda_nccl" --test-threads=1 --nocapture

# --- 6. benchmark (before the slower end-to-end run, so the budget keeps it) ---------
# Peaks of an H100/H200 SXM, dense: bf16 989.4, TF32 494.7, f32 (no tensor cores) 66.9 TFLOP/s.
bench() { # LABEL BATCH [ENV=VALUE]
    local label="$1" b="$2"
    shift 2
    local before
    before=$(grep -c '"bench":"gpt2_step"' "$results")
    step "bench gpt2-124M step, T=1024, B=$b, $label" 120 env "$@" "$bin/ferrite" bench step \
        --device cuda:0 --seq 1024 --block 1024 --batch "$b" --steps 8
    (($(grep -c '"bench":"gpt2_step"' "$results") > before)) || return 0
    grep '"bench":"gpt2_step"' "$results" | tail -1 | awk -v label="$label" '{
        match($0, /"ms_per_step":[0-9.e+-]+/); ms = substr($0, RSTART + 14, RLENGTH - 14);
        match($0, /"gflops":[0-9.e+-]+/); gf = substr($0, RSTART + 9, RLENGTH - 9);
        match($0, /"batch":[0-9]+/); b = substr($0, RSTART + 8, RLENGTH - 8);
        printf "  summary: %s: %.1f ms/step, %.0f tokens/s, %.1f TFLOP/s; MFU %.2f%% of bf16 " \
            "peak (989.4), %.2f%% of TF32 (494.7), %.1f%% of f32 (66.9)\n",
            label, ms, b * 1024 / (ms / 1000), gf / 1000, gf / 9894, gf / 4947, gf / 669 }' \
        | tee -a "$results" >&2
}
bench "f32 (cuBLAS f32)" 8 FERRITE_CUDA_TF32=0
bench "TF32 matmuls" 8 FERRITE_CUDA_TF32=1

# --- 7. ferrite train on the GPU ----------------------------------------------------------
if [[ -n "${FERRITE_SHAKESPEARE:-}" ]]; then
    cat >"$work/job.toml" <<EOF
[model]
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64

[data]
dir = "$work/data"

[train]
batch_size = 12
max_steps = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = 100
lr_decay_steps = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
grad_accum = 1
eval_interval = 500
eval_steps = 20
seed = 1337
threads = 2

[output]
dir = "$work/out"
checkpoint_interval = 0
EOF
    step "ferrite data prepare (char)" 60 "$bin/ferrite" data prepare --tokenizer char \
        --val-fraction 0.1 --out "$work/data" "$FERRITE_SHAKESPEARE"
    step "ferrite train --device cuda:0 (Shakespeare, 2000 steps; CPU reference val 1.9159)" \
        150 "$bin/ferrite" train "$work/job.toml" --device cuda:0 --plain
    grep -h "val loss" "$results" | tail -3 | sed 's/^/  summary: /' | tee -a "$results" >&2
fi
# No such device: a non-zero exit and one line, no panic.
step "ferrite bench step --device cuda:99 fails with one clear line" 20 bash -c '
    out=$("$1" bench step --device cuda:99 --layers 1 --heads 1 --embd 64 --vocab 64 \
        --seq 8 --block 8 --batch 1 --steps 1 2>&1)
    rc=$?
    echo "$out"
    [ "$rc" -ne 0 ] && [ "$(printf "%s\n" "$out" | wc -l)" -le 1 ] && ! grep -q panicked <<<"$out"
' _ "$bin/ferrite"

section "done"
log "$passed passed, $failed failed"
log "results: $results"
((failed == 0))
