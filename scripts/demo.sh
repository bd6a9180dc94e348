#!/usr/bin/env bash
# The main job, runnable on a fresh Debian machine as root: installs what it needs, builds
# autoscaler, and runs the whole system on this machine's loopback, in a temp dir:
#
#   HAProxy (master-worker)  127.0.0.1:FRONT  →  backends
#   web node                 127.0.0.2:8080 (python http.server) + sshd + `autoscaler node`
#   master                   `autoscaler master`: SSH tunnel to the node, decides, launches
#   launcher                 a scale-up command that starts a backend on 127.0.1.10:8080
#
# Then it loads the CPU for a bounded time; the master sees the node's CPU through the tunnel,
# scales up, registers the new backend and reloads HAProxy with it. Everything stops at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
command -v curl >/dev/null || { apt-get install -y -qq curl >/dev/null; }
cargo build --quiet
bin="$PWD/target/debug/autoscaler"
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  [ -f "$tmp/launched.pid" ] && kill "$(cat "$tmp/launched.pid")" 2>/dev/null || true
  sleep 0.5
  rm -rf "$tmp"
}
trap cleanup EXIT
# shellcheck source=loopback-sshd.sh
. scripts/loopback-sshd.sh
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local n=$1 what=$2; shift 2
  for ((i = 0; i < n * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: $what did not happen within ${n}s" >&2; exit 1
}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
set_key() { # set_key FILE SECTION KEY VALUE
  python3 - "$@" <<'PY'
import re, sys
f, sec, key, val = sys.argv[1:]
out, cur = [], None
for line in open(f).read().splitlines():
    m = re.match(r"\[(.+)\]$", line)
    if m: cur = m.group(1)
    if cur == sec and line.split(" = ")[0] == key: line = f"{key} = {val}"
    out.append(line)
open(f, "w").write("\n".join(out) + "\n")
PY
}

say "Configuration in $tmp"
front=$(free_port) sshport=$(free_port) metrics=$(free_port)
"$bin" -q init --dir "$tmp/master"
"$bin" -q init --dir "$tmp/node" --role node
cp -p "$tmp/master/report.key" "$tmp/node/report.key"   # the report secret, as an operator copies it
m="$tmp/master/autoscaler.ini"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/master/id_ed25519"
set_key "$m" ssh user "$(id -un)"
set_key "$m" ssh host_key_policy accept-new
# The master's forward appears as a Unix socket in the agent's private directory on the node
# (the node's report_socket is $tmp/node/reports/master.sock: the agent reports to every
# socket in $tmp/node/reports).
set_key "$m" node report_socket "$tmp/node/reports/master.sock"
set_key "$m" scaling dry_run false
set_key "$m" scaling scale_up_threshold 60
set_key "$m" scaling scale_down_threshold 5
set_key "$m" scaling scale_up_window 5s
set_key "$m" scaling warmup 3s
set_key "$m" scaling max_nodes 2
set_key "$m" launch launcher command
set_key "$m" launch scale_up_command "$tmp/launch.sh"
set_key "$m" launch app_port 8080
set_key "$m" launch health_timeout 30s
set_key "$m" haproxy bind "127.0.0.1:$front"
set_key "$m" autoscaler metrics_address "127.0.0.1:$metrics"
set_key "$m" haproxy debounce 200ms
set_key "$m" haproxy reload_command "sh -c 'kill -USR2 \$(cat $tmp/haproxy.pid)'"
cat >"$tmp/launch.sh" <<EOF
#!/bin/sh
# "Launch" a backend on 127.0.1.10:8080 (bounded lifetime) and report it as JSON.
cd "$tmp" && timeout 600 python3 -m http.server --bind 127.0.1.10 8080 >/dev/null 2>&1 &
echo \$! >"$tmp/launched.pid"
echo '{"host": "127.0.1.10", "port": 8080, "instance_id": "demo-1"}'
EOF
chmod +x "$tmp/launch.sh"
export AUTOSCALER_CONFIG="$m"

say "The web node: a backend on 127.0.0.2:8080, its sshd, its autoscaler agent"
(cd "$tmp" && exec timeout 600 python3 -m http.server --bind 127.0.0.2 8080 >/dev/null 2>&1) &
pids+=($!)
start_loopback_sshd "$tmp/sshd" 127.0.0.2 "$sshport" "$tmp/master/id_ed25519.pub"
pids+=("$SSHD_PID")
AUTOSCALER_CONFIG="$tmp/node/autoscaler.ini" "$bin" node 2>"$tmp/node.log" &
pids+=($!)
"$bin" add-host 127.0.0.2 8080 --ssh-port "$sshport"

say "HAProxy (master-worker) on 127.0.0.1:$front"
"$bin" generate
haproxy -W -f "$tmp/master/haproxy.cfg" -p "$tmp/haproxy.pid" >"$tmp/haproxy.log" 2>&1 &
pids+=($!)
wait_for 10 "HAProxy answering" curl -sf "http://127.0.0.1:$front/"

say "The master"
"$bin" --log-format json master 2>"$tmp/master.log" &
pids+=($!)
wait_for 20 "the node's tunnel" grep -q '"msg":"NodeUp"' "$tmp/master.log"
grep '"msg":"\(Tunnel up\|NodeUp\)"' "$tmp/master.log"

say "Loading the CPU (bounded: 60 s at most) until the master scales up"
for ((i = 0; i < $(nproc); i++)); do timeout 60 sh -c 'while :; do :; done' & pids+=($!); done
wait_for 60 "a scale-up" grep -q '"msg":"HAProxy \(configuration installed and reloaded\|servers changed through the runtime API\)".*"servers":2' "$tmp/master.log"
for p in "${pids[@]: -$(nproc)}"; do kill "$p" 2>/dev/null || true; done
grep '"msg":"\(Decision\|Launching\|Registered host\|Launch finished\|HAProxy [a-z ]*\)"' "$tmp/master.log" | grep -v '"action":"hold"' || true

say "Hosts and the live HAProxy backend"
"$bin" list-hosts
sed -n '/^backend/,$p' "$tmp/master/haproxy.cfg"
python3 - "$tmp/master/haproxy.sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b"show servers state app\n"); data = b""
while chunk := s.recv(65536): data += chunk
print("HAProxy runtime API, servers in backend app:")
for line in data.decode().splitlines()[2:]:
    f = line.split()
    if len(f) > 4: print(f"  {f[3]:<20} {f[4]}")
PY
for i in 1 2 3 4; do curl -s -o /dev/null -w "request $i through HAProxy: HTTP %{http_code}\n" "http://127.0.0.1:$front/"; done

say "What the running master says: autoscaler status"
"$bin" status

say "Its Prometheus metrics (excerpt of http://127.0.0.1:$metrics/metrics)"
curl -s "http://127.0.0.1:$metrics/metrics" | grep -E '^autoscaler_(node_cpu_busy_percent|nodes|decisions_total\{action="scale_up"|launches_total|haproxy_applies_total)' || true
