#!/usr/bin/env bash
# What a loop of connections to a node's report socket leaves in the master: a release master,
# a loopback sshd and a real agent; N connections that close at once (MODE close) or answer
# the challenge with a line that is not a hello (MODE garbage), after a warm-up of 300; the
# master's RSS before and 3 s after (its close grace is 2 s), per connection.
# Usage: benches/connect-loop.sh [N=2500] [MODE=close|garbage]   (root: sshd)
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
for _ in range(n):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    if mode == "garbage":
        s.recv(4096); s.sendall(b"not a hello\n"); time.sleep(0.002)
    s.close()
PY
}
connect 300; sleep 3
before=$(rss)
connect "$n"; sleep 3
after=$(rss)
echo "$n connections ($mode): master RSS $before -> $after KiB, $(( (after - before) * 1024 / n )) bytes per connection"
echo "the node: $(AUTOSCALER_CONFIG="$m" "$bin" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["tunnel"])')"
