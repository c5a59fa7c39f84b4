#!/usr/bin/env bash
# The check-mail benchmark (issue 3), described with its figures in benches/checkmail/README.md.
#   benches/checkmail/run.sh [bench.py options]
#     --repeat R            (a) and (c) runs each (3; medians shown)
#     --ext-imap-delayed N  messages per mailbox for ext-imap over the delay (100, extrapolated; 0 = all)
#     --count N / --small N messages per mailbox (500 / 100), --delay-ms D (10), --plain (no TLS)
# Builds the extension (release, in $CARGO_TARGET_DIR or target/), writes the corpus once under
# <target>/bench-checkmail/, uses the running test Dovecot (starting the test servers, and stopping
# them again, when they are not up), runs its own delay proxy on 24890-24897 and stops it by pid.
# Needs root (it fills the Dovecot users bench1..bench4's Maildirs), php8.2-imap and time.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
cd "$PCR_ROOT"
pcr_cargo_path

[ "$(id -u)" = 0 ] || die "run as root: the benchmark writes into the test Dovecot's Maildirs"
[ -x /usr/bin/time ] || die "/usr/bin/time is missing: apt-get install time (or scripts/install-deps.sh)"
php -r 'exit(function_exists("imap_open") ? 0 : 1);' ||
    die "PHP's ext-imap is missing: apt-get install php8.2-imap (or scripts/install-deps.sh)"

target="${CARGO_TARGET_DIR:-$PCR_ROOT/target}"
log "building the extension (release) in $target"
cargo build --locked --quiet --release --features php --lib
so="$target/release/libpcr_email.so"
php -n -d "extension=$so" -r 'exit(extension_loaded("pcr_email") ? 0 : 1);' || die "$so does not load"

work="$target/bench-checkmail"
corpus="$work/corpus"
mkdir -p "$work"
if [ ! -f "$corpus/manifest.json" ]; then
    log "writing the corpus to $corpus"
    rm -rf "$corpus"
    python3 benches/checkmail/corpus.py "$corpus" --mailboxes 4 --count 500
fi

started_servers=0
stop_servers() {
    if [ "$started_servers" = 1 ]; then
        bash scripts/test-servers.sh stop >/dev/null 2>&1 || true
    fi
}
trap stop_servers EXIT
if [ ! -f "$PCR_TESTENV/env" ] || ! (. "$PCR_TESTENV/env" && exec 3<>"/dev/tcp/127.0.0.1/$PCR_IMAPS_PORT") 2>/dev/null; then
    log "test servers are not running: starting them (stopped again at the end)"
    started_servers=1
    bash scripts/test-servers.sh start >/dev/null
fi
set -a
# shellcheck disable=SC1091
. "$PCR_TESTENV/env"
set +a

python3 benches/checkmail/bench.py --so "$so" --corpus "$corpus" --work "$work" "$@"
