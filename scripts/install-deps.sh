#!/usr/bin/env bash
# Installs what autoscaler's tests and demo need on Debian (run as root):
#   apt: haproxy, openssh-server, openssh-client, iproute2, cloud-init (its schema checker),
#        systemd (systemd-analyze verify), prometheus (promtool check metrics), groff-base
#        (the man page is rendered), etcd-server (the cluster tests' etcd), protobuf-compiler
#        and libprotobuf-dev (the etcd client's build), openssl (the etcd TLS test's
#        certificates), nftables (the cloud-init metadata lock is applied in a test's network
#        namespace), util-linux (unshare, setpriv, nsenter), and python3-venv when missing
#   a check that the Rust toolchain is at least the workspace's rust-version
#   .venv-moto/: the moto EC2 API server the launcher tests start on loopback
# Idempotent and quick when everything is there already.
# `install-deps.sh build`: only what compiling needs (the toolchain check, protoc and its
# well-known types), so scripts/test.sh can compile while the rest installs.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
case $mode in
  build | all) ;;
  *) echo "usage: scripts/install-deps.sh [build|all]" >&2; exit 2 ;;
esac

# The oldest Rust that builds every locked dependency (tests/toolchain.rs keeps it true).
want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found; install Rust $want or newer:" >&2
  echo "  curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --default-toolchain stable" >&2
  exit 1
fi
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]; then
  echo "install-deps: Rust $have is older than $want, the oldest that builds autoscaler's" >&2
  echo "  dependencies (sysinfo, the AWS SDK). With rustup: rustup update stable." >&2
  echo "  Debian's packaged rustc is too old; install rustup from https://rustup.rs" >&2
  exit 1
fi

need=()
tools=(protoc:protobuf-compiler)
[ "$mode" = build ] || tools+=(haproxy:haproxy sshd:openssh-server ssh-keygen:openssh-client ssh:openssh-client ssh-keyscan:openssh-client ip:iproute2 \
    cloud-init:cloud-init systemd-analyze:systemd promtool:prometheus groff:groff-base \
    etcd:etcd-server openssl:openssl unshare:util-linux \
    setpriv:util-linux nsenter:util-linux bash:bash nft:nftables)
for pair in "${tools[@]}"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
# etcd-client compiles etcd's protos at build time: protoc and its well-known types.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
if [ "$mode" = all ]; then
  python3 -m venv --help >/dev/null 2>&1 || need+=(python3 python3-venv)
  # The tests' unprivileged "local user" runs its attacks in the system's Python.
  [ -x /usr/bin/python3 ] || need+=(python3)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need[*]}" >&2
  apt-get update -qq -o DPkg::Lock::Timeout=600
  # No recommends: prometheus would bring its node exporter, a service these tests never use.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends "${need[@]}" >/dev/null
fi

if [ "$mode" = all ] && [ ! -x .venv-moto/bin/moto_server ]; then
  echo "install-deps: creating .venv-moto (moto EC2 API server)" >&2
  python3 -m venv .venv-moto
  .venv-moto/bin/pip install -q --disable-pip-version-check 'moto>=5' flask flask-cors
fi
