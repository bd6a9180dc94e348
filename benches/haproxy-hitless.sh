#!/usr/bin/env bash
# HAProxy under host changes, runtime API vs reloads.
#
# HAProxy (master-worker, with its master CLI) on 127.0.0.1, fast backends (one small HAProxy
# process per backend, answering with its name on 127.0.1.1-10:8080), and `autoscaler master`
# (dry-run: it only keeps HAProxy in step with hosts.d). For each mode ([haproxy] runtime_api
# = true, then false):
#   1. wrk (8 keep-alive connections) through HAProxy while 50 host changes are applied with
#      add-host/remove-host: failed requests (socket errors + non-2xx), and HAProxy worker
#      processes started (each reload starts one);
#   2. the time from `autoscaler add-host` to the first request the new server answers
#      (median of 5);
#   3. scale-in under load: servers 2-6 removed one by one, each backend process killed once
#      no HAProxy worker (current or left by a reload, asked through the master CLI) holds a
#      session on it: failed requests.
# Usage: benches/haproxy-hitless.sh      (root; about 6 minutes; installs wrk if missing)
#   AUTOSCALER_BIN=path/to/autoscaler to measure another build (default: the release build).
# Exits non-zero when any request failed or a new server was never served.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
failed=0
# shellcheck source=common.sh
. "$root/benches/common.sh"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
front=$(free_port)

# The backends: one small HAProxy process per "server", answering with its name; each can be
# stopped on its own (scale-in) and started again.
declare -A backend_pid
start_backend() { # start_backend I
  local i=$1
  printf 'global\n    maxconn 4000\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\nfrontend be%d\n    bind 127.0.1.%d:8080\n    http-request return status 200 content-type text/plain string "be%d\\n"\n' \
    "$i" "$i" "$i" >"$tmp/be$i.cfg"
  haproxy -f "$tmp/be$i.cfg" >"$tmp/be$i.log" 2>&1 &
  backend_pid[$i]=$!; pids+=($!)
  for _ in $(seq 50); do curl -sf "http://127.0.1.$i:8080/" >/dev/null && return 0; sleep 0.1; done
  echo "backend $i did not start:" >&2; cat "$tmp/be$i.log" >&2; exit 1
}
for i in $(seq 1 10); do start_backend "$i"; done
# Whether server NAME of backend app is out of rotation in the current workers (absent, or in
# DRAIN or MAINT) and holds no session in any worker, current or old, of the HAProxy whose
# master CLI is at SOCKET: yes or no.
drained_everywhere() { # drained_everywhere SOCKET NAME
  python3 - "$1" "$2" <<'PY'
import socket, sys
path, name = sys.argv[1:]
def ask(cmd):
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.sendall((cmd + "\nquit\n").encode()); d = b""
    while c := s.recv(65536): d += c
    return d.decode()
drained, section = True, ""
try:
    procs = ask("show proc")
except OSError:
    # The master CLI is away while HAProxy's master re-executes itself for a reload.
    print("no")
    sys.exit(0)
for line in procs.splitlines():
    if line.startswith("# "):
        section = line[2:]
        continue
    w = line.split()
    if len(w) < 2 or w[1] != "worker":
        continue
    if section == "workers":
        for row in ask(f"@!{w[0]} show servers state app").splitlines():
            f = row.split()
            if len(f) > 6 and f[3] == name and not int(f[6]) & 0x09:
                drained = False
    for row in ask(f"@!{w[0]} show stat app 4 -1").splitlines():
        f = row.split(",")
        if len(f) > 4 and f[0] == "app" and f[1] == name and f[4].isdigit() and int(f[4]) > 0:
            drained = False
print("yes" if drained else "no")
PY
}

