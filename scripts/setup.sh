#!/usr/bin/env bash
# Makes sure everything Managed User Import needs on this machine is installed and running:
# the Debian packages (PostgreSQL, RabbitMQ, libpq for diesel, the OpenSSH server and the
# sftp and curl clients for the SFTP tests, iproute2 for the multi-host tests' network
# namespaces, Chromium and its chromedriver for the console's browser test), and the
# PostgreSQL and RabbitMQ servers.
# Idempotent; sourced by scripts/run.sh and scripts/test.sh.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root for: $*"; return 1; fi
}

need_pkgs=()
dpkg -s libpq-dev >/dev/null 2>&1 || need_pkgs+=(libpq-dev)
dpkg -s pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
command -v pg_ctlcluster >/dev/null 2>&1 || need_pkgs+=(postgresql)
command -v rabbitmq-server >/dev/null 2>&1 || need_pkgs+=(rabbitmq-server)
command -v cc >/dev/null 2>&1 || need_pkgs+=(build-essential)
# The SFTP tests start their own OpenSSH server on a loopback port and upload with the real
# clients (OpenSSH's sftp, and curl, whose libssh2 renames the way WinSCP does); the
# system's sshd service is not started or needed.
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v sftp >/dev/null 2>&1 || need_pkgs+=(openssh-client)
curl -V 2>/dev/null | grep -q sftp || need_pkgs+=(curl)
# tests/tests/hosts.rs runs workers in network namespaces of their own (`ip netns`).
dpkg -s iproute2 >/dev/null 2>&1 || need_pkgs+=(iproute2)
# tests/tests/console/browser.rs drives a headless Chromium through chromedriver.
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_pkgs+=(chromium-driver)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_pkgs[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
    for _ in $(seq 1 "$3"); do port_open "$1" && return 0; sleep 1; done
    log "$2 did not come up on port $1"; return 1
}

if ! port_open 5432; then
    log "starting PostgreSQL"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
    wait_port 5432 PostgreSQL 60
fi
if ! port_open 5672; then
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached || true
    wait_port 5672 RabbitMQ 120
    as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
# PostgreSQL must accept the postgres user without a password on 127.0.0.1 (Debian's
# default for this machine kind is trust); say so plainly if it does not.
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    log "cannot connect as postgres@127.0.0.1 without a password; set MUI_TEST_DATABASE_URL / DATABASE_URL"
fi
