#!/usr/bin/env bash
# HAProxy's own validation time on a generated config with N servers, beside which
# `cargo bench -p autoscaler-core --bench render` is quoted in docs/benchmarks.md.
# Usage: benches/haproxy-check.sh [N]   (needs haproxy and hyperfine; runs in a temp dir)
set -euo pipefail
n=${1:-10000}
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/debug/autoscaler"
[ -x "$bin" ] || (cd "$root" && cargo build --quiet)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export AUTOSCALER_CONFIG="$tmp/autoscaler.ini"
"$bin" -q init --dir "$tmp"
# Loopback addresses only: HAProxy never sends a packet during -c, but keep it that way anyway.
for ((i = 0; i < n; i++)); do
  printf 'host = 127.1.%d.%d\nport = 8080\n' $((i / 256)) $((i % 256)) >"$tmp/hosts.d/127.1.$((i / 256)).$((i % 256))_8080.host"
done
"$bin" -q generate --no-validate
echo "servers: $(grep -c '^    server ' "$tmp/haproxy.cfg")"
hyperfine --warmup 1 --runs 10 --export-json "$tmp/h.json" "haproxy -c -f $tmp/haproxy.cfg" >&2
python3 -c "import json,statistics;r=json.load(open('$tmp/h.json'))['results'][0]['times'];print(f'haproxy -c median: {statistics.median(r)*1000:.1f} ms over {len(r)} runs')"
