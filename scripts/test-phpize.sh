#!/usr/bin/env bash
# The extension built as PHP extensions are installed: `phpize && ./configure && make &&
# make install` (what PIE runs) on a copy of the tree, installed under a staging root, then
# loaded by PHP. Part of scripts/test.sh. A dev (debug) cargo profile keeps it quick; the
# release profile is the configure default.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
pcr_cargo_path
cd "$PCR_ROOT"
command -v phpize >/dev/null || die "phpize not found (Debian: php8.2-dev)"
work="$(mktemp -d /tmp/pcr-phpize.XXXXXX)"
trap 'rm -rf "$work"' EXIT
# The tree as git sees it (committed and new files, not what .gitignore leaves out).
git ls-files -z --cached --others --exclude-standard | tar -C "$PCR_ROOT" --null -T - -cf - \
    | tar -C "$work" -xf -
cd "$work"
phpize >/dev/null
PCR_EMAIL_CARGO_PROFILE=dev ./configure --quiet >/dev/null
# The suite's own target dir: the dependencies are built already.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PCR_ROOT/target}"
make --quiet >/dev/null
# `make install` (often root, PIE runs it through sudo) copies what `make` built: with cargo
# replaced by `false`, it would fail if it tried to build again.
make install INSTALL_ROOT="$work/root" PCR_EMAIL_CARGO=false >/dev/null \
    || die "make install tried to build again (or failed)"
so="$work/root$(php-config --extension-dir)/pcr_email.so"
tool="$work/root$(php-config --prefix)/bin/pcr-email-encrypt"
[ -f "$so" ] || die "make install did not install $so"
[ -x "$tool" ] || die "make install did not install $tool"
out="$(php -n -d "extension=$so" -r 'echo extension_loaded("pcr_email") && class_exists("PCR_Utility_EmailManager") ? "ok" : "missing";')"
[ "$out" = ok ] || die "the installed pcr_email.so does not load: $out"
"$tool" --help >/dev/null 2>&1 || die "the installed pcr-email-encrypt does not run"
log "phpize && ./configure && make && make install: $so loads, $tool runs"
