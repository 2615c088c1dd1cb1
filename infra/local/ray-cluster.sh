#!/usr/bin/env bash
# A two-node Ray cluster on loopback: `up` starts a head and a worker node (1 CPU each, token auth), `down` stops.
set -euo pipefail
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
PORT=${RAY_PORT:-6379}
case "${1:-}" in
  up)
    [ -f ~/.ray/auth_token ] || ray get-auth-token --generate >/dev/null
    ray start --head --port="$PORT" --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
      --num-cpus="${HEAD_CPUS:-1}" --disable-usage-stats
    ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="${WORKER_CPUS:-1}" \
      --disable-usage-stats
    echo "cluster up: RAY_ADDRESS=127.0.0.1:$PORT (drivers), http://127.0.0.1:8265 (jobs, dashboard)"
    ;;
  down)
    ray stop
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
