#!/usr/bin/env bash
# Master CPU per report of two builds, measured alternately in one invocation (the machine's
# noise lands on both): benches/master-fanin.sh against BASE, then NEW, ROUNDS times; prints
# each run, the medians and NEW/BASE.
# Usage: benches/fanin-compare.sh BASE_BIN NEW_BIN [ROUNDS=3] [N=200] [RATE=5] [DURATION=20]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
base_bin=$1 new_bin=$2 rounds=${3:-3} n=${4:-200} rate=${5:-5} dur=${6:-20}
declare -a base_runs new_runs
per_report() { # BIN: one run's µs per report (fails when the run gives no figure)
  local out
  out=$(AUTOSCALER_BIN=$1 bash "$root/benches/master-fanin.sh" "$n" "$rate" "$dur" 2>&1) || { echo "$out" >&2; return 1; }
  echo "$out" | sed -n 's/^master CPU: .* = \([0-9.]*\) us per report.*/\1/p' | grep . || { echo "$out" >&2; return 1; }
}
for ((r = 1; r <= rounds; r++)); do
  b=$(per_report "$base_bin"); base_runs+=("$b")
  x=$(per_report "$new_bin"); new_runs+=("$x")
  echo "round $r: base $b us, new $x us per report"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mb=$(median "${base_runs[@]}") mn=$(median "${new_runs[@]}")
echo "median over $rounds rounds ($n tunnels x $rate Hz, ${dur}s): base $mb us, new $mn us per report; new/base $(echo "scale=3; $mn / $mb" | bc)"
