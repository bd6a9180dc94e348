#!/usr/bin/env bash
# Node agent footprint at 1 Hz over DURATION seconds (default 60), side by side in the same run
# with Debian's prometheus-node-exporter scraped once a second: peak RSS (VmHWM) and CPU
# seconds (utime+stime) of each process. The agent reports to a loopback sink standing in for
# the master's forward, so it does its full work (sample, encode, write).
# Usage: benches/node-footprint.sh [DURATION]   (needs prometheus-node-exporter, curl, python3)
set -euo pipefail
dur=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/release/autoscaler"
[ -x "$bin" ] || (cd "$root" && cargo build --release --quiet --bin autoscaler)
exporter=$(command -v prometheus-node-exporter || echo /usr/bin/prometheus-node-exporter)
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

sink_port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
exp_port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
python3 - "$sink_port" "$tmp/sink.count" <<'PY' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1)
c, _ = s.accept(); n = 0
c.sendall(b'{"v":1,"type":"challenge","nonce":"' + b"0" * 64 + b'"}\n')  # as the master does
with c:
    while True:
        b = c.recv(65536)
        if not b: break
        n += b.count(b"\n")
        open(sys.argv[2], "w").write(str(n))
PY
pids+=($!)

"$bin" -q init --dir "$tmp/node" --role node
(umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$tmp/node/report.key")
sed -i "s/^report_port = .*/report_port = $sink_port/" "$tmp/node/autoscaler.ini"
AUTOSCALER_CONFIG="$tmp/node/autoscaler.ini" "$bin" -q node &
agent=$!; pids+=($agent)
"$exporter" --web.listen-address="127.0.0.1:$exp_port" >/dev/null 2>&1 &
exporter_pid=$!; pids+=($exporter_pid)
sleep 1
for ((i = 0; i < dur; i++)); do
  curl -s -o /dev/null "http://127.0.0.1:$exp_port/metrics" || true
  sleep 1
done
tck=$(getconf CLK_TCK)
report() {
  local name=$1 pid=$2
  local hwm cpu
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  cpu=$(awk -v t="$tck" '{printf "%.2f", ($14 + $15) / t}' "/proc/$pid/stat")
  printf '%-26s peak RSS %6d KiB   CPU %6s s\n' "$name" "$hwm" "$cpu"
}
echo "over ${dur}s at 1 Hz:"
report "autoscaler node" "$agent"
report "prometheus-node-exporter" "$exporter_pid"
echo "frames received by the sink: $(cat "$tmp/sink.count" 2>/dev/null || echo 0)"
