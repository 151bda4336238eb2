#!/usr/bin/env bash
# One command on a fresh Debian machine: install what the build needs and Debian's
# fortunes (the corpus), build ferrite, and run `ferrite quickstart`: the cluster on this
# machine trains a small GPT on two workers, serves it and samples from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ ! -d /usr/share/games/fortunes ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -qq fortunes >/dev/null
fi
cargo build --release --bin ferrite
# A coordinator, two CPU workers, a job with a progress bar, a server and a generation, all
# as local processes under ./ferrite-quickstart (Ctrl-C stops them all).
exec target/release/ferrite quickstart "$@"
