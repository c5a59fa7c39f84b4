#!/usr/bin/env bash
# Installs what the test suite needs on Debian 12: system packages (only the missing ones;
# their own services are kept from starting) and the Python venv for the local test servers.
# Idempotent and quick when everything is already there.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# `--runtime`: only what building and running the extension needs (the README's main job).
RUNTIME_ONLY=0
[ "${1:-}" = "--runtime" ] && RUNTIME_ONLY=1
PACKAGES=(php8.2-dev php8.2-cli php8.2-sqlite3 clang libclang-dev pkg-config libssl-dev)
if [ "$RUNTIME_ONLY" = 0 ]; then
    # procmail: the delivery agent appending to mbox files in the MBOX tests.
    PACKAGES+=(msmtp msmtp-mta dovecot-imapd dovecot-pop3d openssl sqlite3 phpunit php8.2-imap time procmail)
    # PHPStan's PHPDoc parser: a PHP test checks that the stubs' array shapes parse.
    PACKAGES+=(php-phpstan-phpdoc-parser)
    # email.STATE_DSN: the shared-state tests run their own MariaDB (scripts/test-servers.sh).
    PACKAGES+=(mariadb-server mariadb-client)
fi

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

# Package installs must not start Debian's own dovecot/msmtpd: we run our own instances.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
block_services() {
    if [ ! -e "$POLICY" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
        CREATED_POLICY=1
    fi
}
unblock_services() {
    if [ "$CREATED_POLICY" = 1 ]; then
        as_root rm -f "$POLICY"
        CREATED_POLICY=0
    fi
}

APT_UPDATED=0
apt_install() {
    block_services
    trap unblock_services EXIT
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing: $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >/dev/null
    unblock_services
    trap - EXIT
}

# Stops a system daemon a package install may have started anyway (found by its pid file).
stop_pidfile_daemon() {
    local pidfile="$1" name="$2" pid
    [ -r "$pidfile" ] || return 0
    pid="$(head -n1 "$pidfile" | tr -dc 0-9)"
    [ -n "$pid" ] || return 0
    if [ -r "/proc/$pid/comm" ] && grep -qx "$name" "/proc/$pid/comm"; then
        log "stopping system $name (pid $pid): the tests run their own instance"
        as_root kill "$pid" || true
    fi
}

missing=()
for p in "${PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
    stop_pidfile_daemon /run/dovecot/master.pid dovecot
    stop_pidfile_daemon /run/mysqld/mysqld.pid mariadbd
else
    log "system packages: all present"
fi

[ "$RUNTIME_ONLY" = 1 ] && exit 0

# ---- Python venv with the pinned aiosmtpd -------------------------------------------------
venv_ok() {
    [ -x "$PCR_VENV/bin/python" ] &&
        "$PCR_VENV/bin/python" - "$PCR_AIOSMTPD_VERSION" >/dev/null 2>&1 <<'PY'
import sys
import aiosmtpd
sys.exit(0 if aiosmtpd.__version__ == sys.argv[1] else 1)
PY
}

if venv_ok; then
    log "python venv: ok ($PCR_VENV, aiosmtpd $PCR_AIOSMTPD_VERSION)"
else
    python="${PCR_PYTHON:-$(command -v python3 || true)}"
    [ -n "$python" ] || python=/usr/bin/python3
    if ! "$python" -m venv --clear "$PCR_VENV" >/dev/null 2>&1; then
        # Debian's own python3 needs python3-venv for ensurepip.
        log "'$python -m venv' failed; installing python3-venv and using /usr/bin/python3"
        is_installed python3-venv || apt_install python3-venv
        python=/usr/bin/python3
        "$python" -m venv --clear "$PCR_VENV"
    fi
    log "python venv: installing $(grep -v '^#' "$PCR_SERVERS_SRC/requirements.txt" | tr '\n' ' ')"
    "$PCR_VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q \
        -r "$PCR_SERVERS_SRC/requirements.txt"
    venv_ok || die "python venv at $PCR_VENV does not import aiosmtpd $PCR_AIOSMTPD_VERSION"
fi
