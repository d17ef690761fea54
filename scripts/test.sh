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
# A bounded fuzz run of the file parsing (stable toolchain; see tests/src/fuzzing.rs): the kept
# regression inputs, then a minute of mutations of the fixture corpus. A failing input is
# written to tests/fixtures/fuzz-regressions/ (commit it with the fix) and fails the run.
if cargo run --locked -q -p mui-tests --bin mui-fuzz -- --seconds "${MUI_FUZZ_SECS:-60}"; then
    echo "test result: ok. 1 passed; 0 failed (mui-fuzz)" | tee -a "$log"
else
    echo "test result: FAILED. 0 passed; 1 failed (mui-fuzz)" | tee -a "$log"
    status=1
fi
# The chaos soak (tests/src/soak.rs): MUI_SOAK_MINUTES (2) of random files from dozens of
# tenants while the services are killed and PostgreSQL, RabbitMQ and SMTP fail, then every
# file, report, mail, user and permit checked against the reference model
# (tests/src/model.rs). It prints its seed; `scripts/soak.sh --seed S` replays it.
cargo build --locked -q -p mui-tests --bin mui-soak --bin mui-service
if ! "${CARGO_TARGET_DIR:-target}/debug/mui-soak" --minutes "${MUI_SOAK_MINUTES:-2}" 2>&1 | tee -a "$log"; then
    status=1
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
