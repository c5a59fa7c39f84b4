#!/usr/bin/env python3
"""Dovecot checkpassword program: SASL XOAUTH2 / OAUTHBEARER logins of the test Dovecot.

    dovecot_oauth_check.py <introspection url> [<reply program>]

Dovecot 2.3 runs it for each XOAUTH2 or OAUTHBEARER login (passdb checkpassword restricted to
those mechanisms, which hand the bearer token over as the password): fd 3 holds
``<login>\\0<token>\\0\\0``, ``SERVICE`` the protocol (imap, pop3). It asks the cloud emulator's
RFC 7662 introspection endpoint: ``POST <url>?user=<login>&service=<service>`` with the form
``token=<token>``. The login succeeds when the answer is ``"active": true`` with an ``email``
equal to the login (ignoring case), as Dovecot's oauth2 passdb does with
``username_attribute = email`` and ``active_attribute = active``: then it writes
``user=<email>`` to fd 4 (the canonical spelling becomes the login, so the mailbox path is
right) and exits 0. Otherwise it exits 1, and Dovecot answers with the mechanism's failure
challenge (XOAUTH2: ``{"status":"401","schemes":"bearer","scope":"mail"}``, OAUTHBEARER:
``{"status":"invalid_token"}``) and then NO / -ERR. When the endpoint cannot be asked (down,
an HTTP error, not JSON) it exits 111: a temporary failure (IMAP ``NO [UNAVAILABLE]``).

Why not Dovecot's own oauth2 passdb: in Dovecot 2.3.19 (Debian 12) ``introspection_url`` is
not variable-expanded (a ``%u`` in it makes the auth process panic), so it cannot tell the
endpoint which mailbox an app-only token is presented for.

The token is never written anywhere (Dovecot limits login + token to 512 bytes; the
emulator's tokens are far shorter).
"""

import json
import os
import socket
import sys
import urllib.parse

FAIL = 1
TEMPFAIL = 111


def post_form(url, form):
    """POST a form over plain HTTP/1.0 and parse the JSON answer (raw sockets: urllib would
    add 0.2 s of imports to every login). Raises OSError or ValueError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("only http:// URLs are supported")
    body = urllib.parse.urlencode(form).encode()
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    head = ("POST %s HTTP/1.0\r\nHost: %s\r\nContent-Type: application/x-www-form-urlencoded"
            "\r\nContent-Length: %d\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
            % (target, parts.netloc, len(body))).encode()
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=10) as sock:
        sock.sendall(head + body)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    header, sep, payload = raw.partition(b"\r\n\r\n")
    status_line = header.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[1].isdigit():
        raise ValueError("not an HTTP response")
    status = int(status_line[1])
    if status != 200:
        raise OSError("HTTP status %d" % status)
    return json.loads(payload)


def main():
    if len(sys.argv) < 2:
        sys.stderr.write("dovecot_oauth_check: usage: %s <introspection url> [reply]\n"
                         % sys.argv[0])
        return TEMPFAIL
    url = sys.argv[1]
    try:
        with os.fdopen(3, "rb") as f:
            data = f.read(4096)
    except OSError as e:
        sys.stderr.write("dovecot_oauth_check: cannot read fd 3: %s\n" % e)
        return TEMPFAIL
    parts = data.split(b"\0")
    if len(parts) < 2:
        return FAIL
    login = parts[0].decode("utf-8", "replace")
    token = parts[1].decode("utf-8", "replace")
    if not login or not token:
        return FAIL
    query = urllib.parse.urlencode({"user": login, "service": os.environ.get("SERVICE", "")})
    try:
        answer = post_form(url + ("&" if "?" in url else "?") + query, {"token": token})
    except (OSError, ValueError) as e:
        # Never the token: only where and why.
        sys.stderr.write("dovecot_oauth_check: introspection at %s failed: %s\n"
                         % (url, type(e).__name__ + ": " + str(e)[:200]))
        return TEMPFAIL
    if not isinstance(answer, dict) or answer.get("active") is not True:
        return FAIL
    email = answer.get("email")
    if not isinstance(email, str) or not email or email.lower() != login.lower() or \
            "\t" in email or "\n" in email:
        return FAIL
    try:
        os.write(4, ("user=%s\t" % email).encode("utf-8"))
    except OSError as e:
        sys.stderr.write("dovecot_oauth_check: cannot write fd 4: %s\n" % e)
        return TEMPFAIL
    return 0


if __name__ == "__main__":
    sys.exit(main())
