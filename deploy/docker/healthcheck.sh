#!/bin/bash
# Container health probe for every Ferrite role: `healthcheck [HOST:PORT]`.
# The address defaults to $FERRITE_HEALTH_ADDR, else the coordinator's 127.0.0.1:7070.
#
# gRPC roles (coordinator, serve): `ferrite health` asks the standard grpc.health.v1
# service. A worker's port is its collective ring (no gRPC): with FERRITE_HEALTH_TCP=1 the
# check is that it accepts connections.
set -euo pipefail
addr=${1:-${FERRITE_HEALTH_ADDR:-127.0.0.1:7070}}
host=${addr%:*}
port=${addr##*:}
if [ "${FERRITE_HEALTH_TCP:-0}" != 1 ]; then
  # With FERRITE_TLS_CA set (a secured cluster) a bare HOST:PORT is https://.
  exec ferrite health --addr "${addr}" --timeout 3s
fi
# bash's /dev/tcp: no extra package (curl, nc) in the image.
if timeout 3 bash -c "exec 3<>/dev/tcp/${host}/${port}" 2>/dev/null; then
  exit 0
fi
echo "unhealthy: nothing accepts connections on ${addr}" >&2
exit 1
