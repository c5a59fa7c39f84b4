#!/usr/bin/env bash
# Local servers for the integration tests, all on 127.0.0.1 (see tests/servers/README.md):
#   scripts/test-servers.sh start    (re)start everything, write .testenv/env
#   scripts/test-servers.sh stop     stop what `start` started (by recorded pid)
#   scripts/test-servers.sh status   show what runs; exit 0 only when all is up
# Ports are PCR_TEST_PORT_BASE (default 24800) + a fixed offset; latency of the delay proxy
# is PCR_TEST_DELAY_MS (default 20).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE="${PCR_TEST_PORT_BASE:-24800}"
case "$BASE" in '' | *[!0-9]*) die "PCR_TEST_PORT_BASE must be a number, got '$BASE'" ;; esac
[ "$BASE" -ge 1024 ] && [ "$BASE" -le 65436 ] || die "PCR_TEST_PORT_BASE must be in 1024..65436"
DELAY_MS="${PCR_TEST_DELAY_MS:-20}"
SLOW_SECONDS=10 # DATA reply delay for "slow*" recipients
HOST=127.0.0.1

P_SMTP_STARTTLS=$((BASE + 0))
P_SMTP_TLS=$((BASE + 1))
P_SMTP_WRONGHOST=$((BASE + 2))
P_SMTP_PLAIN=$((BASE + 3))
P_SMTP_PLAINAUTH=$((BASE + 4))
P_SMTP_XOAUTH2_STARTTLS=$((BASE + 5)) # STARTTLS, then AUTH XOAUTH2/OAUTHBEARER/PLAIN/LOGIN
P_SMTP_XOAUTH2_TLS=$((BASE + 6))      # implicit TLS, AUTH XOAUTH2/OAUTHBEARER/PLAIN/LOGIN
P_SILENT=$((BASE + 9))
P_IMAP=$((BASE + 10))
P_IMAPS=$((BASE + 11))
P_POP3=$((BASE + 12))
P_POP3S=$((BASE + 13))
P_D_SMTP_STARTTLS=$((BASE + 20))
P_D_SMTP_TLS=$((BASE + 21))
P_D_SMTP_PLAIN=$((BASE + 22))
P_D_IMAP=$((BASE + 23))
P_D_IMAPS=$((BASE + 24))
P_D_POP3=$((BASE + 25))
P_D_POP3S=$((BASE + 26))
P_CLOUD=$((BASE + 30)) # cloud_emulator.py (Microsoft identity + Graph, Google OAuth + Gmail)
P_MARIADB=$((BASE + 31)) # MariaDB for email.STATE_DSN (tests/state_mysql.rs, php SharedStateTest)
# Its RFC 7662 token introspection: how Dovecot and the SMTP server check XOAUTH2/OAUTHBEARER.
INTROSPECT_URL="http://$HOST:$P_CLOUD/_introspect"
SPARE_FIRST=$((BASE + 50))
SPARE_LAST=$((BASE + 99))

T="$PCR_TESTENV"
CERTS="$T/certs"
PIDS="$T/pids"
LOGS="$T/logs"
SMTP_DROP="$T/smtp"
USERS_FILE="$T/users"
DOVECOT_DIR="$T/dovecot"
DOVECOT_CONF="$DOVECOT_DIR/dovecot.conf"
DOVECOT_PASSWD="$DOVECOT_DIR/passwd"
# Unix socket paths are limited to ~108 bytes, so Dovecot's runtime dir stays short.
DOVECOT_BASE_DIR="${TMPDIR:-/tmp}/pcr-dovecot-$(id -u)-$BASE"
MAIL_ROOT="$T/mail"
MSMTPRC="$T/msmtprc"
SENDMAIL="$T/bin/sendmail"
ENV_FILE="$T/env"
# MariaDB: its data directory under the test env, its socket (path length limit) in a fresh
# `mktemp -d` directory of TMPDIR (never a predictable /tmp path: it is chown'd to mysql when we
# are root), whose path `start` records in $MARIADB_RUN_FILE so `stop` removes it; run as the
# `mysql` user when we are root; $T/bin/mariadb-ctl stops and starts it again (the tests that
# take the database away in the middle of a run).
MARIADB_DIR="$T/mariadb"
MARIADB_RUN_FILE="$T/mariadb-run"
MARIADB_RUN="" # set by start_mariadb
MARIADB_SOCK=""
MARIADB_CTL="$T/bin/mariadb-ctl"
MARIADB_DB=pcr_email_test
MARIADB_USER=pcr_email
MARIADB_PASS='pw-mariadb-S3cret'
DOVECOT_BIN=/usr/sbin/dovecot
DOVECOT_LDA=/usr/lib/dovecot/dovecot-lda
DOVEADM=/usr/bin/doveadm
MSMTP_BIN=/usr/bin/msmtp
PY="$PCR_VENV/bin/python"
MAIL_DOMAIN=test.local