run_mode() {
  local mode=$1 m="$tmp/$1"
  "$bin" -q init --dir "$m"
  ssh-keygen -q -t ed25519 -N '' -f "$m/id_ed25519"
  local ini="$m/autoscaler.ini"
  set_key() { ini_set "$ini" "$@"; }
  set_key haproxy bind "127.0.0.1:$front"
  set_key haproxy debounce 100ms
  set_key haproxy check_interval 1s
  set_key haproxy runtime_api "$([ "$mode" = runtime ] && echo true || echo false)"
  set_key haproxy reload_command "sh -c 'kill -USR2 \$(cat $m/haproxy.pid)'"
  set_key scaling drain_timeout 5s
  export AUTOSCALER_CONFIG=$ini
  "$bin" -q add-host 127.0.1.1 8080
  "$bin" -q generate
  haproxy -W -f "$m/haproxy.cfg" -p "$m/haproxy.pid" -S "$m/haproxy-master.sock" >/dev/null 2>&1 &
  local lb=$!; pids+=($lb)
  "$bin" --log-format json master 2>"$m/master.log" &
  local master=$!; pids+=($master)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$front/" >/dev/null && break; sleep 0.1; done
  sleep 2 # the master's first apply

  # Worker processes of the HAProxy master, sampled every 100 ms.
  (while :; do pgrep -P "$(cat "$m/haproxy.pid")" || true; sleep 0.1; done) >"$m/workers" 2>/dev/null &
  local sampler=$!; pids+=($sampler)
  sleep 0.5
  local before; before=$(sort -u "$m/workers" | wc -l)
  wrk -t 2 -c 8 -d 70s "http://127.0.0.1:$front/" >"$m/wrk.txt" 2>&1 &
  local load=$!; pids+=($load)
  sleep 2
  # 50 changes: servers 2..10 come and go, one change every 1.2 s (hosts.d is read every second).
  for c in $(seq 1 50); do
    i=$(( (c - 1) % 9 + 2 ))
    if (( ((c - 1) / 9) % 2 == 0 )); then "$bin" -q add-host "127.0.1.$i" 8080; else "$bin" -q remove-host "127.0.1.$i" 8080; fi
    sleep 1.2
  done
  wait "$load" || true
  kill "$sampler" 2>/dev/null || true
  local workers; workers=$(sort -u "$m/workers" | wc -l)
  local requests errors non2xx
  requests=$(awk '/requests in/ {print $1}' "$m/wrk.txt")
  errors=$(awk '/Socket errors/ {gsub(",",""); s=0; for (i=1;i<=NF;i++) if ($i ~ /^[0-9]+$/) s+=$i; print s}' "$m/wrk.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$m/wrk.txt")
  echo "$mode: $requests requests under 50 changes, socket errors ${errors:-0}, non-2xx ${non2xx:-0}, HAProxy workers started $((workers - before))"
  [ -n "$requests" ] || { echo "$mode: wrk reported nothing:" >&2; cat "$m/wrk.txt" >&2; failed=1; }
  if [ "${errors:-0}" != 0 ] || [ "${non2xx:-0}" != 0 ]; then
    echo "$mode: FAILED: requests failed under host changes" >&2; failed=1
  fi

  # add-host → first request answered by the new server.
  local times=()
  for trial in 1 2 3 4 5; do
    for i in $(seq 2 10); do "$bin" -q remove-host "127.0.1.$i" 8080 2>/dev/null || true; done
    sleep 3
    local t0 t1
    t0=$(date +%s.%N)
    "$bin" -q add-host 127.0.1.7 8080
    local served=no
    for _ in $(seq 2000); do
      if curl -s "http://127.0.0.1:$front/" | grep -q be7; then served=yes; break; fi
    done
    t1=$(date +%s.%N)
    if [ "$served" = no ]; then
      echo "$mode: FAILED: 127.0.1.7 was never served after add-host (trial $trial)" >&2
      failed=1; continue
    fi
    times+=("$(echo "$t1 - $t0" | bc)")
  done
  local median; median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
  echo "$mode: add-host to the first request served by the new server: median $median s (${times[*]})"
  # The master's own part: from the registry seeing a change to HAProxy running it.
  python3 - "$m/master.log" "$mode" <<'PY'
import json, sys, statistics
from datetime import datetime
seen, lat = None, []
for line in open(sys.argv[1]):
    try: r = json.loads(line)
    except ValueError: continue
    t = datetime.fromisoformat(r["ts"].replace("Z", "+00:00").split(".")[0] + "." + r["ts"].split(".")[1][:6].rstrip("Z") + "+00:00") if "." in r["ts"] else None
    if r.get("msg") == "Hosts changed": seen = t
    elif seen and r.get("msg") in ("HAProxy servers changed through the runtime API", "HAProxy configuration installed and reloaded"):
        lat.append((t - seen).total_seconds() * 1000); seen = None
print(f"{sys.argv[2]}: hosts.d change seen -> HAProxy runs it: median {statistics.median(lat):.0f} ms over {len(lat)} changes (debounce 100 ms included)")
PY
  # Scale-in under load: servers 2-6 leave one by one; each backend is stopped once no
  # worker holds a session on it, and started again afterwards.
  for i in $(seq 2 6); do "$bin" -q add-host "127.0.1.$i" 8080 2>/dev/null || true; done
  sleep 3
  wrk -t 2 -c 8 -d 30s "http://127.0.0.1:$front/" >"$m/wrk-in.txt" 2>&1 &
  load=$!; pids+=($load)
  sleep 2
  local stopped=0
  for i in $(seq 2 6); do
    "$bin" -q remove-host "127.0.1.$i" 8080
    local name="127.0.1.${i}_8080" gone=no
    sleep 0.5
    for _ in $(seq 300); do
      if [ "$(drained_everywhere "$m/haproxy-master.sock" "$name")" = yes ]; then gone=yes; break; fi
      sleep 0.1
    done
    [ "$gone" = yes ] || { echo "$mode: FAILED: $name kept sessions for 30 s" >&2; failed=1; }
    kill -9 "${backend_pid[$i]}" 2>/dev/null || true
    stopped=$((stopped + 1))
    sleep 1
  done
  wait "$load" || true
  requests=$(awk '/requests in/ {print $1}' "$m/wrk-in.txt")
  errors=$(awk '/Socket errors/ {gsub(",",""); s=0; for (i=1;i<=NF;i++) if ($i ~ /^[0-9]+$/) s+=$i; print s}' "$m/wrk-in.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$m/wrk-in.txt")
  echo "$mode: scale-in: $requests requests while $stopped servers were removed and their backends stopped after their drain, socket errors ${errors:-0}, non-2xx ${non2xx:-0}"
  if [ -z "$requests" ] || [ "${errors:-0}" != 0 ] || [ "${non2xx:-0}" != 0 ]; then
    echo "$mode: FAILED: requests failed during scale-in" >&2; cat "$m/wrk-in.txt" >&2; failed=1
  fi
  for i in $(seq 2 6); do start_backend "$i"; done
  kill -9 "$master" "$lb" 2>/dev/null || true
  pkill -9 -P "$lb" 2>/dev/null || true
  sleep 1
}

run_mode runtime
run_mode reload
exit "$failed"
