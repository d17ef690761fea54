#!/usr/bin/env bash
# Benchmark: the real pipeline against PostgreSQL's COPY + INSERT … ON CONFLICT baseline, in
# one run. Arguments go to mui-bench (see `--help`); default 1,000,000 rows.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bins
exec target/release/mui-bench "$@"
