#!/usr/bin/env bash
# Writes src/node.order: the functions of the binary that the node agent runs, found by running
# it under valgrind (callgrind) through a real master and a loopback sshd for DURATION seconds
# (benches/node-footprint.sh). The release link (src/build.rs) places them together at the
# start of .text, so the agent's code is a few contiguous pages instead of a page here and
# there across the whole binary, each of which the kernel maps with its neighbours.
# A stale list costs nothing but footprint: names no longer in the binary are skipped.
# Usage: scripts/node-order.sh [DURATION]   (root: sshd; needs valgrind and
#   prometheus-node-exporter). AUTOSCALER_BIN=path measures another build.
set -euo pipefail
dur=${1:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${AUTOSCALER_BIN:-$root/target/release/autoscaler}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
AUTOSCALER_BIN="$bin" \
  AGENT_WRAP="valgrind -q --tool=callgrind --callgrind-out-file=$work/cg --dump-instr=no --compress-strings=no --compress-pos=no --demangle=no" \
  "$root/benches/node-footprint.sh" "$dur" >"$work/footprint.log" 2>&1 || { cat "$work/footprint.log" >&2; exit 1; }
[ -s "$work/cg" ] || { echo "callgrind wrote nothing" >&2; cat "$work/footprint.log" >&2; exit 1; }
# Functions the agent ran, kept when the binary defines them (not libc's), by name.
nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >"$work/defined"
sed -n 's/^c\{0,1\}fn=//p' "$work/cg" | sort -u >"$work/ran"
[ -s "$work/defined" ] || { echo "$bin has no symbols (stripped?)" >&2; exit 1; }
comm -12 "$work/defined" "$work/ran" >"$work/order"
[ -s "$work/order" ] || { echo "none of the functions the agent ran are named in $bin" >&2; exit 1; }
mv "$work/order" "$root/src/node.order"
echo "src/node.order: $(wc -l <"$root/src/node.order") functions of $(wc -l <"$work/defined") in $bin"
