#!/usr/bin/env bash
# What scaling on HAProxy's figures costs, and how fast it reacts.
#
# HAProxy (master-worker) on 127.0.0.1 in front of one backend that answers every request after
# 100 ms (a small threaded Python server, CPU idle), and `autoscaler master` in dry-run (it
# decides and logs, launches nothing), with its own HAProxy servers list:
#   1. cost: the master's CPU (every thread's schedstat) over 30 s with the HAProxy signals
#      off, then on with the server reached locally ([haproxy] servers = local), then on with
#      the same HAProxy reached over SSH (servers = ssh://USER@127.0.0.1:PORT/…, a loopback
#      sshd): the master reads `show stat app 6 -1` once a second, locally or through the SSH
#      session (3 rounds of the three, alternated; medians); the difference per second is
#      the cost of one read per tick;
#   2. reaction: target_sessions_per_node = 4, scale_up_window = 5s; six clients start
#      (six requests in progress); the time from the first request to the scale-up decision,
#      median of 5 rounds (a fresh master each round, started once its figures arrive).
# Usage: benches/haproxy-signals.sh      (root: sshd needs it; about 7 minutes)
#   AUTOSCALER_BIN=path/to/autoscaler to measure another build (default: the release build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
. "$root/benches/common.sh"
# shellcheck source=../scripts/loopback-sshd.sh
. "$root/scripts/loopback-sshd.sh"

front=$(free_port) app=$(free_port) ssh_port=$(free_port)

# The slow backend and the load generator (bounded: the clients stop after 60 s, the server
# after 10 minutes).
cat >"$tmp/slow.py" <<'PY'
import http.server, socketserver, sys, threading, time, urllib.request
def serve(port):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(0.1)
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
            self.wfile.write(b"ok")
        def log_message(self, *a): pass
    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
    s = S(("127.0.0.1", port), H)
    threading.Timer(600, s.shutdown).start()
    s.serve_forever()
def load(port, clients):
    end = time.time() + 60
    def client():
        while time.time() < end:
            try: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
            except Exception: time.sleep(0.05)
    ts = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in ts: t.start()
    for t in ts: t.join()
if sys.argv[1] == "serve": serve(int(sys.argv[2]))
else: load(int(sys.argv[2]), int(sys.argv[3]))
PY
python3 "$tmp/slow.py" serve "$app" &
pids+=($!)

"$bin" -q init --dir "$tmp/m"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/m/id_ed25519"
start_loopback_sshd "$tmp/sshd" 127.0.0.1 "$ssh_port" "$tmp/m/id_ed25519.pub"
pids+=("$SSHD_PID")
echo "[127.0.0.1]:$ssh_port $(cut -d' ' -f1,2 "$tmp/sshd/host.pub")" >"$tmp/m/known_hosts"
ini=$tmp/m/autoscaler.ini
set_key() { ini_set "$ini" "$@"; } # set_key SECTION KEY VALUE
set_key ssh user "$(id -un)"
set_key haproxy config_path "$tmp/m/haproxy.cfg"
set_key haproxy bind "127.0.0.1:$front"
set_key haproxy stats_socket "$tmp/m/admin.sock"
set_key haproxy master_socket "$tmp/m/haproxy-master.sock"
set_key haproxy server_state_file "$tmp/m/server-state"
set_key haproxy user ""
set_key haproxy group ""
set_key haproxy chroot ""
set_key haproxy reload_command "sh -c 'kill -USR2 \$(cat $tmp/m/haproxy.pid)'"
# The backend as a host whose SSH nobody answers (its tunnel retries with backoff; the
# HAProxy figures do not need it).
mkdir -p "$tmp/m/hosts.d"
AUTOSCALER_CONFIG=$ini "$bin" -q add-host 127.0.0.1 "$app" --ssh-port 1
AUTOSCALER_CONFIG=$ini "$bin" -q generate
haproxy -W -f "$tmp/m/haproxy.cfg" -p "$tmp/m/haproxy.pid" -S "$tmp/m/haproxy-master.sock" >"$tmp/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$tmp/m/admin.sock" ] && break; sleep 0.1; done

