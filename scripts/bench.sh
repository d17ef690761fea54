#!/usr/bin/env bash
# Every benchmark in one run (docs/benchmarks.md), ending with one table of what was measured
# against its goal; each ratio compares two sides measured in this same run:
#   - mui-bench: the pipeline against PostgreSQL's COPY + INSERT … ON CONFLICT baseline on the
#     same schema and the same file (default 1,000,000 rows), then the same file again
#     unchanged (against an upsert that skips unchanged rows), then a new tenant's first
#     import, 50,000 vs 200,000 rows; peak memory and CPU of each service;
#   - mui-bench-fair: fair share between tenants: the dispatcher's cost against direct
#     publishing, a small file's latency beside a large import, three tenants' shares, and
#     a small file's latency on an idle pipeline.
#
#   scripts/bench.sh [--rows N]          everything; N rows for the large files (both benches)
#   scripts/bench.sh --main [ARGS]       mui-bench only, ARGS to it (see its --help)
#   scripts/bench.sh --otel [ARGS]       mui-bench with tracing on (every service exports its
#                                        spans over OTLP/HTTP to a receiver in mui-bench): the
#                                        cost of tracing is the rows/s against a run without it
#   scripts/bench.sh --fair [ARGS]       mui-bench-fair only, ARGS to it (see its --help)
#   scripts/bench.sh --memory [ARGS]     mui-bench-memory only: each service's peak memory for
#                                        a 150 MB file in which every row fails, as a dry run
#                                        and as an import (see its --help)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The services by package first (a workspace-wide build would turn on the tests' stop points in
# them: mui-shared's `failpoints` feature), then the benchmark binaries.
cargo build --release --locked -p mui-ingest -p mui-worker -p mui-notifier -p mui-admin -p mui-console
cargo build --release --locked -p mui-tests --bins
summary=$(mktemp)
trap 'rm -f "$summary"' EXIT
export MUI_BENCH_SUMMARY=$summary
status=0
case "${1:-}" in
  --main) shift; target/release/mui-bench "$@" || status=$? ;;
  --otel) target/release/mui-bench "$@" || status=$? ;;
  --fair) shift; target/release/mui-bench-fair "$@" || status=$? ;;
  --memory) shift; target/release/mui-bench-memory "$@" || status=$? ;;
  *)
    target/release/mui-bench "$@" || status=$?
    target/release/mui-bench-fair "$@" || status=$?
    ;;
esac
echo
echo "| measure | this run | goal | |"
echo "|---|---|---|---|"
awk -F '\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$summary"
exit "$status"