# Mail users (<name>@test.local): every one can log in to IMAP/POP3 AND to the AUTH SMTP
# listeners (a PCR-360 account has one login for incoming and outgoing).
# Password scheme: pw-<name>-S3cret, except `quoted`, whose password exercises quoting.
MAIL_USERS=(user other smoke smoke2 imapuser pop3user mbox1 mbox2 mbox3 mbox4 mbox5 mbox6 quoted
    bench1 bench2 bench3 bench4 oauth1 oauth2 oauth3 oauth4 shared)
# Mailboxes for the OAuth tests (XOAUTH2/OAUTHBEARER): Dovecot users like the others (with a
# password too), and registered in the cloud emulator for both providers (--seed-users), so a
# delegated token can be issued for them; `shared` stands for an Exchange shared mailbox.
OAUTH_USERS=(oauth1 oauth2 oauth3 oauth4 shared)
QUOTED_PASSWORD='Q"uo\ted pw*'
password_for() {
    if [ "$1" = quoted ]; then printf '%s' "$QUOTED_PASSWORD"; else printf 'pw-%s-S3cret' "$1"; fi
}

# The services `start` runs, each with .testenv/pids/<name>.pid and .testenv/logs/<name>.log.
SERVICES=(smtp dovecot silent delay cloud mariadb)

port_open() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

running() { # running <pid>: the process exists and is not a zombie (an exited, unreaped child)
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    # Field 3, after the command name in parentheses (which may itself contain spaces).
    stat="${stat##*) }"
    [ -n "$stat" ] && [ "${stat%% *}" != Z ]
}

pid_of() { # pid recorded for a service, if that process still runs the expected program
    local name="$1" pidfile="$PIDS/$1.pid" pid expect
    [ -f "$pidfile" ] || return 1
    pid="$(tr -dc 0-9 <"$pidfile")"
    [ -n "$pid" ] && running "$pid" || return 1
    case "$name" in
        smtp) expect="$PCR_SERVERS_SRC/smtp_server.py" ;;
        silent) expect="$PCR_SERVERS_SRC/silent_server.py" ;;
        delay) expect="$PCR_SERVERS_SRC/delay_proxy.py" ;;
        cloud) expect="$PCR_SERVERS_SRC/cloud_emulator.py" ;;
        dovecot) expect="$DOVECOT_CONF" ;;
        mariadb) expect="--datadir=$MARIADB_DIR/data" ;;
        *) return 1 ;;
    esac
    # Guard against a recycled pid: the process must still be the one we started.
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$expect" || return 1
    printf '%s' "$pid"
}

stop_service() {
    local name="$1" pid i
    if pid="$(pid_of "$name")"; then
        kill -TERM "$pid" 2>/dev/null || true
        # A process that has exited counts as stopped even while nobody has reaped it yet.
        for ((i = 0; i < 100; i++)); do
            running "$pid" || break
            sleep 0.1
        done
        if running "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$PIDS/$name.pid"
}

# The MariaDB run directory recorded by `start`, removed once the server is stopped. Only a
# directory that `mktemp -d` in TMPDIR can have made is removed (the record is ours, but a
# hand-edited or stale one must not make `stop` delete something else).
remove_mariadb_run() {
    local run
    [ -f "$MARIADB_RUN_FILE" ] || return 0
    run="$(cat "$MARIADB_RUN_FILE")"
    case "$run" in
        "${TMPDIR:-/tmp}"/pcr-mariadb.??????????)
            [ -d "$run" ] && [ ! -L "$run" ] && rm -rf -- "$run"
            ;;
        *) log "not removing '$run' named in $MARIADB_RUN_FILE: not a MariaDB run directory" ;;
    esac
    rm -f "$MARIADB_RUN_FILE"
}

cmd_stop() {
    local s i
    rm -f "$ENV_FILE"
    for s in "${SERVICES[@]}"; do stop_service "$s"; done
    # MariaDB's data directory and its socket directory go with it (a few hundred MB of InnoDB
    # files otherwise left behind in every test env).
    if ! pid_of mariadb >/dev/null; then
        remove_mariadb_run
        rm -rf "$MARIADB_DIR"
    fi
    # Dovecot's children exit with their master; give them a moment so the ports are free.
    for ((i = 0; i < 50; i++)); do
        port_open "$P_IMAP" || port_open "$P_POP3" || break
        sleep 0.1
    done
}

all_ports() {
    echo "$P_SMTP_STARTTLS $P_SMTP_TLS $P_SMTP_WRONGHOST $P_SMTP_PLAIN $P_SMTP_PLAINAUTH $P_SILENT" \
        "$P_SMTP_XOAUTH2_STARTTLS $P_SMTP_XOAUTH2_TLS" \
        "$P_IMAP $P_IMAPS $P_POP3 $P_POP3S $P_D_SMTP_STARTTLS $P_D_SMTP_TLS $P_D_SMTP_PLAIN" \
        "$P_D_IMAP $P_D_IMAPS $P_D_POP3 $P_D_POP3S $P_CLOUD $P_MARIADB"
}

