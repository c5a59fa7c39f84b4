#!/usr/bin/env bash
# THE test command (README; CI runs it through .ci/run): on Debian 12 as root, from a fresh
# clone or an already prepared machine. Installs what is missing, builds, starts the local
# test servers (stopped again on exit), then runs every check; exits non-zero if any fails.
#   PCR_KEEP_SERVERS=1 scripts/test.sh    leave the test servers running afterwards
set -uo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$PCR_ROOT" || exit 1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}" RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

FAILED=()
step_start=0
begin() { step_start=$SECONDS; printf '\n==== %s\n' "$1"; }
end() { printf '==== %s: %s (%ss)\n' "$1" "$2" "$((SECONDS - step_start))"; }
# run_step <name> <command...>: a failed step is recorded; the later steps still run.
run_step() {
    local name="$1"
    shift
    begin "$name"
    if "$@"; then
        end "$name" ok
    else
        end "$name" FAILED
        FAILED+=("$name")
    fi
}
# fatal_step <name> <command...>: nothing after it makes sense if this fails.
fatal_step() {
    local name="$1"
    shift
    begin "$name"
    "$@" || { end "$name" FAILED; die "$name failed; stopping"; }
    end "$name" ok
}

check_toolchain() {
    pcr_cargo_path
    command -v cargo >/dev/null || die "cargo not found (Rust 1.95 with rustfmt and clippy is required)"
    cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
    cargo --version
}

stop_servers() {
    if [ "${PCR_KEEP_SERVERS:-0}" = 1 ]; then
        log "test servers left running (PCR_KEEP_SERVERS=1); stop: scripts/test-servers.sh stop"
    else
        bash scripts/test-servers.sh stop
    fi
}

php_tests() {
    local so
    so="$(bash scripts/build-ext.sh)" || return 1
    bash php/run-tests.sh "$so"
}

fatal_step "install dependencies" bash scripts/install-deps.sh
fatal_step "toolchain" check_toolchain
fatal_step "build" cargo build --locked --all-targets
trap stop_servers EXIT
trap 'exit 130' INT TERM
fatal_step "start test servers" bash scripts/test-servers.sh start
# shellcheck disable=SC1091
. "$PCR_TESTENV/env"

run_step "cargo fmt --check" cargo fmt --all -- --check
run_step "cargo clippy" cargo clippy --locked --all-targets -- -D warnings
run_step "cargo clippy (php boundary)" cargo clippy --locked --features php --lib -- -D warnings
run_step "cargo test" cargo test --locked
run_step "PHP extension + PHP tests" php_tests
run_step "phpize && configure && make install" bash scripts/test-phpize.sh

echo
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'FAILED steps: %s\n' "$(IFS=,; echo "${FAILED[*]}")"
    exit 1
fi
echo "all checks passed"
