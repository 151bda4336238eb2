#!/usr/bin/env bash
# Validates Ferrite's Kubernetes manifests offline: renders deploy/k8s/base and every overlay
# under deploy/k8s/overlays/ with `kubectl kustomize` (kustomize v5), then checks every rendered
# object against the Kubernetes OpenAPI schemas in strict mode (unknown fields are errors)
# with the `kubernetes-validate` package from PyPI, for each Kubernetes version asked for.
# Fails on the first overlay that does not render or validate, naming it.
#
# Usage: scripts/k8s-validate.sh
# Env:   K8S_VERSIONS  Kubernetes versions to validate against (default "1.30.0 1.37.0": the
#                      oldest we support, whose native gRPC probes are GA, and the newest
#                      that kubernetes-validate ships)
#        K8S_VENV      where kubernetes-validate is installed (default target/k8s-venv)
#        KUSTOMIZE     a kustomize binary to use instead of `kubectl kustomize`
set -euo pipefail
cd "$(dirname "$0")/.."

versions=${K8S_VERSIONS:-1.30.0 1.37.0}
venv=${K8S_VENV:-$PWD/target/k8s-venv}
kv_version=1.37.0
out_dir=target/k8s-rendered

log() { echo "k8s-validate: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# --- tools -----------------------------------------------------------------------------------
if [ -n "${KUSTOMIZE:-}" ]; then
  render() { "$KUSTOMIZE" build "$1"; }
elif command -v kubectl >/dev/null 2>&1; then
  kubectl kustomize --help >/dev/null 2>&1 \
    || die "this kubectl has no 'kustomize' subcommand: install kubectl >= 1.27 or set KUSTOMIZE"
  render() { kubectl kustomize "$1"; }
elif command -v kustomize >/dev/null 2>&1; then
  render() { kustomize build "$1"; }
else
  die "needs kubectl (>= 1.27, for its built-in kustomize v5) or a kustomize v5 binary on PATH
  (Debian: the kubernetes-client package, or https://kubectl.docs.kubernetes.io/installation/)"
fi

if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$kv_version"; then
  log "installing kubernetes-validate $kv_version into $venv"
  command -v python3 >/dev/null 2>&1 \
    || die "needs python3 (with venv) to install kubernetes-validate"
  python3 -m venv "$venv" \
    || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$kv_version" \
    || die "pip install kubernetes-validate==$kv_version failed"
fi

# --- render and validate ---------------------------------------------------------------------
mkdir -p "$out_dir"
targets=(deploy/k8s/base)
for o in deploy/k8s/overlays/*/; do targets+=("${o%/}"); done
[ ${#targets[@]} -gt 1 ] || die "no overlays under deploy/k8s/overlays"

for target in "${targets[@]}"; do
  name=$(basename "$target")
  rendered=$out_dir/$name.yaml
  render "$target" >"$rendered" 2>"$out_dir/$name.err" \
    || { cat "$out_dir/$name.err" >&2; die "$target does not render"; }
  count=$(grep -c '^kind:' "$rendered" || true)
  [ "$count" -gt 0 ] || die "$target renders no objects"
  for v in $versions; do
    # --quiet prints only failures; strict rejects fields the schema does not know.
    if ! "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$rendered" >&2; then
      die "$target ($rendered) does not validate against Kubernetes $v"
    fi
  done
  log "ok  $target: $count objects, valid for Kubernetes $versions"
done
log "all ${#targets[@]} kustomizations render and validate"
