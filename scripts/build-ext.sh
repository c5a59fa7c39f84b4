#!/usr/bin/env bash
# Builds the PHP extension (the cdylib with the `php` feature) and prints the path of the .so.
#   scripts/build-ext.sh            debug build   -> target/debug/libpcr_email.so
#   scripts/build-ext.sh --release  release build -> target/release/libpcr_email.so
# (under $CARGO_TARGET_DIR instead of target/ when that is set)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
pcr_cargo_path
cd "$PCR_ROOT"
profile=debug
args=()
if [ "${1:-}" = "--release" ]; then
    profile=release
    args+=(--release)
fi
cargo build --locked --quiet "${args[@]}" --features php --lib >&2
so="${CARGO_TARGET_DIR:-$PCR_ROOT/target}/$profile/libpcr_email.so"
[ -f "$so" ] || die "build finished but $so is missing"
php -n -d "extension=$so" -r 'exit(extension_loaded("pcr_email") ? 0 : 1);' \
    || die "$so does not load into $(php -r 'echo PHP_VERSION;')"
echo "$so"
