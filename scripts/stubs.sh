#!/usr/bin/env bash
# Regenerates stubs/pcr_email.stub.php from the built extension (PHP's Reflection of the .so).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$PCR_ROOT"
so="${1:-$(scripts/build-ext.sh)}"
mkdir -p stubs
php -d "extension=$so" php/gen-stubs.php > stubs/pcr_email.stub.php.tmp
mv stubs/pcr_email.stub.php.tmp stubs/pcr_email.stub.php
echo "stubs/pcr_email.stub.php"
