#!/usr/bin/env bash
# Node agent footprint at 1 Hz over DURATION seconds (default 60), side by side in the same run
# with Debian's prometheus-node-exporter scraped once a second: peak RSS (VmHWM), RSS now split
# into anonymous and file-backed pages (RssAnon, RssFile), and CPU seconds (utime+stime) of
# each process. The agent does its full work: it reports through a real master over a
# loopback sshd (report protocol v2, the Unix-socket forward), as on a real node.
# Usage: benches/node-footprint.sh [DURATION]   (root: sshd; needs prometheus-node-exporter)
#   AUTOSCALER_BIN=path/to/autoscaler to measure another build (default: the release build);
#   FOOTPRINT_SECTIONS=file lists the binary's sections it holds resident; AGENT_WRAP="cmd args" runs the agent under
#   cmd (scripts/node-order.sh: valgrind), stopped with SIGTERM at the end.
set -euo pipefail
dur=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
. "$root/benches/common.sh"
# shellcheck source=../scripts/loopback-sshd.sh
. "$root/scripts/loopback-sshd.sh"
exporter=$(command -v prometheus-node-exporter || echo /usr/bin/prometheus-node-exporter)
[ -x "$exporter" ] || { echo "prometheus-node-exporter is not installed (apt-get install prometheus-node-exporter)" >&2; exit 1; }

exp_port=$(free_port)
"$exporter" --web.listen-address="127.0.0.1:$exp_port" >/dev/null 2>&1 &
exporter_pid=$!; pids+=($exporter_pid)
one_node_fleet
for ((i = 0; i < dur; i++)); do
  curl -s -o /dev/null "http://127.0.0.1:$exp_port/metrics" || true
  sleep 1
done
tck=$(getconf CLK_TCK)
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
report() {
  local name=$1 pid=$2 cpu
  cpu=$(awk -v t="$tck" '{printf "%.2f", ($14 + $15) / t}' "/proc/$pid/stat")
  printf '%-26s peak RSS %6d KiB   RSS %6d KiB (anon %6d, file %6d)   threads %3d   CPU %6s s\n' \
    "$name" "$(kib "$pid" VmHWM)" "$(kib "$pid" VmRSS)" "$(kib "$pid" RssAnon)" "$(kib "$pid" RssFile)" \
    "$(awk '$1 == "Threads:" {print $2}' "/proc/$pid/status")" "$cpu"
}
# FOOTPRINT_SECTIONS=file: which sections of the binary the agent holds resident.
[ -z "${FOOTPRINT_SECTIONS:-}" ] || python3 "$root/benches/resident-sections.py" "$agent" "$bin" >"$FOOTPRINT_SECTIONS"
echo "over ${dur}s at 1 Hz:"
report "autoscaler node" "$agent"
report "prometheus-node-exporter" "$exporter_pid"
a=$(kib "$agent" VmRSS) e=$(kib "$exporter_pid" VmRSS)
echo "RSS ratio agent/exporter: $(echo "scale=2; $a / $e" | bc)"
echo "the master heard: $(AUTOSCALER_CONFIG="$m" "$bin" status --json | python3 -c 'import json,sys; n=json.load(sys.stdin)["nodes"][0]; print(n["tunnel"], n["last_cpu_pct"])')"
[ -z "${AGENT_WRAP:-}" ] || { kill -TERM "$agent"; wait "$agent" || true; }
