#!/usr/bin/env bash
# Builds Ferrite's local base images without pulling anything from a container registry:
#
#   ferrite/debian:bookworm-slim   a minimal Debian bookworm (debootstrap --variant=minbase,
#                                  docs and apt lists stripped): the runtime stage's base.
#   ferrite/etcd:bookworm          the same rootfs plus Debian's `etcd-server` package:
#                                  etcd as its own service for docker-compose.
#   ferrite/rust:bookworm          only with --with-rust: the same rootfs plus build-essential,
#                                  protobuf-compiler and this host's Rust toolchain, a stand-in
#                                  for rust:*-bookworm so deploy/Dockerfile builds offline.
#
# Each image is skipped when it already exists (--force rebuilds them). Needs root (or sudo)
# for debootstrap/chroot, a running Docker engine, and Debian's package mirror.
#
# Usage: scripts/docker-base.sh [--force] [--with-rust]
# Env:   FERRITE_BASE_IMAGE (default ferrite/debian:bookworm-slim)
#        FERRITE_ETCD_IMAGE (default ferrite/etcd:bookworm)
#        FERRITE_RUST_IMAGE (default ferrite/rust:bookworm)
#        DEBIAN_MIRROR      (default http://deb.debian.org/debian)
#        ROOTFS_DIR         (default target/docker-rootfs; a build cache, safe to delete)
set -euo pipefail
cd "$(dirname "$0")/.."

base_image=${FERRITE_BASE_IMAGE:-ferrite/debian:bookworm-slim}
etcd_image=${FERRITE_ETCD_IMAGE:-ferrite/etcd:bookworm}
rust_image=${FERRITE_RUST_IMAGE:-ferrite/rust:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs_dir=${ROOTFS_DIR:-$PWD/target/docker-rootfs}
force=0
with_rust=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --with-rust) with_rust=1 ;;
    *) echo "docker-base: unknown argument $arg (use --force, --with-rust)" >&2; exit 2 ;;
  esac
done

log() { echo "docker-base: $*" >&2; }
die() { log "error: $*"; exit 1; }

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
command -v docker >/dev/null 2>&1 || die "docker not found: install Docker Engine first"
docker info >/dev/null 2>&1 \
  || die "cannot reach the Docker engine (is dockerd running? are you in group docker?)"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# True when image $1 must be (re)built.
wanted() { [ "$force" -eq 1 ] || ! have_image "$1"; }

if ! wanted "$base_image" && ! wanted "$etcd_image" \
   && { [ "$with_rust" -eq 0 ] || ! wanted "$rust_image"; }; then
  log "the images exist already (use --force to rebuild)"
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap from apt"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq debootstrap >/dev/null
fi

# Removes what a container never needs: docs, man pages, locales, apt's caches and lists.
slim_rootfs() {
  local root=$1
  $sudo_cmd rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/*
}

# Streams a rootfs folder into `docker import` with the given --change lines.
import_rootfs() {
  local root=$1 tag=$2; shift 2
  log "importing $root as $tag"
  $sudo_cmd tar --numeric-owner --xattrs -C "$root" -c . | docker import "$@" - "$tag" >/dev/null
}

base_root=$rootfs_dir/bookworm-minbase

# Copies the base rootfs to $2 and installs Debian packages ($3...) in it with apt in a chroot.
derive_rootfs() {
  local name=$1 root=$2; shift 2
  [ -x "$base_root/usr/bin/bash" ] || die "$base_root is missing: rerun with --force"
  log "installing $* into a copy of the base rootfs ($root)"
  $sudo_cmd rm -rf "$root"
  $sudo_cmd cp -a "$base_root" "$root"
  $sudo_cmd cp /etc/resolv.conf "$root/etc/resolv.conf"
  printf 'deb %s bookworm main\n' "$mirror" | $sudo_cmd tee "$root/etc/apt/sources.list" >/dev/null
  $sudo_cmd chroot "$root" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
apt-get install -y -qq --no-install-recommends $*" >"$rootfs_dir/$name-install.log" 2>&1 \
    || { tail -n 20 "$rootfs_dir/$name-install.log" >&2; die "apt-get install $* failed"; }
  : | $sudo_cmd tee "$root/etc/resolv.conf" >/dev/null
  slim_rootfs "$root"
}

if wanted "$base_image" || [ ! -x "$base_root/usr/bin/bash" ]; then
  if [ "$force" -eq 1 ] || [ ! -x "$base_root/usr/bin/bash" ]; then
    log "debootstrap bookworm (minbase) into $base_root from $mirror (a few minutes)"
    $sudo_cmd rm -rf "$base_root"
    mkdir -p "$rootfs_dir"
    # ca-certificates: TLS to an external etcd. Nothing else: the binary needs only glibc.
    $sudo_cmd debootstrap --variant=minbase --include=ca-certificates \
      bookworm "$base_root" "$mirror" >"$rootfs_dir/debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $rootfs_dir/debootstrap.log"
    # Never start services while installing packages into a derived rootfs.
    printf '#!/bin/sh\nexit 101\n' | $sudo_cmd tee "$base_root/usr/sbin/policy-rc.d" >/dev/null
    $sudo_cmd chmod 755 "$base_root/usr/sbin/policy-rc.d"
    slim_rootfs "$base_root"
  fi
  if wanted "$base_image"; then
    import_rootfs "$base_root" "$base_image" \
      --change 'ENV LANG=C.UTF-8' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]'
  fi
fi

if wanted "$etcd_image"; then
  etcd_root=$rootfs_dir/bookworm-etcd
  derive_rootfs etcd "$etcd_root" etcd-server
  $sudo_cmd test -x "$etcd_root/usr/bin/etcd" || die "etcd binary missing after install"
  # deploy/k8s/base/etcd.yaml runs as this uid/gid (runAsUser/fsGroup): keep them in step.
  etcd_ids=$($sudo_cmd chroot "$etcd_root" sh -c 'echo "$(id -u etcd):$(id -g etcd)"')
  [ "$etcd_ids" = "100:101" ] \
    || die "etcd user is $etcd_ids, not 100:101: update deploy/k8s/base/etcd.yaml and this check"
  # The package makes the `etcd` system user and /var/lib/etcd owned by it; a named volume
  # mounted there inherits that ownership on first use.
  import_rootfs "$etcd_root" "$etcd_image" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'USER etcd' \
    --change 'WORKDIR /var/lib/etcd' \
    --change 'EXPOSE 2379 2380' \
    --change 'ENTRYPOINT ["/usr/bin/etcd"]'
  $sudo_cmd rm -rf "$etcd_root"
fi

if [ "$with_rust" -eq 1 ] && wanted "$rust_image"; then
  command -v rustc >/dev/null 2>&1 || die "--with-rust copies this host's toolchain: no rustc here"
  sysroot=$(rustc --print sysroot)
  rust_root=$rootfs_dir/bookworm-rust
  derive_rootfs rust "$rust_root" build-essential pkg-config protobuf-compiler libprotobuf-dev
  log "copying the host toolchain ($(rustc --version)) to /usr/local/rust"
  $sudo_cmd cp -a "$sysroot" "$rust_root/usr/local/rust"
  $sudo_cmd rm -rf "$rust_root/usr/local/rust/share/doc"
  rust_path=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin
  rust_path=$rust_path:/usr/bin:/sbin:/bin
  import_rootfs "$rust_root" "$rust_image" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change "ENV PATH=$rust_path" \
    --change 'CMD ["/bin/bash"]'
  $sudo_cmd rm -rf "$rust_root"
fi

docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
  | grep -E "^(${base_image}|${etcd_image}|${rust_image})" >&2 || true
log "done"
