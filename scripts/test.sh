#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the gates and the whole suite.
# Tests start their own HAProxy, sshd and moto on loopback and clean up after themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export MOTO_SERVER="$PWD/.venv-moto/bin/moto_server"
# A test that cannot find a tool it needs fails, naming the package, instead of skipping.
export AUTOSCALER_TEST_STRICT=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --lib --bins --tests
