#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine:
# protoc (etcd-client and our .proto files), etcd (store conformance tests), python3-venv
# (NVRTC from PyPI for the CUDA compile check), a font for plots and Chromium for the dashboard
# test.
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto); a slim image lacks them.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
# python3 with venv: scripts/nvrtc.sh installs NVRTC from PyPI to compile-check the CUDA kernels.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# A TrueType font: `ferrite job plot` draws its text with it (read at run time, no fontconfig).
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# Headless Chromium: the dashboard test (cli/tests/observability.rs) loads and screenshots /ui.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# curl: the security test fetches /metrics over HTTPS with and without a token.
command -v curl >/dev/null 2>&1 || need+=(curl)
# Compose for the smoke test (deploy/compose/smoke.sh), where a Docker engine runs.
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install the Rust toolchain (rustup) first" >&2
  exit 1
fi
