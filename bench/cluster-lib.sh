# Helpers for the benchmarks that start a Ferrite cluster on 127.0.0.1 (sourced).
# Needs $F (the ferrite binary). Sets $work (a temp dir, removed with every process at exit).

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Starts `ferrite "$@"` in the background; sets $addr (and $worker) from its READY line
# and $pid.
start() {
    local name=$1
    shift
    "$F" "$@" >"$work/$name.out" 2>"$work/$name.log" &
    pid=$!
    pids+=("$pid")
    until grep -q '^READY' "$work/$name.out" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { cat "$work/$name.log" >&2; exit 1; }
        sleep 0.05
    done
    local line
    line=$(grep '^READY' "$work/$name.out")
    addr=$(sed -E 's/^READY addr=([^ ]+).*/\1/' <<<"$line")
    worker=$(sed -nE 's/.* worker=([^ ]+).*/\1/p' <<<"$line")
}

# Waits until job $1 on coordinator $2 has ended; fails unless it SUCCEEDED. Polls once a
# second with one short `ferrite job status` and a grep: the waiting must not take CPU from
# the workers being timed (a poll every 0.2 s through python3's pyenv shim took a good part
# of a core and slowed the two-worker steps by a third).
wait_succeeded() {
    local state
    while :; do
        state=$("$F" job status "$1" --json --coordinator "$2" |
            grep -o '"state": *"[A-Z]*"' | grep -o '[A-Z]*')
        case $state in
            SUCCEEDED) return 0 ;;
            FAILED | CANCELLED) echo "job $1 is $state" >&2; exit 1 ;;
        esac
        sleep 1
    done
}
