#!/usr/bin/env bash
# Prints the `ferrite-certs` Secret every Ferrite pod mounts at /certs: a CA, a server
# certificate for the in-cluster Service names, the token verification key, and a worker
# join token and a read token (the inference server's). Made with `ferrite certs init` and
# `ferrite token create` in a temporary folder; the CA key and token signing key are kept
# in DIR (default ./ferrite-certs) for making operator tokens later, and never enter the
# cluster.
#   deploy/k8s/make-certs.sh [DIR] | kubectl apply -f -
#   ferrite token create --key DIR/token.key --subject alice --role submit
# Env: FERRITE (the binary, default `ferrite` on PATH), NAMESPACE (default ferrite).
set -euo pipefail
dir=${1:-./ferrite-certs}
ns=${NAMESPACE:-ferrite}
ferrite=${FERRITE:-ferrite}
hosts=()
for svc in ferrite-coordinator ferrite-inference; do
  hosts+=(--host "$svc" --host "$svc.$ns" --host "$svc.$ns.svc" --host "$svc.$ns.svc.cluster.local")
done
"$ferrite" certs init "$dir" "${hosts[@]}" >&2
for role in worker read; do
  "$ferrite" token create --key "$dir/token.key" --subject "k8s-$role" --role "$role" \
    --ttl 365d >"$dir/$role.token"
  chmod 0600 "$dir/$role.token"
done
# Only what the pods need: no CA key, no token signing key.
kubectl create secret generic ferrite-certs --namespace "$ns" --dry-run=client -o yaml \
  --from-file="$dir/ca.pem" --from-file="$dir/server.pem" --from-file="$dir/server.key" \
  --from-file="$dir/token.pub" --from-file="$dir/worker.token" --from-file="$dir/read.token"
