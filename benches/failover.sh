#!/usr/bin/env bash
# Failover time: leader lost → the next leader's first acting decision on a hot node.
# Runs the three scenarios of tests/cluster.rs (`hot_node_acted_on_after_the_leader_is_lost`:
# two master processes, a real etcd and sshd on loopback, lease_ttl LEASE seconds,
# scale_up_window 2s) RUNS times each and prints every figure and the median. The leader is
# lost by SIGKILL, by cutting its connections to etcd (a partition) while its process and
# tunnels stay, or by dropping its packets to etcd without closing anything (a black hole).
# The figure is dominated by the lease and the decider's 1 s tick, not by CPU, so the test
# build (debug) is what runs.
# Usage: benches/failover.sh [RUNS=5] [LEASE=2]   (root: the tests' sshd needs it)
set -euo pipefail
runs=${1:-5}
export AUTOSCALER_FAILOVER_LEASE_SECS=${2:-2}
# The loss at a random point of the leader's renewal cycle (a third of the lease).
export AUTOSCALER_FAILOVER_JITTER=1
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo test --quiet -p autoscaler --test integration --no-run 2>/dev/null
# FAILOVER_SCENARIOS: a subset of the three, by these names.
for how in ${FAILOVER_SCENARIOS:-is_killed is_partitioned_from_etcd falls_into_a_black_hole}; do
  test=cluster::a_hot_node_is_acted_on_after_the_leader_$how
  figures=()
  for ((i = 0; i < runs; i++)); do
    out=$(cargo test --quiet -p autoscaler --test integration -- --exact "$test" --nocapture 2>&1) ||
      { echo "$out" >&2; exit 1; }
    figures+=("$(grep -o 'failover to an acting decision.*: [0-9.]*s' <<<"$out" | grep -o '[0-9.]*s$' | tr -d s)")
  done
  printf '%s\n' "${figures[@]}" | sort -n | awk -v how="${how//_/ }" -v n="$runs" -v lease="$AUTOSCALER_FAILOVER_LEASE_SECS" '
    { v[NR] = $1; all = all sprintf(" %.2f", $1) }
    END { m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
          printf "leader %s: median %.2f s over %d runs (lease %s s, window 2 s); runs:%s\n", how, m, n, lease, all }'
done
