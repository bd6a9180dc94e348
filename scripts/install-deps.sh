#!/usr/bin/env bash
# Installs what autoscaler's tests and demo need on Debian (run as root):
#   apt: haproxy, openssh-server, openssh-client, iproute2, cloud-init (its schema checker)
#        (and python3-venv when missing)
#   .venv-moto/: the moto EC2 API server the launcher tests start on loopback
# Idempotent and quick when everything is there already.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found; install a Rust toolchain (1.85 or newer, e.g. with rustup)" >&2
  exit 1
fi

need=()
for pair in haproxy:haproxy sshd:openssh-server ssh-keygen:openssh-client ip:iproute2 \
    cloud-init:cloud-init; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
python3 -m venv --help >/dev/null 2>&1 || need+=(python3 python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv-moto/bin/moto_server ]; then
  echo "install-deps: creating .venv-moto (moto EC2 API server)" >&2
  python3 -m venv .venv-moto
  .venv-moto/bin/pip install -q --disable-pip-version-check 'moto>=5' flask flask-cors
fi