cmd_status() {
    local s pid ok=0 p
    for s in "${SERVICES[@]}"; do
        if pid="$(pid_of "$s")"; then
            echo "$s: running (pid $pid)"
        else
            echo "$s: not running"
            ok=1
        fi
    done
    for p in $(all_ports); do
        port_open "$p" || { echo "port $p: not answering"; ok=1; }
    done
    [ "$ok" = 0 ] && echo "all test servers up (env: $ENV_FILE)"
    return "$ok"
}

# Exit status of one start attempt in which a server died before its ports answered: worth
# another attempt (each is logged with the exit status and the server's log). Anything else
# (a port taken by another program, an invalid config, a hang) fails at once.
DIED=3
declare -A SPAWNED=()

spawn() { # spawn <name> <command...>: start in background, stdio to its log, record pid
    local name="$1"
    shift
    nohup "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
    SPAWNED[$name]=$!
    echo $! >"$PIDS/$name.pid"
}

fail_start() { # fail_start <name> <message> [exit status]
    local name="$1" msg="$2" status="${3:-1}"
    {
        echo "ERROR: $msg"
        echo "---- last lines of $LOGS/$name.log ----"
        tail -n 30 "$LOGS/$name.log" 2>/dev/null || true
    } >&2
    cmd_stop
    exit "$status"
}

# how_it_ended <name>: sets ENDED to how a server this process spawned has ended (waited for
# here, not in a subshell, which could not wait for its parent's child).
ENDED=""
how_it_ended() {
    local pid="${SPAWNED[$1]}" status=0
    wait "$pid" 2>/dev/null || status=$?
    if [ "$status" -gt 128 ]; then
        ENDED="pid $pid, killed by signal $((status - 128)) ($(kill -l "$((status - 128))" 2>/dev/null || echo '?'))"
    else
        ENDED="pid $pid, exit status $status"
    fi
}

wait_ports() { # wait_ports <name> <port...>: bounded wait for a service's ports
    local name="$1" p deadline
    shift
    deadline=$((SECONDS + 20))
    for p in "$@"; do
        until port_open "$p"; do
            # Our own child: its pid cannot be reused before we reap it, so no cmdline check.
            if ! running "${SPAWNED[$name]}"; then
                how_it_ended "$name"
                fail_start "$name" "$name exited before port $p answered ($ENDED)" "$DIED"
            fi
            [ "$SECONDS" -lt "$deadline" ] || fail_start "$name" "$name: port $p not answering after 20s"
            sleep 0.1
        done
    done
}

write_users() {
    local u pw
    : >"$USERS_FILE.tmp"
    : >"$DOVECOT_PASSWD.tmp"
    chmod 600 "$USERS_FILE.tmp" "$DOVECOT_PASSWD.tmp"
    for u in "${MAIL_USERS[@]}"; do
        pw="$(password_for "$u")"
        printf '%s@%s:%s\n' "$u" "$MAIL_DOMAIN" "$pw" >>"$USERS_FILE.tmp"
        printf '%s@%s:{PLAIN}%s\n' "$u" "$MAIL_DOMAIN" "$pw" >>"$DOVECOT_PASSWD.tmp"
    done
    mv -f "$USERS_FILE.tmp" "$USERS_FILE"
    mv -f "$DOVECOT_PASSWD.tmp" "$DOVECOT_PASSWD"
}

# Dovecot never runs mail processes as uid 0 and refuses root login processes, so as root we
# use Debian's `mail` user for mailbox access and `dovenull` for the login processes; internal
# processes (auth, config, log) stay root so they can read files under a 0700 $HOME.
# As a normal user, everything runs as that user.
prepare_mail_root() {
    rm -rf "$MAIL_ROOT"
    MAIL_ROOT_REAL="$MAIL_ROOT"
    if [ "$(id -u)" = 0 ]; then
        MAIL_UID="$(id -u mail)"
        MAIL_GID="$(id -g mail)"
        LOGIN_USER=dovenull
        id dovenull >/dev/null 2>&1 || LOGIN_USER=nobody
        INTERNAL_USER=root
        # The mail user must reach the maildirs; a checkout under /root (0700) is not
        # traversable, so then the mailboxes live in $TMPDIR and .testenv/mail links there.
        if ! setpriv --reuid="$MAIL_UID" --regid="$MAIL_GID" --clear-groups test -x "$T" 2>/dev/null; then
            MAIL_ROOT_REAL="${TMPDIR:-/tmp}/pcr-mail-$BASE"
            rm -rf "$MAIL_ROOT_REAL"
            ln -s "$MAIL_ROOT_REAL" "$MAIL_ROOT"
        fi
        mkdir -p "$MAIL_ROOT_REAL"
        chmod 755 "$MAIL_ROOT_REAL"
    else
        MAIL_UID="$(id -u)"
        MAIL_GID="$(id -g)"
        LOGIN_USER="$(id -un)"
        INTERNAL_USER="$(id -un)"
        mkdir -p "$MAIL_ROOT"
    fi
    # Empty maildirs up front, so a test may drop files into Maildir/new before any login.
    local u
    for u in "${MAIL_USERS[@]}"; do
        mkdir -p "$MAIL_ROOT_REAL/$u@$MAIL_DOMAIN/Maildir/"{cur,new,tmp}
    done
    chown -R "$MAIL_UID:$MAIL_GID" "$MAIL_ROOT_REAL"
}

