#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs and starts what it needs
# (scripts/setup.sh), checks formatting and lints, then runs every test against the real
# PostgreSQL, RabbitMQ and an SMTP server the tests start on loopback. Ends with one line
# totalling all test binaries: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The services' own builds carry no stop point (mui_shared::failpoint): only the tests'
# mui-service turns the `failpoints` feature on.
if cargo tree --locked -p mui-ingest -p mui-worker -p mui-notifier -p mui-admin -e normal -i fail >/dev/null 2>&1; then
    echo "the fail crate is in a service's build: stop points must stay test-only" >&2
    exit 1
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
