#!/usr/bin/env bash
# Run a sweep SPEC against a two-node Ray cluster on this machine, everything on the loopback address: a head and a
# second node started from the command line (as on a real cluster), the sweep joining through Ray Client
# (ray://127.0.0.1:6396), or with RAY_GCS=1 through the head's GCS address (127.0.0.1:6395).
#   scripts/sweep_cluster.sh SPEC.toml OUT_DIR [extra edge-qlora sweep options]
# Each node gets one CPU. At the end the two nodes are stopped by killing the processes of their Ray session, so
# other Ray instances on the machine are left alone (`ray stop` would end them all).
set -euo pipefail
spec=$1; out=$2; shift 2
export RAY_AUTH_MODE=token               # Ray's token authentication: every Ray process and the driver
gcs=${RAY_GCS_PORT:-6395}; client=${RAY_CLIENT_PORT:-6396}
common=(--node-ip-address 127.0.0.1 --num-cpus 1 --disable-usage-stats)
ray start --head --port "$gcs" --ray-client-server-port "$client" --include-dashboard false "${common[@]}" \
    > "$out.head.log" 2>&1 || { cat "$out.head.log"; exit 1; }
session=$(basename "$(readlink -f /tmp/ray/session_latest)")
stop() {
    pkill -TERM -f -- "$session|address=[0-9.]+:$gcs|address $gcs" 2>/dev/null || true
    sleep 3
    pkill -KILL -f -- "$session|address=[0-9.]+:$gcs" 2>/dev/null || true
}
trap stop EXIT
ray start --address "127.0.0.1:$gcs" "${common[@]}" > "$out.node.log" 2>&1 || { cat "$out.node.log"; exit 1; }
address=ray://127.0.0.1:$client
[ -n "${RAY_GCS:-}" ] && address=127.0.0.1:$gcs
edge-qlora sweep "$spec" --address "$address" --out "$out" "$@"
