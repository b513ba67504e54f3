#!/usr/bin/env bash
# Run a sweep SPEC against a two-node Ray cluster on this machine, everything on the loopback address: a head and a
# second node started from the command line (as on a real cluster), the sweep joining through Ray Client.
#   scripts/sweep_cluster.sh SPEC.toml OUT_DIR [extra edge-qlora sweep options]
# The sweep joins through the head's GCS address (127.0.0.1:6390); RAY_CLIENT=1 joins through Ray Client
# (ray://127.0.0.1:10001) instead. Each node gets one CPU. The nodes run with `ray start --block` in process groups
# of their own, stopped here by signal, so other Ray instances on the machine are left alone (`ray stop` would end
# them all).
set -euo pipefail
spec=$1; out=$2; shift 2
export RAY_AUTH_MODE=token               # Ray's token authentication: every Ray process and the driver
gcs=${RAY_GCS_PORT:-6390}; client=${RAY_CLIENT_PORT:-10001}
common=(--node-ip-address 127.0.0.1 --num-cpus 1 --block --disable-usage-stats)
setsid ray start --head --port "$gcs" --ray-client-server-port "$client" --include-dashboard false "${common[@]}" \
    > "$out.head.log" 2>&1 &
head=$!
stop() {
    kill -TERM -- "-$head" ${node:+"-$node"} 2>/dev/null || true
    sleep 5
    kill -KILL -- "-$head" ${node:+"-$node"} 2>/dev/null || true
}
trap stop EXIT
until grep -q "Ray runtime started" "$out.head.log"; do sleep 1; kill -0 "$head" || { cat "$out.head.log"; exit 1; }; done
setsid ray start --address "127.0.0.1:$gcs" "${common[@]}" > "$out.node.log" 2>&1 &
node=$!
until grep -q "Ray runtime started" "$out.node.log"; do sleep 1; kill -0 "$node" || { cat "$out.node.log"; exit 1; }; done
address=127.0.0.1:$gcs
[ -n "${RAY_CLIENT:-}" ] && address=ray://127.0.0.1:$client
edge-qlora sweep "$spec" --address "$address" --out "$out" "$@"
