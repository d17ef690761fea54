#!/usr/bin/env bash
# Runs the whole product on this machine against a demo tenant:
#  - installs and starts PostgreSQL and RabbitMQ (scripts/setup.sh),
#  - builds the release binaries, creates the database `mui` and applies migrations,
#  - creates the demo tenant `demo` with its drop folder and settings,
#  - starts mui-ingest, mui-worker and mui-notifier, and says where to drop a file and
#    where the mail lands. Ctrl-C stops them.
#  - starts the web console (mui-console) on MUI_CONSOLE_ADDR (default 127.0.0.1:8080),
#    with MUI_CONSOLE_TOKEN if set, otherwise a token made for this run and printed below.
# Mail goes to SMTP_URL if set, otherwise to .run/outbox/ as .eml files.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

RUN_DIR="${MUI_RUN_DIR:-$PWD/.run}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/mui}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export DROP_ROOT="${DROP_ROOT:-$RUN_DIR/drop}"
export MAIL_OUTBOX="${MAIL_OUTBOX:-$RUN_DIR/outbox}"
mkdir -p "$RUN_DIR/logs" "$DROP_ROOT" "$MAIL_OUTBOX"

# The services by package: a workspace-wide build would also turn on the tests' stop points
# (mui-shared's `failpoints` feature, see docs/reliability.md).
cargo build --release --locked -p mui-ingest -p mui-worker -p mui-notifier -p mui-admin -p mui-console
BIN="$PWD/target/release"

db_name="${DATABASE_URL##*/}"; db_name="${db_name%%\?*}"
admin_url="${DATABASE_URL%/*}/postgres"
if [ "$(psql "$admin_url" -Atc "select 1 from pg_database where datname = '$db_name'")" != "1" ]; then
    psql "$admin_url" -qc "create database \"$db_name\""
fi
"$BIN/muictl" migrate
if ! "$BIN/muictl" tenant show demo >/dev/null 2>&1; then
    "$BIN/muictl" tenant create demo --name "Demo University" \
        --reply-to parking-admin@demo.example.org \
        --failed-import-email it-team@demo.example.org \
        --archive-on-inactive on --drop-root "$DROP_ROOT"
    "$BIN/muictl" login-source add demo sso local
    "$BIN/muictl" user-type add demo 1 --name Staff
    "$BIN/muictl" user-type add demo 2 --name Student
fi
mkdir -p "$DROP_ROOT/demo/upload"

pids=()
stop() {
    echo; echo "stopping..."
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait || true
}
trap stop INT TERM
"$BIN/mui-notifier" >"$RUN_DIR/logs/notifier.log" 2>&1 & pids+=($!)
"$BIN/mui-worker"   >"$RUN_DIR/logs/worker.log"   2>&1 & pids+=($!)
"$BIN/mui-ingest"   >"$RUN_DIR/logs/ingest.log"   2>&1 & pids+=($!)
console_addr="${MUI_CONSOLE_ADDR:-127.0.0.1:8080}"
console_token="${MUI_CONSOLE_TOKEN:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
MUI_CONSOLE_ADDR="$console_addr" MUI_CONSOLE_TOKEN="$console_token" \
    "$BIN/mui-console" >"$RUN_DIR/logs/console.log" 2>&1 & pids+=($!)

cat <<MSG

Managed User Import is running (logs in $RUN_DIR/logs/).

  Drop a CSV here:     $DROP_ROOT/demo/upload/
                       e.g. cp examples/users.csv $DROP_ROOT/demo/upload/
  Processed files:     $DROP_ROOT/demo/upload/bak/
  Failure emails:      ${SMTP_URL:+sent via SMTP_URL}${SMTP_URL:-$MAIL_OUTBOX/*.eml}
  The demo's files:    target/release/muictl files list demo
  The demo's users:    target/release/muictl users list demo
  The web console:     http://$console_addr/  (operator token: $console_token)

Press Ctrl-C to stop.
MSG
wait
