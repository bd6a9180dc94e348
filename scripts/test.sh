#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the gates and the whole suite.
# Tests start their own HAProxy, sshd and moto on loopback and clean up after themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
# What compiling needs first; the test tools (apt packages, the moto venv) install while the
# code compiles, and the suite starts only once they are all there.
scripts/install-deps.sh build
deps_log=$(mktemp)
scripts/install-deps.sh all >"$deps_log" 2>&1 &
deps=$!
# Waits for the installer (once), shows what it said, and fails if it failed.
finish_install() {
  [ -n "$deps" ] || return 0
  local pid=$deps rc=0
  deps=
  wait "$pid" || rc=$?
  cat "$deps_log" >&2
  [ "$rc" -eq 0 ] || echo "test.sh: installing the test tools failed (scripts/install-deps.sh, above)" >&2
  return "$rc"
}
# Whatever fails first, the installer is not cut off half-way (an interrupted dpkg needs
# `dpkg --configure -a`), and what it said is shown.
trap 'finish_install || true; rm -f "$deps_log"' EXIT
export MOTO_SERVER="$PWD/.venv-moto/bin/moto_server"
# A test that cannot find a tool it needs fails, naming the package, instead of skipping.
export AUTOSCALER_TEST_STRICT=1
cargo fmt --all -- --check
# clippy lints this workspace's crates while the tests compile, as `cargo clippy` runs it
# (clippy-driver as the workspace's rustc wrapper, -D warnings in its CLIPPY_ARGS form): the
# dependencies are compiled once, instead of checked for clippy and then built again.
RUSTC_WORKSPACE_WRAPPER=$(command -v clippy-driver) || {
  echo "test.sh: clippy-driver not found: rustup component add clippy" >&2
  exit 1
}
export RUSTC_WORKSPACE_WRAPPER
export CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
cargo test --workspace --all-targets --no-run
finish_install
cargo test --workspace --lib --bins --tests
