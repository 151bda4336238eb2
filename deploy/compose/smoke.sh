#!/usr/bin/env bash
# End-to-end smoke test of the docker-compose cluster:
#   build   the images (deploy/build-image.sh: local base images, ferrite:local)
#   cluster etcd + coordinator-1 up and healthy, coordinator printed READY
#   data    `ferrite data prepare` of a small corpus onto the shared volume
#   workers worker-1 and worker-2 up and healthy
#   job     `ferrite job submit --wait` of a short 2-worker job; it must succeed
#   serve   the inference server on that job's checkpoint answers /v1/completions
#   recover a second, longer job; worker-2's container is SIGKILLed after its first published
#           checkpoint; the job must go through RECOVERING and still succeed
#   failover coordinator-2 stands by; the leader (coordinator-1) is SIGKILLed; coordinator-2
#           must take over and a third job, submitted through it, must succeed on the
#           workers, which follow the new leader
# and always, even on failure (trap): logs of failed services, `docker compose down -v`.
#
# Usage: deploy/compose/smoke.sh [--until STEP] [--no-build] [--keep]
#   --until STEP  stop (and clean up) after STEP, e.g. `--until data` while the worker role
#                 is not written yet
#   --no-build    use the existing images
#   --keep        leave the cluster up afterwards (for debugging; `down -v` it yourself)
# Env: FERRITE_SMOKE_CORPUS  a text file or folder to train on (default: Debian's fortunes,
#                            else ../shared/data/tinyshakespeare.txt, else
#                            /usr/share/common-licenses, present on every Debian)
#      FERRITE_SMOKE_PROJECT compose project name (default ferrite-smoke)
#      FERRITE_SMOKE_TIMEOUT seconds for each job to finish (default 600)
set -euo pipefail
cd "$(dirname "$0")/../.."

steps=(build cluster data workers job serve recover failover)
until_step=failover
build=1
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --until) until_step=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case " ${steps[*]} " in
  *" $until_step "*) ;;
  *) echo "smoke: --until takes one of: ${steps[*]}" >&2; exit 2 ;;
esac

project=${FERRITE_SMOKE_PROJECT:-ferrite-smoke}
job_timeout=${FERRITE_SMOKE_TIMEOUT:-600}
# Host ports away from the defaults, so a coordinator someone runs by hand does not clash.
export FERRITE_COORDINATOR_PORT=${FERRITE_COORDINATOR_PORT:-17070}
export FERRITE_COORDINATOR2_PORT=${FERRITE_COORDINATOR2_PORT:-17071}
export FERRITE_SERVE_PORT=${FERRITE_SERVE_PORT:-17080}
export FERRITE_HTTP_PORT=${FERRITE_HTTP_PORT:-18000}
export FERRITE_SERVE_JOB=${FERRITE_SERVE_JOB:-}

log() { echo "smoke [$(date +%H:%M:%S)] $*" >&2; }
step=setup
failure=""
die() { failure="$*"; log "FAILED at step '$step': $*"; exit 1; }

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  die "neither 'docker compose' nor 'docker-compose' found (Debian: apt-get install docker-compose)"
fi
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine"
command -v curl >/dev/null 2>&1 || die "curl not found (apt-get install curl)"
command -v python3 >/dev/null 2>&1 || die "python3 not found (it reads the CLI's JSON)"

# Every profile, so `down` and `logs` see every service.
dc() {
  "${compose[@]}" -p "$project" -f deploy/compose/docker-compose.yml \
    --profile serve --profile tools "$@"
}
cid() { dc ps -q "$1" 2>/dev/null | head -n 1; }
# The CLI inside the coordinator's container (it has the binary, the cluster network and the
# certs volume), as an admin over TLS.
cli_env=(-e FERRITE_COORDINATOR=https://localhost:7070 -e FERRITE_TOKEN_FILE=/certs/admin.token)
ferrite_cli() { docker exec -i "${cli_env[@]}" "$(cid coordinator-1)" ferrite "$@"; }

corpus_dir=""
ok=0
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local rc=$?
  if [ "$ok" -ne 1 ] && [ "$step" != setup ] && [ "$step" != build ]; then
    log "last logs of each service:"
    dc logs --no-color --tail 40 >&2 2>&1 || true
  fi
  if [ "$keep" -eq 1 ]; then
    log "--keep: cluster left up; remove it with: ${compose[*]} -p $project" \
      "-f deploy/compose/docker-compose.yml --profile serve --profile tools down -v"
  else
    log "docker compose down -v"
    dc down -v --remove-orphans >/dev/null 2>&1 || log "warning: compose down failed"
  fi
  [ -n "$corpus_dir" ] && rm -rf "$corpus_dir"
  if [ "$ok" -ne 1 ]; then
    log "FAILED at step '$step' (exit $rc)${failure:+: $failure}"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# True when STEP is the last one asked for; the caller then ends the run.
last_step() { [ "$until_step" = "$1" ]; }
finish() { ok=1; log "PASSED (steps up to '$until_step')"; exit 0; }

# Waits until a service's container reports healthy; fails early if it keeps restarting.
wait_healthy() {
  local svc=$1 timeout=${2:-120} deadline id status restarts
  deadline=$((SECONDS + timeout))
  while :; do
    id=$(cid "$svc")
    if [ -n "$id" ]; then
      status=$(docker inspect -f \
        '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
      restarts=$(docker inspect -f '{{.RestartCount}}' "$id")
      [ "$status" = healthy ] && { log "$svc is healthy"; return 0; }
      [ "$restarts" -ge 3 ] && die "$svc restarted $restarts times: $(docker logs --tail 20 "$id" \
        2>&1 | grep -v '^\s*$' | head -n 2 | tr '\n' ' ')"
    fi
    [ "$SECONDS" -ge "$deadline" ] \
      && die "$svc not healthy after ${timeout}s (status ${status:-none})"
    sleep 2
  done
}

# Prints a job's state (QUEUED, RUNNING, RECOVERING, SUCCEEDED, ...).
job_state() {
  ferrite_cli job status "$1" --json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])'
}

