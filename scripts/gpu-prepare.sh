#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything scripts/gpu-check.sh runs on a GPU machine
# (which has no network and no cargo): the CUDA test binaries, the `ferrite` binary with the
# `cuda` feature, the check script and the Shakespeare text, stripped of debug info, in one
# folder (default target/gpu-bundle/, under 64 MiB).
#
#   scripts/gpu-prepare.sh [BUNDLE_DIR]
#   # copy BUNDLE_DIR to the GPU machine, then there:
#   BUNDLE_DIR/gpu-check.sh [RESULTS_FILE]      # default: $OUT/gpu-check.txt
#
# Builds go to target/cuda (CARGO_TARGET_DIR overrides it), apart from the main build.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
bundle="${1:-target/gpu-bundle}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}"
limit_mib=64

rm -rf "$bundle"
mkdir -p "$bundle/bin"

# `cargo test --no-run` prints the test executables it built as JSON lines.
test_bins() {
    cargo test "$@" --no-run --message-format=json \
        | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
'
}

echo "gpu-prepare: building the CUDA test binaries" >&2
{
    test_bins -p ferrite-kernels --features cuda --test cuda_parity --test nvrtc
    test_bins -p ferrite-model --features cuda --test cuda_training
    test_bins -p ferrite-worker --features cuda --test cuda_nccl
} > "$bundle/.tests"
while read -r name exe; do
    cp "$exe" "$bundle/bin/$name"
done < "$bundle/.tests"
rm "$bundle/.tests"

echo "gpu-prepare: building ferrite (release, --features cuda)" >&2
cargo build --release -p ferrite-cli --features cuda
cp "$CARGO_TARGET_DIR/release/ferrite" "$bundle/bin/ferrite"

# Debug info is most of each binary; panics still name file and line without it.
for f in "$bundle"/bin/*; do
    strip --strip-debug "$f"
done

cp scripts/gpu-check.sh "$bundle/gpu-check.sh"
chmod +x "$bundle/gpu-check.sh"
shakespeare="$root/../shared/data/tinyshakespeare.txt"
if [[ -f "$shakespeare" ]]; then
    cp "$shakespeare" "$bundle/tinyshakespeare.txt"
else
    echo "gpu-prepare: $shakespeare not found; the Shakespeare checks will skip" >&2
fi
{
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
    echo "rustc: $(rustc --version)"
    echo "sources (sha256 of the CUDA backend and kernels):"
    cat kernels/src/cuda/*.rs kernels/src/cuda/kernels/* | sha256sum | sed 's/^/  /'
} > "$bundle/BUILD_INFO"

size_kib=$(du -sk "$bundle" | cut -f1)
ls -l "$bundle" "$bundle/bin" >&2
echo "gpu-prepare: $bundle is $((size_kib / 1024)) MiB" >&2
if (( size_kib > limit_mib * 1024 )); then
    echo "gpu-prepare: over the ${limit_mib} MiB limit" >&2
    exit 1
fi
