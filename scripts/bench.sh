#!/usr/bin/env bash
# Benchmarks, each measuring both sides in one run (docs/benchmarks.md):
#   scripts/bench.sh [ARGS]          the pipeline against PostgreSQL's COPY + INSERT … ON
#                                    CONFLICT baseline (mui-bench; default 1,000,000 rows),
#                                    then the same file again unchanged (against an upsert
#                                    that skips unchanged rows), then a new tenant's first
#                                    import, 50,000 vs 200,000 rows
#   scripts/bench.sh --fair [ARGS]   fair share between tenants (mui-bench-fair): the
#                                    dispatcher's cost, a small file's latency beside a large
#                                    one, three tenants' shares, a small file's latency idle
# ARGS go to the binary (see its `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The services by package first (a workspace-wide build would turn on the tests' stop points in
# them: mui-shared's `failpoints` feature), then the benchmark binaries.
cargo build --release --locked -p mui-ingest -p mui-worker -p mui-notifier -p mui-admin
cargo build --release --locked -p mui-tests --bins
if [[ "${1:-}" == "--fair" ]]; then
  shift
  exec target/release/mui-bench-fair "$@"
fi
exec target/release/mui-bench "$@"
