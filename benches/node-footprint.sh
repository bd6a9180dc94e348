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

sshport=$(free_port) exp_port=$(free_port)
"$bin" -q init --dir "$tmp/master"
"$bin" -q init --dir "$tmp/node" --role node
cp -p "$tmp/master/report.key" "$tmp/node/report.key"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/master/id_ed25519"
m="$tmp/master/autoscaler.ini"
sed -i "s/^user = .*/user = $(id -un)/; s/^host_key_policy = .*/host_key_policy = accept-new/; s/^reload_command = .*/reload_command = true/" "$m"
sed -i "s|^report_socket = .*|report_socket = $tmp/node/reports/master.sock|" "$m"
start_loopback_sshd "$tmp/sshd" 127.0.0.2 "$sshport" "$tmp/master/id_ed25519.pub"
pids+=("$SSHD_PID")
AUTOSCALER_CONFIG="$m" "$bin" -q add-host 127.0.0.2 8080 --ssh-port "$sshport"

# shellcheck disable=SC2086 # AGENT_WRAP is a command line
AUTOSCALER_CONFIG="$tmp/node/autoscaler.ini" ${AGENT_WRAP:-} "$bin" -q node &
agent=$!; pids+=($agent)
"$exporter" --web.listen-address="127.0.0.1:$exp_port" >/dev/null 2>&1 &
exporter_pid=$!; pids+=($exporter_pid)
AUTOSCALER_CONFIG="$m" "$bin" --log-format json master 2>"$tmp/master.log" &
pids+=($!)
for _ in $(seq 1200); do grep -q '"msg":"NodeUp"' "$tmp/master.log" && break; sleep 0.1; done
grep -q '"msg":"NodeUp"' "$tmp/master.log" || { echo "the agent was never heard:" >&2; tail -5 "$tmp/master.log" >&2; exit 1; }
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
