# Sourced by the whole-process benchmarks after they set `root` (the repository):
#   bin       the autoscaler to measure: $AUTOSCALER_BIN, else the release build (built if
#             missing)
#   tmp       a temp dir, removed at exit
#   pids      processes to SIGKILL at exit, with their children (append with pids+=(PID))
#   free_port a free TCP port on 127.0.0.1
#   ini_set   FILE SECTION KEY VALUE: sets `KEY = VALUE` in [SECTION] of an autoscaler.ini
#   one_node_fleet  a master hearing one real agent (after scripts/loopback-sshd.sh is sourced)
bin=${AUTOSCALER_BIN:-$root/target/release/autoscaler}
[ -x "$bin" ] || (cd "$root" && cargo build --release --quiet --bin autoscaler)
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do pkill -9 -P "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
ini_set() { # ini_set FILE SECTION KEY VALUE
  python3 - "$@" <<'PY'
import sys
path, section, key, value = sys.argv[1:]
out, current, done = [], None, False
for line in open(path).read().splitlines():
    if line.startswith("["):
        current = line.strip("[]")
    if current == section and line.split(" = ")[0] == key:
        line, done = f"{key} = {value}", True
    out.append(line)
assert done, (section, key)
open(path, "w").write("\n".join(out) + "\n")
PY
}

# A master (JSON log in $tmp/master.log) hearing one agent through a loopback sshd on
# 127.0.0.2 and the agent's Unix-socket forward, as on a real node; returns once the master
# heard it. Sets m (the master's autoscaler.ini), agent and master (pids).
# AGENT_WRAP="cmd args" runs the agent under cmd.
one_node_fleet() {
  local sshport
  sshport=$(free_port)
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
  agent=$!; pids+=("$agent")
  AUTOSCALER_CONFIG="$m" "$bin" --log-format json master 2>"$tmp/master.log" &
  master=$!; pids+=("$master")
  # Long enough for an agent under valgrind.
  for _ in $(seq 1200); do grep -q '"msg":"NodeUp"' "$tmp/master.log" && break; sleep 0.1; done
  grep -q '"msg":"NodeUp"' "$tmp/master.log" || { echo "the agent was never heard:" >&2; tail -5 "$tmp/master.log" >&2; exit 1; }
}