# SASL XOAUTH2 and OAUTHBEARER on Dovecot (which hand the bearer token over as the password) are
# checked by Dovecot's own oauth2 passdb: for each login it POSTs token=<token> to the cloud
# emulator's RFC 7662 endpoint (introspection_mode = post), with the protocol (imap, pop3) in
# the X-Dovecot-Auth-Service header (send_auth_headers), and signs the login in only when the
# answer has "active": true (active_attribute/active_value) and an "email" (username_attribute)
# equal to the login, both lower-cased (username_format %Lu; the login already is, by Dovecot's
# default auth_username_format); a token refused so gets the mechanism's JSON failure
# challenge, an endpoint that fails (an HTTP error, no answer within 10 s) a temporary failure.
# Dovecot 2.3.19 cannot put the login into the request (introspection_url is used as a fixed
# string, never variable-expanded), yet an app-only (client_credentials) token names no user:
# Exchange checks the app's grant on the mailbox named in the SASL string. So each mail user
# has its own oauth2 passdb, chosen by username_filter, whose fixed URL names that mailbox
# (?user=<mailbox>, which the endpoint checks the app's grant against); any other login goes
# to a last oauth2 passdb without a mailbox in its URL, where user-bound tokens (Microsoft
# delegated, Google) answer with their own user and app-only tokens are inactive (Exchange
# knows no such mailbox either). Exactly one of them is asked for any login, so Dovecot never
# answers "All password databases were skipped" (a temporary failure).
oauth2_conf() { # oauth2_conf <file> <introspection url>
    cat >"$1" <<EOF
# Generated by scripts/test-servers.sh: Dovecot oauth2 passdb (see tests/servers/README.md).
introspection_mode = post
introspection_url = $2
send_auth_headers = yes
username_attribute = email
username_format = %Lu
active_attribute = active
active_value = true
timeout_msecs = 10000
EOF
}

# oauth2_passdbs: writes the dovecot-oauth2-*.conf.ext files, prints the passdb blocks.
oauth2_passdbs() {
    local u mailbox conf others=""
    for u in "${MAIL_USERS[@]}"; do
        mailbox="$u@$MAIL_DOMAIN"
        conf="$DOVECOT_DIR/dovecot-oauth2-$u.conf.ext"
        oauth2_conf "$conf" "$INTROSPECT_URL?user=$mailbox"
        others="$others !$mailbox"
        cat <<EOF
# XOAUTH2/OAUTHBEARER logins as $mailbox: the endpoint is told the mailbox (app-only tokens).
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  username_filter = $mailbox
  args = $conf
}
EOF
    done
    conf="$DOVECOT_DIR/dovecot-oauth2-any.conf.ext"
    oauth2_conf "$conf" "$INTROSPECT_URL"
    cat <<EOF
# XOAUTH2/OAUTHBEARER logins as anyone else (no mailbox here): only tokens naming their user.
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  username_filter =$others
  args = $conf
}
EOF
}

write_dovecot_conf() {
    # Without root, nothing can chroot.
    local chroot_lines="" anvil_chroot=""
    if [ "$(id -u)" != 0 ]; then
        chroot_lines="  chroot ="
        anvil_chroot="  chroot ="
    fi
    local oauth_passdbs
    oauth_passdbs="$(oauth2_passdbs)"
    cat >"$DOVECOT_CONF" <<EOF
# Generated by scripts/test-servers.sh: our own Dovecot instance for the tests (not the
# system one). Started as: $DOVECOT_BIN -F -c $DOVECOT_CONF
instance_name = pcr-test-$BASE
base_dir = $DOVECOT_BASE_DIR
state_dir = $DOVECOT_DIR/state
protocols = imap pop3
listen = $HOST
log_path = $LOGS/dovecot.log
auth_verbose = yes

default_internal_user = $INTERNAL_USER
default_internal_group = $(id -gn "$INTERNAL_USER")
default_login_user = $LOGIN_USER
first_valid_uid = $MAIL_UID
first_valid_gid = $MAIL_GID

ssl = yes
ssl_cert = <$CERTS/server.pem
ssl_key = <$CERTS/server.key
# Plaintext logins are allowed without TLS too (accounts with SSL = "").
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_failure_delay = 0

# Passwords (IMAP LOGIN, POP3 USER/PASS, AUTH PLAIN/LOGIN; "none": lookups without a login,
# e.g. the static userdb's existence check for dovecot-lda and doveadm).
passdb {
  driver = passwd-file
  mechanisms = plain login none
  args = scheme=PLAIN username_format=%u $DOVECOT_PASSWD
}
$oauth_passdbs
userdb {
  driver = static
  args = uid=$MAIL_UID gid=$MAIL_GID home=$MAIL_ROOT_REAL/%u
}
mail_location = maildir:~/Maildir
namespace inbox {
  inbox = yes
}
mail_max_userip_connections = 1000
lda_mailbox_autocreate = yes
lda_mailbox_autosubscribe = yes
postmaster_address = postmaster@$MAIL_DOMAIN

service imap-login {
  inet_listener imap {
    address = $HOST
    port = $P_IMAP
  }
  inet_listener imaps {
    address = $HOST
    port = $P_IMAPS
    ssl = yes
  }
$chroot_lines
}
service pop3-login {
  inet_listener pop3 {
    address = $HOST
    port = $P_POP3
  }
  inet_listener pop3s {
    address = $HOST
    port = $P_POP3S
    ssl = yes
  }
$chroot_lines
}
# No authentication penalty (anvil delays every login from an IP after failures there, up to
# 15 s, and all tests come from 127.0.0.1): the auth process finds no penalty socket under its
# usual name and runs without it.
service anvil {
  unix_listener anvil-auth-penalty {
    path = anvil-auth-penalty-disabled
  }
$anvil_chroot
}
EOF
}

