#!/usr/bin/env bash
# Creates the test PKI in $1 (idempotent; regenerated when missing or expiring):
#   ca.pem/ca.key          a test CA
#   server.pem/server.key  for DNS:localhost and IP:127.0.0.1, signed by the CA
#   other.pem/other.key    for DNS:other.example only, signed by the same CA
set -euo pipefail
dir="${1:?usage: gen-certs.sh <dir>}"
mkdir -p "$dir"
cd "$dir"

valid() {
    local f
    for f in ca.pem ca.key server.pem server.key other.pem other.key; do
        [ -s "$f" ] || return 1
    done
    for f in ca.pem server.pem other.pem; do
        openssl x509 -in "$f" -noout -checkend 86400 >/dev/null 2>&1 || return 1
    done
    openssl verify -CAfile ca.pem server.pem other.pem >/dev/null 2>&1
}
valid && exit 0

umask 077
rm -f ./*.pem ./*.key ./*.csr ./*.ext ./*.srl

openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -keyout ca.key -out ca.pem -subj "/O=PCR Email Tests/CN=PCR Email Test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null

leaf() { # leaf <name> <CN> <subjectAltName>
    local name="$1" cn="$2" san="$3"
    openssl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$name.key" -out "$name.csr" \
        -subj "/O=PCR Email Tests/CN=$cn" 2>/dev/null
    cat >"$name.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=$san
EXT
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
        -days 825 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}
leaf server localhost "DNS:localhost,IP:127.0.0.1"
leaf other other.example "DNS:other.example"
rm -f ca.srl
# Certificates are public; keys stay private (dovecot and the servers run as this user).
chmod 644 ca.pem server.pem other.pem
chmod 600 ca.key server.key other.key
valid || { echo "gen-certs.sh: generated certificates do not verify" >&2; exit 1; }
