#!/usr/bin/env bash
# Time from a master restart to its first decision that acts on a hot node.
#
# A real node agent (`autoscaler node`) on this machine, its CPU kept busy by a bounded burn,
# reports through a loopback sshd to a master in dry-run (decisions are logged, nothing is
# launched). Once the master has decided to scale up, it is SIGKILLed and started again; the
# script prints how long the new master took to decide again. The defaults apply:
# scale_up_window = 1m, warmup = 2m.
#
# Usage: benches/restart-to-decision.sh        (root: sshd needs it; about 2 minutes)
#   AUTOSCALER_BIN=path/to/autoscaler to measure another build (default: the release build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
. "$root/benches/common.sh"
# shellcheck source=../scripts/loopback-sshd.sh
. "$root/scripts/loopback-sshd.sh"

ssh_port=$(free_port) report_port=$(free_port)
"$bin" -q init --dir "$tmp/m"
"$bin" -q init --dir "$tmp/n" --role node
cp -p "$tmp/m/report.key" "$tmp/n/report.key"   # the report secret, as an operator copies it
ssh-keygen -q -t ed25519 -N '' -f "$tmp/m/id_ed25519"
start_loopback_sshd "$tmp/sshd" 127.0.0.1 "$ssh_port" "$tmp/m/id_ed25519.pub"
pids+=("$SSHD_PID")
echo "[127.0.0.1]:$ssh_port $(cut -d' ' -f1,2 "$tmp/sshd/host.pub")" >"$tmp/m/known_hosts"
sed -i "s/^user = .*/user = $(id -un)/; s/^reload_command = .*/reload_command = true/" "$tmp/m/autoscaler.ini"
sed -i "s/^report_port = .*/report_port = $report_port/" "$tmp/m/autoscaler.ini" "$tmp/n/autoscaler.ini"
AUTOSCALER_CONFIG="$tmp/m/autoscaler.ini" "$bin" -q add-host 127.0.0.1 8080 --ssh-port "$ssh_port"

# The hot node: the agent, and every core busy (bounded: it stops by itself).
AUTOSCALER_CONFIG="$tmp/n/autoscaler.ini" "$bin" -q node &
pids+=($!)
for ((i = 0; i < $(nproc); i++)); do timeout 400 sh -c 'while :; do :; done' & pids+=($!); done

start_master() {
  AUTOSCALER_CONFIG="$tmp/m/autoscaler.ini" "$bin" --log-format json master 2>"$tmp/master-$1.log" &
  master=$!; pids+=($master)
}
# Waits (at most $2 seconds) for a scale-up decision in master log $1; prints the seconds.
wait_decision() {
  local t0 now
  t0=$(date +%s.%N)
  while :; do
    grep -q '"action":"scale_up"' "$tmp/master-$1.log" 2>/dev/null && break
    now=$(date +%s.%N)
    if (( $(echo "$now - $t0 > $2" | bc) )); then echo "no decision within $2 s" >&2; tail -5 "$tmp/master-$1.log" >&2; exit 1; fi
    sleep 0.05
  done
  echo "$(date +%s.%N) - $t0" | bc
}

start_master first
first=$(wait_decision first 300)
echo "first master: scale-up decided $first s after it started (agent and burn started with it)"
kill -9 "$master"
start_master second
again=$(wait_decision second 300)
echo "restarted master: scale-up decided $again s after it started"
echo "(warmup 120 s: a master that counts warm-up from its first contact waits that long again)"
