#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the gates and the whole suite.
# Tests start their own HAProxy, sshd and moto on loopback and clean up after themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export MOTO_SERVER="$PWD/.venv-moto/bin/moto_server"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --lib --bins --tests
