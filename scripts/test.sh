#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs and starts what it needs
# (scripts/setup.sh), checks formatting and lints, then runs every test against the real
# PostgreSQL, RabbitMQ and an SMTP server the tests start on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
