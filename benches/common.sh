# Sourced by the whole-process benchmarks after they set `root` (the repository):
#   bin       the autoscaler to measure: $AUTOSCALER_BIN, else the release build (built if
#             missing)
#   tmp       a temp dir, removed at exit
#   pids      processes to SIGKILL at exit, with their children (append with pids+=(PID))
#   free_port a free TCP port on 127.0.0.1
#   ini_set   FILE SECTION KEY VALUE: sets `KEY = VALUE` in [SECTION] of an autoscaler.ini
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
