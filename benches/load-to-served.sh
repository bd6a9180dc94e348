#!/usr/bin/env bash
# From load to a served new backend: the time from the moment a node's CPU is loaded to the
# first request HAProxy sends to the backend the master launched for it, with the default
# [scaling] settings and with a 10 s scale_up_window.
#
# As scripts/demo.sh, on this machine's loopback: HAProxy (master-worker) in front of a web
# node on 127.0.0.2:8080 (python http.server, its own sshd, `autoscaler node`), the master
# (command launcher: a script that starts a backend on 127.0.1.10:8080). Each round starts
# from a clean state (no launched host, no cooldown remembered), burns every core (bounded),
# and polls GET /who through HAProxy every 50 ms until the new backend answers it; between
# rounds the node idles for longer than the window (its agent resends buffered samples to the
# next master).
#
# Usage: benches/load-to-served.sh [ROUNDS]   (root; default 3 rounds per setting, about
#   8 minutes)   AUTOSCALER_BIN=path/to/autoscaler to measure another build.
set -euo pipefail
rounds=${1:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
. "$root/benches/common.sh"
# shellcheck source=../scripts/loopback-sshd.sh
. "$root/scripts/loopback-sshd.sh"
command -v curl >/dev/null || { apt-get install -y -qq curl >/dev/null; }

front=$(free_port) sshport=$(free_port)
"$bin" -q init --dir "$tmp/master"
"$bin" -q init --dir "$tmp/node" --role node
cp -p "$tmp/master/report.key" "$tmp/node/report.key"
m="$tmp/master/autoscaler.ini"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/master/id_ed25519"
set_key() { ini_set "$m" "$@"; } # set_key SECTION KEY VALUE
set_key ssh user "$(id -un)"
set_key ssh host_key_policy accept-new
set_key node report_socket "$tmp/node/reports/master.sock"
set_key scaling dry_run false
set_key launch launcher command
set_key launch scale_up_command "$tmp/launch.sh"
set_key launch app_port 8080
set_key launch health_timeout 30s
set_key haproxy bind "127.0.0.1:$front"
set_key haproxy reload_command "sh -c 'kill -USR2 \$(cat $tmp/haproxy.pid)'"
mkdir -p "$tmp/www-node" "$tmp/www-new"
echo node >"$tmp/www-node/who"
echo new >"$tmp/www-new/who"
cat >"$tmp/launch.sh" <<EOF
#!/bin/sh
# "Launch" a backend on 127.0.1.10:8080 (bounded lifetime) and report it as JSON.
cd "$tmp/www-new" && timeout 600 python3 -m http.server --bind 127.0.1.10 8080 >/dev/null 2>&1 &
echo \$! >"$tmp/launched.pid"
echo '{"host": "127.0.1.10", "port": 8080, "instance_id": "bench-1"}'
EOF
chmod +x "$tmp/launch.sh"
export AUTOSCALER_CONFIG="$m"

(cd "$tmp/www-node" && exec timeout 1200 python3 -m http.server --bind 127.0.0.2 8080 >/dev/null 2>&1) &
pids+=($!)
start_loopback_sshd "$tmp/sshd" 127.0.0.2 "$sshport" "$tmp/master/id_ed25519.pub"
pids+=("$SSHD_PID")
AUTOSCALER_CONFIG="$tmp/node/autoscaler.ini" "$bin" node 2>"$tmp/node.log" &
pids+=($!)
"$bin" -q add-host 127.0.0.2 8080 --ssh-port "$sshport"
"$bin" -q generate
haproxy -W -f "$tmp/master/haproxy.cfg" -p "$tmp/haproxy.pid" >"$tmp/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$front/who" >/dev/null && break; sleep 0.1; done

# round NAME: one measurement with the current settings; prints the seconds.
round() {
  local name=$1 t0 now burners=()
  "$bin" --log-format json master 2>"$tmp/master-$name.log" &
  local master=$!
  pids+=($master)
  for _ in $(seq 300); do grep -q '"msg":"NodeUp"' "$tmp/master-$name.log" && break; sleep 0.1; done
  grep -q '"msg":"NodeUp"' "$tmp/master-$name.log" || { echo "no NodeUp in $name" >&2; tail -5 "$tmp/master-$name.log" >&2; exit 1; }
  t0=$(date +%s.%N)
  for ((i = 0; i < $(nproc); i++)); do timeout 180 sh -c 'while :; do :; done' & burners+=($!); pids+=($!); done
  while :; do
    [ "$(curl -s --max-time 2 "http://127.0.0.1:$front/who" || true)" = new ] && break
    now=$(date +%s.%N)
    if (( $(echo "$now - $t0 > 170" | bc) )); then echo "the new backend never answered in $name" >&2; tail -5 "$tmp/master-$name.log" >&2; exit 1; fi
    sleep 0.05
  done
  now=$(date +%s.%N)
  kill "${burners[@]}" 2>/dev/null || true
  echo "$now - $t0" | bc
  # Back to the start: no launched host, no remembered cooldown, the backend gone.
  kill "$master"; wait "$master" 2>/dev/null || true
  "$bin" -q remove-host 127.0.1.10 8080 || true
  [ -f "$tmp/launched.pid" ] && { kill "$(cat "$tmp/launched.pid")" 2>/dev/null || true; rm -f "$tmp/launched.pid"; }
  rm -rf "$tmp/master/state"/*
  "$bin" -q generate
  kill -USR2 "$(cat "$tmp/haproxy.pid")"
  # The agent resends its buffered samples, with their age, to the next master: let the hot
  # ones age out of the window first.
  sleep "$idle"
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]}'; }

for setting in defaults 10s; do
  idle=65
  if [ "$setting" = 10s ]; then set_key scaling scale_up_window 10s; idle=15; fi
  times=()
  for r in $(seq "$rounds"); do
    t=$(round "$setting-$r")
    times+=("$t")
    echo "$setting, round $r: $(printf '%.1f' "$t") s"
  done
  echo "$setting: load start -> first request served by the new backend: median $(median "${times[@]}") s over $rounds rounds"
done
