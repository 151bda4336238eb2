#!/usr/bin/env bash
# One command on a fresh Debian machine: install what the build needs, build ferrite,
# prepare a corpus (Debian's fortunes), train a small GPT and sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ ! -d /usr/share/games/fortunes ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -qq fortunes >/dev/null
fi
cargo build --release --bin ferrite
bin=target/release/ferrite
# The fortune files proper (the .dat index files are binary).
inputs=$(find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' | sort)
$bin data prepare --tokenizer char --val-fraction 0.1 --out data-out/fortunes_char $inputs
$bin train examples/fortunes_char.toml
latest=$(ls -d out/fortunes_char/checkpoints/step-* | tail -n 1)
echo "--- a sample from $latest:"
$bin generate --checkpoint "$latest" --prompt "The " --max-tokens 300 --temperature 0.8 --seed 1
