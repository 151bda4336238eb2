#!/usr/bin/env bash
# Builds Ferrite's images: the local base images first (scripts/docker-base.sh, cached), then
# the `ferrite` image one of two ways:
#
#   --prebuilt (default)  cargo build --release on this host, then deploy/Dockerfile.prebuilt
#                         on a staged context; needs no registry at all.
#   --source              deploy/Dockerfile (multi-stage: a Rust builder image, then the runtime);
#                         needs RUST_IMAGE (default rust:1.95-bookworm) to exist or be pullable.
#
# Usage: deploy/build-image.sh [--prebuilt|--source]
# Env:   FERRITE_IMAGE (default ferrite:local), FERRITE_BASE_IMAGE, FERRITE_ETCD_IMAGE,
#        RUST_IMAGE, CARGO_FEATURES, CARGO (default cargo)
#        FERRITE_BINARY  --prebuilt: package this already-built binary instead of running cargo
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:---prebuilt}
image=${FERRITE_IMAGE:-ferrite:local}
base_image=${FERRITE_BASE_IMAGE:-ferrite/debian:bookworm-slim}
log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

FERRITE_BASE_IMAGE=$base_image bash scripts/docker-base.sh

case "$mode" in
  --prebuilt)
    binary=${FERRITE_BINARY:-}
    if [ -z "$binary" ]; then
      command -v "${CARGO:-cargo}" >/dev/null 2>&1 \
        || die "cargo not found (see scripts/install-deps.sh)"
      command -v protoc >/dev/null 2>&1 || die "protoc not found: run scripts/install-deps.sh"
      log "cargo build --release --bin ferrite"
      features=()
      [ -n "${CARGO_FEATURES:-}" ] && features=(--features "$CARGO_FEATURES")
      nice -n 10 "${CARGO:-cargo}" build --release --locked --bin ferrite \
        ${features[@]+"${features[@]}"} >&2
      binary=target/release/ferrite
    fi
    [ -x "$binary" ] || die "$binary is not an executable"
    ctx=target/docker-context
    rm -rf "$ctx"
    mkdir -p "$ctx"
    install -m 0755 "$binary" "$ctx/ferrite"
    # The release profile keeps line tables (debug = 1); the image does not need them.
    if command -v objcopy >/dev/null 2>&1; then objcopy --strip-debug "$ctx/ferrite"; fi
    install -m 0755 deploy/docker/healthcheck.sh "$ctx/healthcheck.sh"
    log "docker build -f deploy/Dockerfile.prebuilt -t $image ($ctx)"
    docker build -q -f deploy/Dockerfile.prebuilt --build-arg "RUNTIME_IMAGE=$base_image" \
      -t "$image" "$ctx" >/dev/null
    ;;
  --source)
    rust_image=${RUST_IMAGE:-rust:1.95-bookworm}
    log "docker build -f deploy/Dockerfile -t $image . (builder $rust_image)"
    docker build -f deploy/Dockerfile --build-arg "RUST_IMAGE=$rust_image" \
      --build-arg "RUNTIME_IMAGE=$base_image" --build-arg "CARGO_FEATURES=${CARGO_FEATURES:-}" \
      -t "$image" .
    ;;
  *) die "unknown mode $mode (use --prebuilt or --source)" ;;
esac

# The image must at least start and print its version as the non-root user.
version=$(docker run --rm "$image" --version) || die "$image does not run"
user=$(docker image inspect -f '{{.Config.User}}' "$image")
[ "$user" = "10001:10001" ] || die "$image runs as '$user', expected 10001:10001"
log "built $image: $version (user $user)"