write_msmtp() {
    # msmtp refuses a password-bearing rc file readable by others.
    rm -f "$MSMTPRC"
    (umask 077 && cat >"$MSMTPRC") <<EOF
# Generated by scripts/test-servers.sh: relays to the STARTTLS+AUTH test SMTP server.
defaults
tls on
tls_starttls on
tls_trust_file $CERTS/ca.pem
logfile $LOGS/msmtp.log
timeout 30

account test
host $HOST
port $P_SMTP_STARTTLS
auth on
user user@$MAIL_DOMAIN
password $(password_for user)
from sender@$MAIL_DOMAIN

account default : test
EOF
    mkdir -p "$(dirname "$SENDMAIL")"
    cat >"$SENDMAIL.tmp" <<EOF
#!/bin/sh
# sendmail-compatible wrapper (e.g. -i -f <from> -- <rcpts>, or -t) for the tests.
exec $MSMTP_BIN -C "$MSMTPRC" "\$@"
EOF
    chmod 755 "$SENDMAIL.tmp"
    mv -f "$SENDMAIL.tmp" "$SENDMAIL"
}

# The MariaDB control script: `start` (waits for the port), `stop` (by pid, waits for the
# end), `sql STATEMENT` (over the socket, as the database account named after the current OS
# user: socket authentication admits root when we are root, else our own account, which
# mariadb-install-db makes an administrator too). Written by each `start`.
write_mariadb_ctl() {
    local as_user="" chown_run=":"
    if [ "$(id -u)" = 0 ]; then
        as_user="--user=mysql"
        chown_run="chown mysql: $(shq "$MARIADB_RUN")"
    fi
    mkdir -p "$T/bin"
    cat >"$MARIADB_CTL.tmp" <<EOF
#!/usr/bin/env bash
# Generated by scripts/test-servers.sh: the test MariaDB (data $MARIADB_DIR/data, port $P_MARIADB).
set -euo pipefail
pidfile=$(shq "$PIDS/mariadb.pid")
# ours PID: that process is the mariadbd of this data directory (a stale pidfile whose pid was
# reused by another program must never make us signal it; an exited child shows no command line).
ours() { [ -n "\$1" ] && tr '\0' ' ' <"/proc/\$1/cmdline" 2>/dev/null | grep -qF -- $(shq "--datadir=$MARIADB_DIR/data"); }
recorded() { [ -f "\$pidfile" ] && tr -dc 0-9 <"\$pidfile"; }
alive() { ours "\$(recorded)"; }
case "\${1:-}" in
    start)
        alive && exit 0
        [ -d $(shq "$MARIADB_RUN") ] || { echo "$MARIADB_RUN is gone: run scripts/test-servers.sh start" >&2; exit 3; }
        $chown_run
        nohup /usr/sbin/mariadbd --no-defaults --datadir=$(shq "$MARIADB_DIR/data") \\
            --socket=$(shq "$MARIADB_SOCK") --port=$P_MARIADB --bind-address=$HOST $as_user \\
            --pid-file=$(shq "$MARIADB_RUN/mariadbd.pid") --skip-name-resolve --skip-log-bin \\
            ${MARIADB_INNODB_OPTS[*]} \\
            --innodb-flush-log-at-trx-commit=2 \\
            --ssl-cert=$(shq "$MARIADB_DIR/tls/server.pem") --ssl-key=$(shq "$MARIADB_DIR/tls/server.key") \\
            </dev/null >>$(shq "$LOGS/mariadb.log") 2>&1 &
        echo \$! >"\$pidfile"
        for _ in \$(seq 1 300); do
            (exec 3<>/dev/tcp/$HOST/$P_MARIADB) 2>/dev/null && exit 0
            alive || { echo "mariadbd exited; see $LOGS/mariadb.log" >&2; exit 3; }
            sleep 0.1
        done
        echo "mariadbd: port $P_MARIADB not answering after 30 s" >&2
        exit 1
        ;;
    stop)
        alive || exit 0
        pid="\$(recorded)"
        kill -TERM "\$pid"
        for _ in \$(seq 1 300); do ours "\$pid" || exit 0; sleep 0.1; done
        ours "\$pid" && kill -KILL "\$pid" 2>/dev/null || true
        ;;
    sql)
        shift
        /usr/bin/mariadb --no-defaults -S $(shq "$MARIADB_SOCK") -u$(shq "$(id -un)") -N -B -e "\$*"
        ;;
    *) echo "usage: \$0 start|stop|sql STATEMENT" >&2; exit 2 ;;