# Waits until the job reaches one of the given states; fails on FAILED/CANCELLED.
wait_state() {
  local id=$1 timeout=$2 deadline state; shift 2
  deadline=$((SECONDS + timeout))
  while :; do
    state=$(job_state "$id")
    for want in "$@"; do [ "$state" = "$want" ] && return 0; done
    case "$state" in
      FAILED|CANCELLED) ferrite_cli job status "$id" >&2 || true; die "job $id is $state" ;;
    esac
    [ "$SECONDS" -ge "$deadline" ] && die "job $id still $state after ${timeout}s (wanted $*)"
    sleep 2
  done
}

# --- build ---------------------------------------------------------------------------------
step=build
if [ "$build" -eq 1 ]; then
  log "building images"
  bash deploy/build-image.sh --prebuilt
fi
for img in "${FERRITE_IMAGE:-ferrite:local}" "${FERRITE_ETCD_IMAGE:-ferrite/etcd:bookworm}"; do
  docker image inspect "$img" >/dev/null 2>&1 || die "image $img missing (run without --no-build)"
done
last_step build && finish

# --- cluster -------------------------------------------------------------------------------
step=cluster
log "starting a fresh cluster (project $project)"
dc down -v --remove-orphans >/dev/null 2>&1 || true
dc up -d etcd coordinator-1
wait_healthy etcd 60
wait_healthy coordinator-1 60
ready=$(docker logs "$(cid coordinator-1)" 2>/dev/null | grep -m1 '^READY addr=' || true)
[ -n "$ready" ] || die "coordinator-1 printed no READY line"
log "coordinator-1: $ready (store etcd:http://etcd:2379)"
ferrite_cli job list >/dev/null || die "the CLI cannot list jobs on coordinator-1"
last_step cluster && finish

# --- data ----------------------------------------------------------------------------------
step=data
# Stage at most ~1 MB of text in a folder the container's user (uid 10001) can read.
corpus_dir=$(mktemp -d "${TMPDIR:-/tmp}/ferrite-smoke-corpus.XXXXXX")
chmod 755 "$corpus_dir"
src=${FERRITE_SMOKE_CORPUS:-}
if [ -z "$src" ]; then
  for candidate in /usr/share/games/fortunes ../shared/data/tinyshakespeare.txt \
                   /usr/share/common-licenses; do
    [ -e "$candidate" ] && { src=$candidate; break; }
  done
