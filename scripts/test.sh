#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then runs every test
# of every crate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --workspace --locked 2>&1