esac
EOF
    chmod 755 "$MARIADB_CTL.tmp"
    mv -f "$MARIADB_CTL.tmp" "$MARIADB_CTL"
}

# A fresh data directory (a few seconds), the server started, the test database and user made.
# The InnoDB sizing is the server's own (mariadb-ctl), so the bootstrap makes files it accepts.
MARIADB_INNODB_OPTS=(--innodb-buffer-pool-size=32M --innodb-log-file-size=16M)
start_mariadb() {
    local as_user=""
    [ "$(id -u)" = 0 ] && as_user="--user=mysql"
    remove_mariadb_run
    rm -rf "$MARIADB_DIR"
    MARIADB_RUN="$(mktemp -d "${TMPDIR:-/tmp}/pcr-mariadb.XXXXXXXXXX")" ||
        fail_start mariadb "cannot create a run directory in ${TMPDIR:-/tmp}"
    printf '%s\n' "$MARIADB_RUN" >"$MARIADB_RUN_FILE"
    MARIADB_SOCK="$MARIADB_RUN/mysqld.sock"
    mkdir -p "$MARIADB_DIR/data" "$MARIADB_DIR/tls"
    # TLS with the test CA's server certificate (localhost, 127.0.0.1): ?ssl=required&ca=...
    cp "$CERTS/server.pem" "$CERTS/server.key" "$MARIADB_DIR/tls/"
    if [ -n "$as_user" ]; then
        chown -R mysql: "$MARIADB_DIR" "$MARIADB_RUN"
        setpriv --reuid=mysql --regid=mysql --clear-groups test -x "$MARIADB_DIR/data" ||
            fail_start mariadb "the mysql user cannot reach $MARIADB_DIR (use a PCR_TESTENV it can traverse)"
    fi
    /usr/bin/mariadb-install-db --no-defaults --datadir="$MARIADB_DIR/data" $as_user \
        "${MARIADB_INNODB_OPTS[@]}" \
        --auth-root-authentication-method=socket --skip-test-db >>"$LOGS/mariadb.log" 2>&1 ||
        fail_start mariadb "mariadb-install-db failed"
    write_mariadb_ctl
    "$MARIADB_CTL" start || fail_start mariadb "mariadbd did not start"
    # The tests' user may create and drop its own pcr_* databases (one per test).
    "$MARIADB_CTL" sql "CREATE DATABASE $MARIADB_DB;
        CREATE USER '$MARIADB_USER'@'$HOST' IDENTIFIED BY '$MARIADB_PASS';
        CREATE USER '$MARIADB_USER'@'localhost' IDENTIFIED BY '$MARIADB_PASS';
        GRANT ALL ON \`pcr\\_%\`.* TO '$MARIADB_USER'@'$HOST';
        GRANT ALL ON \`pcr\\_%\`.* TO '$MARIADB_USER'@'localhost';" ||
        fail_start mariadb "cannot create the test database"
}

shq() { # single-quote for the shell
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

write_env() {
    local u upper
    {
        echo "# Generated by scripts/test-servers.sh start; source it (or let tests/common read it)."
        emit() { printf 'export %s=%s\n' "$1" "$(shq "$2")"; }
        emit PCR_TESTENV "$T"
        emit PCR_TEST_PORT_BASE "$BASE"
        emit PCR_TEST_HOST "$HOST"
        emit PCR_TEST_TLS_HOST localhost
        emit PCR_TEST_WRONG_HOST other.example
        emit PCR_TEST_CA "$CERTS/ca.pem"
        emit PCR_TEST_CERT "$CERTS/server.pem"
        emit PCR_TEST_KEY "$CERTS/server.key"
        emit PCR_TEST_OTHER_CERT "$CERTS/other.pem"
        emit PCR_TEST_OTHER_KEY "$CERTS/other.key"
        emit PCR_TEST_PYTHON "$PY"
        emit PCR_TEST_SERVERS_DIR "$PCR_SERVERS_SRC"
        emit PCR_TEST_SPARE_PORT_FIRST "$SPARE_FIRST"
        emit PCR_TEST_SPARE_PORT_LAST "$SPARE_LAST"
        emit PCR_SMTP_STARTTLS_PORT "$P_SMTP_STARTTLS"
        emit PCR_SMTP_TLS_PORT "$P_SMTP_TLS"
        emit PCR_SMTP_WRONGHOST_PORT "$P_SMTP_WRONGHOST"
        emit PCR_SMTP_PLAIN_PORT "$P_SMTP_PLAIN"
        emit PCR_SMTP_PLAINAUTH_PORT "$P_SMTP_PLAINAUTH"
        emit PCR_SMTP_XOAUTH2_STARTTLS_PORT "$P_SMTP_XOAUTH2_STARTTLS"
        emit PCR_SMTP_XOAUTH2_TLS_PORT "$P_SMTP_XOAUTH2_TLS"
        emit PCR_SMTP_DROP_DIR "$SMTP_DROP"
        emit PCR_SMTP_SLOW_SECONDS "$SLOW_SECONDS"
        emit PCR_SMTP_USER "user@$MAIL_DOMAIN"
        emit PCR_SMTP_PASS "$(password_for user)"
        emit PCR_SMTP_USER2 "other@$MAIL_DOMAIN"
        emit PCR_SMTP_PASS2 "$(password_for other)"
        emit PCR_SILENT_PORT "$P_SILENT"
        emit PCR_IMAP_PORT "$P_IMAP"
        emit PCR_IMAPS_PORT "$P_IMAPS"
        emit PCR_POP3_PORT "$P_POP3"
        emit PCR_POP3S_PORT "$P_POP3S"
        # The same Dovecot takes SASL XOAUTH2/OAUTHBEARER on all four ports.
        emit PCR_OAUTH_IMAP_PORT "$P_IMAP"
        emit PCR_OAUTH_IMAPS_PORT "$P_IMAPS"
        emit PCR_OAUTH_POP3_PORT "$P_POP3"
        emit PCR_OAUTH_POP3S_PORT "$P_POP3S"
        emit PCR_OAUTH_USERS "$(printf "%s@$MAIL_DOMAIN " "${OAUTH_USERS[@]}" | sed 's/ $//')"
        emit PCR_OAUTH_SHARED_MAILBOX "shared@$MAIL_DOMAIN"
        emit PCR_IMAP_USER "imapuser@$MAIL_DOMAIN"
        emit PCR_IMAP_PASS "$(password_for imapuser)"
        emit PCR_POP3_USER "pop3user@$MAIL_DOMAIN"
        emit PCR_POP3_PASS "$(password_for pop3user)"
        emit PCR_MAIL_DOMAIN "$MAIL_DOMAIN"
        emit PCR_MAIL_USERS "$(printf "%s@$MAIL_DOMAIN " "${MAIL_USERS[@]}" | sed 's/ $//')"
        for u in "${MAIL_USERS[@]}"; do
            upper="$(printf '%s' "$u" | tr '[:lower:]' '[:upper:]')"
            emit "PCR_PASS_$upper" "$(password_for "$u")"
        done
        emit PCR_USERS_FILE "$USERS_FILE"
        emit PCR_MAIL_ROOT "$MAIL_ROOT_REAL"
        emit PCR_DOVECOT_CONF "$DOVECOT_CONF"
        emit PCR_DOVECOT_BASE_DIR "$DOVECOT_BASE_DIR"
        emit PCR_DOVECOT_LDA "$DOVECOT_LDA"
        emit PCR_DOVEADM "$DOVEADM"
        emit PCR_SENDMAIL "$SENDMAIL"
        emit PCR_MSMTPRC "$MSMTPRC"
        emit PCR_DELAY_MS "$DELAY_MS"
        emit PCR_DELAY_SMTP_STARTTLS_PORT "$P_D_SMTP_STARTTLS"
        emit PCR_DELAY_SMTP_TLS_PORT "$P_D_SMTP_TLS"
        emit PCR_DELAY_SMTP_PLAIN_PORT "$P_D_SMTP_PLAIN"
        emit PCR_DELAY_IMAP_PORT "$P_D_IMAP"
        emit PCR_DELAY_IMAPS_PORT "$P_D_IMAPS"
        emit PCR_DELAY_POP3_PORT "$P_D_POP3"
        emit PCR_DELAY_POP3S_PORT "$P_D_POP3S"
        emit PCR_CLOUD_PORT "$P_CLOUD"
        emit PCR_CLOUD_URL "http://$HOST:$P_CLOUD"
        emit PCR_INTROSPECT_URL "$INTROSPECT_URL"
        emit PCR_MARIADB_PORT "$P_MARIADB"
        emit PCR_MARIADB_SOCKET "$MARIADB_SOCK"
        emit PCR_MARIADB_RUN "$MARIADB_RUN"
        emit PCR_MARIADB_CTL "$MARIADB_CTL"
        emit PCR_MARIADB_DSN "mysql://$MARIADB_USER:$MARIADB_PASS@$HOST:$P_MARIADB/$MARIADB_DB"
        emit PCR_MARIADB_USER "$MARIADB_USER"
        emit PCR_MARIADB_PASS "$MARIADB_PASS"
        emit PCR_MARIADB_DB "$MARIADB_DB"
    } >"$ENV_FILE.tmp"
    mv -f "$ENV_FILE.tmp" "$ENV_FILE"
}

start_once() {
    local p
    [ -x "$PY" ] && "$PY" -c 'import aiosmtpd' 2>/dev/null ||
        die "no Python venv with aiosmtpd at $PCR_VENV: run scripts/install-deps.sh"
    for p in "$DOVECOT_BIN" "$DOVECOT_LDA" "$DOVEADM" "$MSMTP_BIN" openssl setpriv \
        /usr/sbin/mariadbd /usr/bin/mariadb-install-db /usr/bin/mariadb; do
        command -v "$p" >/dev/null || die "$p not found: run scripts/install-deps.sh"
    done
    mkdir -p "$PIDS" "$LOGS"
    cmd_stop
    for p in $(all_ports); do
        port_open "$p" && die "port $p is already in use by another program (choose another block with PCR_TEST_PORT_BASE)"
    done

    bash "$PCR_SERVERS_SRC/gen-certs.sh" "$CERTS" || die "certificate generation failed"
    mkdir -p "$DOVECOT_DIR/state"
    rm -rf "$SMTP_DROP" "$DOVECOT_BASE_DIR"
    mkdir -p "$SMTP_DROP"
    : >"$LOGS/smtp.log"
    : >"$LOGS/dovecot.log"
    : >"$LOGS/silent.log"
    : >"$LOGS/delay.log"
    : >"$LOGS/cloud.log"
    : >"$LOGS/mariadb.log"
    write_users
    prepare_mail_root
    write_dovecot_conf
    write_msmtp
    "$DOVECOT_BIN" -c "$DOVECOT_CONF" -n >/dev/null 2>"$LOGS/dovecot.log" ||
        fail_start dovecot "invalid generated config $DOVECOT_CONF"

    spawn dovecot "$DOVECOT_BIN" -F -c "$DOVECOT_CONF"
    spawn smtp "$PY" -u "$PCR_SERVERS_SRC/smtp_server.py" --host "$HOST" \
        --users "$USERS_FILE" --drop-dir "$SMTP_DROP" \
        --cert "$CERTS/server.pem" --key "$CERTS/server.key" \
        --other-cert "$CERTS/other.pem" --other-key "$CERTS/other.key" \
        --starttls-port "$P_SMTP_STARTTLS" --tls-port "$P_SMTP_TLS" \
        --wronghost-port "$P_SMTP_WRONGHOST" --plain-port "$P_SMTP_PLAIN" \
        --plainauth-port "$P_SMTP_PLAINAUTH" --slow-seconds "$SLOW_SECONDS" \
        --xoauth2-starttls-port "$P_SMTP_XOAUTH2_STARTTLS" --xoauth2-tls-port "$P_SMTP_XOAUTH2_TLS" \
        --introspect-url "$INTROSPECT_URL"
    spawn silent "$PY" -u "$PCR_SERVERS_SRC/silent_server.py" --host "$HOST" --port "$P_SILENT"
    spawn delay "$PY" -u "$PCR_SERVERS_SRC/delay_proxy.py" --host "$HOST" --delay-ms "$DELAY_MS" \
        "$P_D_SMTP_STARTTLS:$HOST:$P_SMTP_STARTTLS" "$P_D_SMTP_TLS:$HOST:$P_SMTP_TLS" \
        "$P_D_SMTP_PLAIN:$HOST:$P_SMTP_PLAIN" "$P_D_IMAP:$HOST:$P_IMAP" \
        "$P_D_IMAPS:$HOST:$P_IMAPS" "$P_D_POP3:$HOST:$P_POP3" "$P_D_POP3S:$HOST:$P_POP3S"
    spawn cloud "$PY" -u "$PCR_SERVERS_SRC/cloud_emulator.py" --host "$HOST" --port "$P_CLOUD" \
        --seed-users "$(printf "%s@$MAIL_DOMAIN," "${OAUTH_USERS[@]}" | sed 's/,$//')"

    wait_ports dovecot "$P_IMAP" "$P_IMAPS" "$P_POP3" "$P_POP3S"
    wait_ports smtp "$P_SMTP_STARTTLS" "$P_SMTP_TLS" "$P_SMTP_WRONGHOST" "$P_SMTP_PLAIN" \
        "$P_SMTP_PLAINAUTH" "$P_SMTP_XOAUTH2_STARTTLS" "$P_SMTP_XOAUTH2_TLS"
    wait_ports silent "$P_SILENT"
    wait_ports delay "$P_D_SMTP_STARTTLS" "$P_D_SMTP_TLS" "$P_D_SMTP_PLAIN" "$P_D_IMAP" \
        "$P_D_IMAPS" "$P_D_POP3" "$P_D_POP3S"
    wait_ports cloud "$P_CLOUD"
    start_mariadb

    write_env
    log "test servers up on $HOST, ports $BASE..$((BASE + 31)); env: $ENV_FILE"
}

# A server that dies while starting (seen once in CI: Dovecot, the SMTP and the silent server
# gone without a word in their logs) gets two more attempts, each in a fresh process.
cmd_start() {
    local attempt rc
    for attempt in 1 2 3; do
        rc=0
        bash "${BASH_SOURCE[0]}" start-once || rc=$?
        [ "$rc" = 0 ] && return 0
        { [ "$rc" = "$DIED" ] && [ "$attempt" -lt 3 ]; } || exit "$rc"
        log "start attempt $attempt failed (above); starting everything again in 2 s"
        sleep 2
    done
}

case "${1:-}" in
    start) cmd_start ;;
    start-once) start_once ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_start ;;
    *) die "usage: $0 start|stop|status" ;;
esac
