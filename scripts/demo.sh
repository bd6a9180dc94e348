#!/usr/bin/env bash
# The main job, runnable on a fresh Debian machine as root: installs what it needs, builds
# autoscaler, and in a temp dir writes a configuration, registers three backends and
# renders, validates (real haproxy -c) and installs the HAProxy configuration, then prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --quiet
bin="$PWD/target/debug/autoscaler"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export AUTOSCALER_CONFIG="$tmp/autoscaler.ini"
set -x
"$bin" init --dir "$tmp"
"$bin" add-host 127.0.0.1 8081
"$bin" add-host 127.0.0.2 8081
"$bin" add-host ::1 8082
"$bin" list-hosts
"$bin" generate
{ set +x; } 2>/dev/null
echo "----- $tmp/haproxy.cfg -----"
cat "$tmp/haproxy.cfg"
