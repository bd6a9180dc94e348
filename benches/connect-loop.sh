#!/usr/bin/env bash
# What a loop of connections to a node's report socket leaves in the master: a release master,
# a loopback sshd and a real agent; N connections that close at once (MODE close), answer
# the challenge with a line that is not a hello (MODE garbage), or are held open, 200 at a
# time for 3 s, past the master's EOF and close grace (MODE hold), after a warm-up of 300; the
# master's RSS before and 3 s after (its close grace is 2 s), per connection.
# Usage: benches/connect-loop.sh [N=2500] [MODE=close|garbage|hold]   (root: sshd)
#   AUTOSCALER_BIN=path/to/autoscaler to measure another build (default: the release build).
set -euo pipefail
n=${1:-2500} mode=${2:-close}
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
. "$root/benches/common.sh"
# shellcheck source=../scripts/loopback-sshd.sh
. "$root/scripts/loopback-sshd.sh"
one_node_fleet
rss() { awk '$1 == "VmRSS:" {print $2}' "/proc/$master/status"; }
connect() { # COUNT
  python3 - "$tmp/node/reports/master.sock" "$1" "$mode" <<'PY'
import socket, sys, time
path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def connect():
    # A master renewing its session takes the socket away for a moment.
    for _ in range(100):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); return s
        except OSError:
            s.close(); time.sleep(0.1)
    raise SystemExit("the report socket never came back")
held = []
for _ in range(n):
    s = connect()
    if mode == "hold":
        held.append(s)
        if len(held) == 200:
            time.sleep(3)
            for h in held: h.close()
            held = []
        continue
    if mode == "garbage":
        s.recv(4096); s.sendall(b"not a hello\n"); time.sleep(0.002)
    s.close()
time.sleep(3 if held else 0)
for h in held: h.close()
PY
}
connect 300; sleep 3
before=$(rss)
connect "$n"; sleep 3
after=$(rss)
echo "$n connections ($mode): master RSS $before -> $after KiB, $(( (after - before) * 1024 / n )) bytes per connection"
echo "session renewals (channels held open past their close): $(grep -c 'renewing the SSH session' "$tmp/master.log" || true)"
echo "the node: $(AUTOSCALER_CONFIG="$m" "$bin" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["tunnel"])')"
