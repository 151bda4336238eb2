#!/bin/bash
# Container health probe for every Ferrite role: `healthcheck [HOST:PORT]`.
# The address defaults to $FERRITE_HEALTH_ADDR, else the coordinator's 127.0.0.1:7070.
#
# When the binary has a gRPC health client (`ferrite health`), it asks the standard
# grpc.health.v1 service; until then a TCP connect to the role's port is the check.
set -euo pipefail
addr=${1:-${FERRITE_HEALTH_ADDR:-127.0.0.1:7070}}
host=${addr%:*}
port=${addr##*:}
if ferrite health --help >/dev/null 2>&1; then
  exec ferrite health --addr "http://${addr}" --timeout 3s
fi
# bash's /dev/tcp: no extra package (curl, nc) in the image.
if timeout 3 bash -c "exec 3<>/dev/tcp/${host}/${port}" 2>/dev/null; then
  exit 0
fi
echo "unhealthy: nothing accepts connections on ${addr}" >&2
exit 1