fi
[ -n "$src" ] && [ -e "$src" ] || die "no corpus found; set FERRITE_SMOKE_CORPUS"
if [ -d "$src" ]; then
  # Plain text files only (fortunes' .dat indexes are binary). `head` closing the pipe
  # early is the point, not a failure: no pipefail here.
  (set +o pipefail
   find -L "$src" -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' -print0 | sort -z \
     | xargs -0 cat 2>/dev/null | head -c 1000000) >"$corpus_dir/corpus.txt"
else
  head -c 1000000 "$src" >"$corpus_dir/corpus.txt"
fi
chmod 644 "$corpus_dir/corpus.txt"
log "preparing $(wc -c <"$corpus_dir/corpus.txt") bytes from $src on the shared volume"
dc run --rm --no-deps -T -v "$corpus_dir:/corpus:ro" cli \
  data prepare --tokenizer char --val-fraction 0.1 --out /data/datasets/smoke_char \
  /corpus/corpus.txt >&2
last_step data && finish

# --- workers -------------------------------------------------------------------------------
step=workers
dc up -d worker-1 worker-2
wait_healthy worker-1 90
wait_healthy worker-2 90
last_step workers && finish

# --- job -----------------------------------------------------------------------------------
step=job
log "submitting jobs/smoke-short.toml (--wait)"
out=$(timeout "$job_timeout" docker exec -i "${cli_env[@]}" "$(cid coordinator-1)" \
  ferrite job submit /dev/stdin --wait <deploy/compose/jobs/smoke-short.toml) \
  || die "job smoke-short did not succeed within ${job_timeout}s (id: ${out:-none})"
job1=$(head -n 1 <<<"$out")
log "job $job1 succeeded; its checkpoints:"
ferrite_cli checkpoints list --job "$job1" >&2
last_step job && finish

# --- serve ---------------------------------------------------------------------------------
step=serve
FERRITE_SERVE_JOB=$job1 dc up -d inference
wait_healthy inference 90
log "asking the inference server for a completion (HTTPS, a read token)"
docker exec "$(cid coordinator-1)" cat /certs/ca.pem >"$corpus_dir/ca.pem"
read_token=$(docker exec "$(cid coordinator-1)" cat /certs/read.token)
code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$corpus_dir/ca.pem" \
  "https://localhost:${FERRITE_HTTP_PORT}/metrics") || die "GET /metrics over TLS failed"
[ "$code" = 401 ] || die "/metrics without a token answered $code, not 401"
reply=$(curl -fsS --max-time 60 --cacert "$corpus_dir/ca.pem" \
  "https://localhost:${FERRITE_HTTP_PORT}/v1/completions" \
  -H "Authorization: Bearer $read_token" \
  -H 'Content-Type: application/json' \
  -d '{"model": "'"$job1"'", "prompt": "The ", "max_tokens": 32, "temperature": 0, "seed": 1}') \
  || die "POST /v1/completions failed"
text=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])' \
  <<<"$reply") || die "unexpected /v1/completions reply: $reply"
[ -n "$text" ] || die "empty completion: $reply"
log "completion: $(tr '\n' ' ' <<<"$text")"
last_step serve && finish

# --- recover -------------------------------------------------------------------------------
step=recover
log "submitting jobs/smoke-recover.toml"
job2=$(ferrite_cli job submit /dev/stdin <deploy/compose/jobs/smoke-recover.toml)
wait_state "$job2" 120 RUNNING
log "job $job2 running; waiting for its first published checkpoint"
deadline=$((SECONDS + job_timeout))
until ferrite_cli checkpoints list --job "$job2" | awk 'NR > 1 { found = 1 } END { exit !found }'
do
  [ "$(job_state "$job2")" = SUCCEEDED ] \
    && die "job $job2 finished before a worker could be killed; raise its max_steps"
  [ "$SECONDS" -ge "$deadline" ] && die "job $job2 published no checkpoint in ${job_timeout}s"
  sleep 2
done
log "killing worker-2 mid-job (SIGKILL)"
docker kill "$(cid worker-2)" >/dev/null
wait_state "$job2" "$job_timeout" SUCCEEDED
history=$(ferrite_cli job status "$job2")
grep -q RECOVERING <<<"$history" || die "job $job2 succeeded without recovering: $history"
log "job $job2 recovered from the lost worker and succeeded"
dc start worker-2 >/dev/null
wait_healthy worker-2 90
last_step recover && finish

# --- failover ------------------------------------------------------------------------------
step=failover
dc up -d coordinator-2
wait_healthy coordinator-2 90
leads() { docker exec "$(cid "$1")" ferrite health --addr localhost:7070 --service ferrite.v1.JobService >/dev/null 2>&1; }
leads coordinator-1 || die "coordinator-1 does not lead (coordinator-2 started later)"
leads coordinator-2 && die "coordinator-2 leads too"
log "killing the leader, coordinator-1 (SIGKILL)"
docker kill "$(cid coordinator-1)" >/dev/null
deadline=$((SECONDS + 60))
until leads coordinator-2; do
  [ "$SECONDS" -ge "$deadline" ] && die "coordinator-2 did not take over within 60s"
  sleep 1
done
log "coordinator-2 leads; submitting smoke-short's job as smoke-failover through it (--wait)"
both=https://coordinator-1:7070,https://coordinator-2:7070
out=$(sed 's#/data/jobs/smoke-short#/data/jobs/smoke-failover#; s/^name = .*/name = "smoke-failover"/' \
    deploy/compose/jobs/smoke-short.toml \
  | timeout "$job_timeout" docker exec -i -e "FERRITE_COORDINATOR=$both" \
    -e FERRITE_TOKEN_FILE=/certs/admin.token "$(cid coordinator-2)" \
    ferrite job submit /dev/stdin --wait) \
  || die "a job after the failover did not succeed within ${job_timeout}s (id: ${out:-none})"
log "job $(head -n 1 <<<"$out") succeeded under coordinator-2"
finish
