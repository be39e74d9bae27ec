#!/usr/bin/env bash
# Failover figures for BENCHMARKS.md: runs the cluster tests that kill a worker under load and restart the
# coordinator (real etcd, real processes) N times and prints the figures they report:
#   failover  - from a worker's SIGKILL to every one of 16 greedy streams having a token again
#   capacity  - from starting a new worker to it serving as part of a new replica
#   restart   - from starting a coordinator again to it serving a completion
# Usage: scripts/bench_failover.sh [N=5]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-5}
for i in $(seq 1 "$n"); do
  cargo nextest run -p tessera --test cluster_etcd --no-capture -E \
    'test(a_killed_worker) | test(a_restarted_coordinator)' 2>&1 | grep '^FIGURE' | sed "s/^/run $i: /"
done
