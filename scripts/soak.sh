#!/usr/bin/env bash
# The randomized chaos soak, checked against the reference model (tests/src/soak.rs,
# tests/src/model.rs): builds the test binaries (mui-soak and the mui-service it kills and
# restarts) and runs it against the local PostgreSQL and RabbitMQ.
#
#   scripts/soak.sh --minutes N [--seed S] [--no-known-defects] [--tenants T]
#
# --minutes is the wall time of the fault phase; the quiet period and the check follow
# (a few minutes at most). The seed is printed first and on failure; the same seed replays
# the same tenants, files and fault schedule. The last line is
# `test result: ok. 1 passed; 0 failed (mui-soak)` or `test result: FAILED. ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --locked -p mui-tests --bin mui-soak --bin mui-service
exec "$CARGO_TARGET_DIR/debug/mui-soak" "$@"
