#!/usr/bin/env bash
# The PHP-level tests: load the built extension into Debian's PHP and drive the public API as
# PCR-360 code would (PHPUnit). Needs the test servers (scripts/test-servers.sh start) for the
# SMTP/sendmail/IMAP/POP3 cases; scripts/test.sh runs everything in order.
#   php/run-tests.sh [path/to/libpcr_email.so] [phpunit args...]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$PCR_ROOT"
so="${1:-}"
if [ -n "$so" ] && [ -f "$so" ]; then
    shift
else
    so="$(scripts/build-ext.sh)"
fi
if [ -f "$PCR_TESTENV/env" ]; then
    # shellcheck disable=SC1091
    . "$PCR_TESTENV/env"
fi
export PCR_EMAIL_SO="$so"
exec php -d "extension=$so" -d memory_limit=512M -d error_reporting=-1 -d display_errors=stderr \
    /usr/bin/phpunit --configuration php/phpunit.xml "$@"