start_master() { # start_master NAME
  AUTOSCALER_CONFIG=$ini "$bin" --log-format json master 2>"$tmp/master-$1.log" &
  master=$!; pids+=($master)
}
# CPU time of every thread of process $1, in nanoseconds (schedstat: finer than the 10 ms
# ticks of /proc/PID/stat).
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%d\n", s}'; }
# Waits until status shows the sessions signal with figures (at most 20 s).
wait_figures() {
  for _ in $(seq 200); do
    AUTOSCALER_CONFIG=$ini "$bin" status --json 2>/dev/null |
      python3 -c 'import json,sys; s=json.load(sys.stdin)["signals"]; sys.exit(0 if s and s[0]["covered"] == 1 else 1)' 2>/dev/null &&
      return 0
    sleep 0.1
  done
  echo "no HAProxy figures within 20 s" >&2; tail -5 "$tmp/master-$1.log" >&2; exit 1
}
# measure NAME: the master's CPU over 30 s, in ms per second.
measure() {
  start_master "$1"
  sleep 5
  local a b
  a=$(cpu_ns "$master")
  sleep 30
  b=$(cpu_ns "$master")
  kill -9 "$master"
  wait "$master" 2>/dev/null || true
  echo "scale=3; ($b - $a) / 1000000 / 30" | bc
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "== cost: master CPU, ms per second (30 s each, idle backend; 3 rounds, alternated)"
off=() local_on=() ssh_on=()
ssh_target="ssh://$(id -un)@127.0.0.1:$ssh_port$tmp/m/haproxy.cfg"
for round in 1 2 3; do
  set_key haproxy servers local
  set_key scaling target_sessions_per_node ""
  off+=("$(measure "off$round")")
  set_key scaling target_sessions_per_node 4
  local_on+=("$(measure "local$round")")
  set_key haproxy servers "$ssh_target"
  ssh_on+=("$(measure "ssh$round")")
  echo "round $round: off ${off[-1]}, local ${local_on[-1]}, over SSH ${ssh_on[-1]}"
done
set_key haproxy servers local
m_off=$(median "${off[@]}") m_local=$(median "${local_on[@]}") m_ssh=$(median "${ssh_on[@]}")
echo "medians: signals off $m_off, on locally $m_local, on over SSH $m_ssh ms/s"
echo "per read (one a second): local $(echo "$m_local - $m_off" | bc) ms, over SSH $(echo "$m_ssh - $m_off" | bc) ms"

echo "== reaction: six requests in progress against 4 per node, scale_up_window 5s"
set_key scaling scale_up_window 5s
set_key scaling warmup 0s
times=()
for round in 1 2 3 4 5; do
  start_master "r$round"
  wait_figures "r$round"
  sleep 6 # a whole window of idle figures first
  t0=$(date +%s.%N)
  python3 "$tmp/slow.py" load "$front" 6 &
  loader=$!; pids+=($loader)
  for _ in $(seq 300); do
    grep -q '"action":"scale_up"' "$tmp/master-r$round.log" && break
    sleep 0.05
  done
  grep -q '"action":"scale_up"' "$tmp/master-r$round.log" || { echo "no decision in round $round" >&2; tail -5 "$tmp/master-r$round.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  times+=("$(echo "$t1 - $t0" | bc)")
  grep '"action":"scale_up"' "$tmp/master-r$round.log" | head -1 | python3 -c 'import json,sys; d=json.load(sys.stdin); print("  round", '"$round"', d["signal"], d["reason"])'
  kill -9 "$master" "$loader" 2>/dev/null || true
  wait "$master" "$loader" 2>/dev/null || true
  sleep 2
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "load start -> scale-up decision: median %.2f s (min %.2f, max %.2f; %d rounds)\n", a[int((NR+1)/2)], a[1], a[NR], NR}'
