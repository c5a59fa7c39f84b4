# Shared paths and helpers for the test scripts (sourced, not executed).
# shellcheck shell=bash

PCR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PCR_TESTENV="$PCR_ROOT/.testenv"
PCR_VENV="$PCR_ROOT/.venv"
PCR_SERVERS_SRC="$PCR_ROOT/tests/servers"

# Pinned Python test-server dependencies (also listed in tests/servers/requirements.txt).
PCR_AIOSMTPD_VERSION="1.4.6"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# Make rustup's cargo visible in non-login shells (CI runs `bash .ci/run`).
pcr_cargo_path() {
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
}
