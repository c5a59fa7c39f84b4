#!/usr/bin/env bash
# The README's main job, on the embedded default (no mail server): builds the extension, writes
# a sample pcr360.ini (FILE transport, a local Maildir as the Service Desk mailbox) under
# target/demo/, sends a few messages of each kind and runs the System Check Email event.
#   scripts/demo.sh           run (again: the second run creates no new Inquiry)
#   scripts/demo.sh --reset   start over with a fresh sample
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$PCR_ROOT"
bash scripts/install-deps.sh --runtime
pcr_cargo_path
so="$(bash scripts/build-ext.sh --release)"
demo="$PCR_ROOT/target/demo"
if [ "${1:-}" = "--reset" ]; then
    rm -rf "$demo"
fi
mkdir -p "$demo/configs"
ini="$demo/configs/pcr360.ini"
if [ ! -f "$ini" ]; then
    cat > "$ini" <<INI
; The demo's pcr360.ini: the master account writes .eml files and reads a local Maildir.
[prod]
constants.SEND_EMAIL = true
constants.DISABLE_EMAIL = false
email.TENANTS_RECID = 0
email.ACCOUNT_TYPE = "master"
email.EMAIL = "servicedesk@pcr360.example.edu"
email.DISPLAY_NAME = "PCR-360 Service Desk"
email.OUTGOING_TRANSPORT_TYPE = "FILE"
email.INCOMING_MAILBOX_TYPE = "MAILDIR"
email.INCOMING_PATH = "../maildir"
email.SYSADMIN = "sysadmin@pcr360.example.edu"
email.LOG_FILE = "../logs/email.log"

[demo : prod]
INI
fi
# The Service Desk mailbox: a copy of the sample Maildir (first run and --reset only; later
# runs find its messages already processed). Each file gets the time in its name as its
# modification time, so the mailbox is read in the same order (oldest first) every time.
if [ ! -d "$demo/maildir" ]; then
    mkdir -p "$demo/maildir.tmp"/{new,cur,tmp}
    for f in php/examples/sample-maildir/new/*; do
        name="$(basename "$f")"
        cp "$f" "$demo/maildir.tmp/new/$name"
        touch -d "@${name%%.*}" "$demo/maildir.tmp/new/$name"
    done
    mv "$demo/maildir.tmp" "$demo/maildir"
fi
echo "Configuration: $ini"
echo
export PCR_DEMO_DB="$demo/pcr360-demo.sqlite"
php -d "extension=$so" -d "pcr_email.config=$ini" -d pcr_email.environment=demo \
    php/examples/demo-send.php
if [ -f php/examples/demo-check.php ]; then
    echo
    php -d "extension=$so" -d "pcr_email.config=$ini" -d pcr_email.environment=demo \
        php/examples/demo-check.php "$demo"
fi
