#!/usr/bin/env python3
"""Local SMTP servers for the pcr_email tests (aiosmtpd, one asyncio loop, several ports).

Listeners (each optional, all on --host):
  --starttls-port   STARTTLS required, then AUTH PLAIN/LOGIN required
  --tls-port        implicit TLS (SMTPS), AUTH required
  --wronghost-port  implicit TLS with the certificate for another host, AUTH required
  --plain-port      no TLS, no AUTH (relay-style)
  --plainauth-port  no TLS, AUTH required and allowed in clear (for SSL="" with a login)
  --xoauth2-starttls-port  STARTTLS required, then AUTH XOAUTH2/OAUTHBEARER/PLAIN/LOGIN required
  --xoauth2-tls-port       implicit TLS, AUTH XOAUTH2/OAUTHBEARER/PLAIN/LOGIN required

XOAUTH2 (Google's and Microsoft's SASL mechanism) and OAUTHBEARER (RFC 7628) check the bearer
token with --introspect-url (the cloud emulator's RFC 7662 endpoint): POST
<url>?user=<login>&service=smtp, form token=<token>; the login is accepted when the answer is
"active": true with "email" equal to the login (ignoring case). The initial response may be on
the AUTH line or follow an empty "334 " challenge. A refused token gets, as Gmail does, a
"334 <base64 JSON>" challenge ({"status":"401","schemes":"bearer","scope":
"https://mail.google.com/"} for XOAUTH2, {"status":"invalid_token"} for OAUTHBEARER); whatever
the client answers then (an empty line for XOAUTH2, "AQ==" for OAUTHBEARER) the reply is
"535 5.7.3 Authentication unsuccessful" (XOAUTH2, Exchange's wording) or "535 5.7.8
Authentication credentials invalid" (OAUTHBEARER, RFC 7628), and "*" cancels (501). Data that
is not base64 or not the mechanism's syntax: 501 5.5.2. The endpoint unreachable: 454 4.7.0.

Every accepted message is saved to <drop-dir>/<port>/<n>.eml, then <n>.json
(mail_from, rcpt_tos, auth_user, auth_mechanism, tls, ...); both are written atomically (tmp +
rename), and the .json is written last, so a message is complete once its .json exists.

Recipient behaviour by local part (case-insensitive prefix):
  reject*       550 at RCPT          tempfail*      451 at RCPT
  datafail*     554 at DATA          datatempfail*  451 at DATA
  slow*         the DATA reply is delayed by --slow-seconds
"""

import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
import signal
import ssl
import sys
import time
import urllib.parse
import urllib.request
import warnings

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

log = logging.getLogger("pcr-smtp")


def load_users(path):
    """Reads `user:password` lines (the password may contain anything but a newline)."""
    users = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if sep:
                users[user] = password
    return users


class Authenticated:
    """Who logged in (bytes, as aiosmtpd's LoginPassword) and with which mechanism."""

    def __init__(self, login, mechanism):
        self.login = login
        self.mechanism = mechanism


def local_part(address):
    addr = address.strip().strip("<>")
    return addr.rsplit("@", 1)[0].lower() if "@" in addr else addr.lower()


class DropHandler:
    """Saves accepted messages for one listener and applies the recipient rules."""

    def __init__(self, port, kind, drop_dir, slow_seconds):
        self.port = port
        self.kind = kind
        self.dir = os.path.join(drop_dir, str(port))
        os.makedirs(self.dir, exist_ok=True)
        self.slow_seconds = slow_seconds
        self.counter = self._highest_existing()

    def _highest_existing(self):
        highest = 0
        for name in os.listdir(self.dir):
            stem = name.split(".", 1)[0]
            if stem.isdigit():
                highest = max(highest, int(stem))
        return highest

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        # aiosmtpd reads commands from a buffered stream, so pipelined commands work; say so.
        responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        lp = local_part(address)
        if lp.startswith("reject"):
            return "550 5.1.1 <%s>: recipient rejected (test rule)" % address
        if lp.startswith("tempfail"):
            return "451 4.3.0 <%s>: temporary failure (test rule)" % address
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        lps = [local_part(r) for r in envelope.rcpt_tos]
        if any(lp.startswith("datatempfail") for lp in lps):
            return "451 4.3.0 message deferred (test rule)"
        if any(lp.startswith("datafail") for lp in lps):
            return "554 5.6.0 message rejected (test rule)"
        if any(lp.startswith("slow") for lp in lps):
            await asyncio.sleep(self.slow_seconds)
        self.counter += 1
        n = self.counter
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        tls = self.kind in ("tls", "wronghost", "xoauth2-tls") or \
            getattr(server, "_tls_protocol", None) is not None
        auth = getattr(session, "auth_data", None)
        login = getattr(auth, "login", None)
        meta = {
            "n": n,
            "port": self.port,
            "listener": self.kind,
            "mail_from": envelope.mail_from,
            "mail_options": list(envelope.mail_options),
            "rcpt_tos": list(envelope.rcpt_tos),
            "rcpt_options": list(envelope.rcpt_options),
            "auth_user": login.decode("utf-8", "replace") if login else None,
            "auth_mechanism": getattr(auth, "mechanism", None),
            "tls": tls,
            "helo": session.host_name,
            "peer": list(session.peer) if session.peer else None,
            "size": len(content),
            "received_at": time.time(),
        }
        self._write_atomic("%d.eml" % n, content)
        self._write_atomic("%d.json" % n, json.dumps(meta, indent=1).encode("utf-8"))
        log.info("port %s: saved message %d from %s to %s", self.port, n,
                 envelope.mail_from, envelope.rcpt_tos)
        return "250 2.0.0 OK queued as %d" % n

    def _write_atomic(self, name, data):
        tmp = os.path.join(self.dir, ".%s.tmp" % name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, name))


def parse_xoauth2(blob):
    """(login, token) of `user=<login>^Aauth=Bearer <token>^A^A`, or None."""
    fields = {}
    for part in blob.split(b"\x01"):
        if part:
            key, sep, value = part.partition(b"=")
            if not sep:
                return None
            fields[key.decode("ascii", "replace").lower()] = value
    return oauth_pair(fields.get("user"), fields.get("auth"))


def parse_oauthbearer(blob):
    """(login, token) of RFC 7628's `n,a=<login>,^Ahost=..^Aauth=Bearer <token>^A^A`."""
    gs2, sep, rest = blob.partition(b"\x01")
    if not sep or not gs2.startswith((b"n,", b"y,")) or not gs2.endswith(b","):
        return None
    login = None
    for attr in gs2[2:-1].split(b","):
        if attr.startswith(b"a="):
            login = attr[2:].replace(b"=2C", b",").replace(b"=3D", b"=")
    fields = {}
    for part in rest.split(b"\x01"):
        if part:
            key, sep, value = part.partition(b"=")
            if not sep:
                return None
            fields[key.decode("ascii", "replace").lower()] = value
    return oauth_pair(login, fields.get("auth"))


def oauth_pair(login, auth):
    if not login or not auth or not auth[:7].lower() == b"bearer ":
        return None
    token = auth[7:].strip()
    if not token:
        return None
    return login.decode("utf-8", "replace"), token.decode("utf-8", "replace")


def introspect(url, login, token):
    """The introspection answer for (login, token): True (this mailbox), False (refused), or
    raises OSError/ValueError when the endpoint cannot be asked."""
    request = urllib.request.Request(
        url + ("&" if "?" in url else "?") + urllib.parse.urlencode(
            {"user": login, "service": "smtp"}),
        data=urllib.parse.urlencode({"token": token}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        answer = json.load(reply)
    email = answer.get("email") if isinstance(answer, dict) else None
    return bool(answer.get("active") is True and isinstance(email, str) and
                email.lower() == login.lower())


class OAuthDropHandler(DropHandler):
    """A listener that offers AUTH XOAUTH2 and OAUTHBEARER besides PLAIN and LOGIN (aiosmtpd
    offers every `auth_<MECHANISM>` method of the handler)."""

    FAILURE = {
        "XOAUTH2": ({"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"},
                    "535 5.7.3 Authentication unsuccessful"),
        "OAUTHBEARER": ({"status": "invalid_token"},
                        "535 5.7.8 Authentication credentials invalid"),
    }

    def __init__(self, port, kind, drop_dir, slow_seconds, introspect_url):
        super().__init__(port, kind, drop_dir, slow_seconds)
        self.introspect_url = introspect_url

    async def auth_XOAUTH2(self, server, args):
        return await self._bearer(server, args, "XOAUTH2", parse_xoauth2)

    async def auth_OAUTHBEARER(self, server, args):
        return await self._bearer(server, args, "OAUTHBEARER", parse_oauthbearer)

    async def _bearer(self, server, args, mechanism, parse):
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:  # "*" or not base64: aiosmtpd has answered 501
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        pair = parse(blob)
        if pair is None:
            await server.push("501 5.5.2 Malformed %s authentication data" % mechanism)
            return AuthResult(success=False, handled=True)
        login, token = pair
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(None, introspect, self.introspect_url, login, token)
        except (OSError, ValueError) as e:
            log.error("AUTH %s for %r: introspection failed: %s", mechanism, login,
                      type(e).__name__)
            await server.push("454 4.7.0 Temporary authentication failure")
            return AuthResult(success=False, handled=True)
        log.info("AUTH %s for %r: %s", mechanism, login, "ok" if ok else "refused")
        if ok:
            return AuthResult(success=True,
                              auth_data=Authenticated(login.encode("utf-8"), mechanism))
        status, reply = self.FAILURE[mechanism]
        answer = await server.challenge_auth(json.dumps(status, separators=(",", ":")))
        if answer is MISSING:
            return AuthResult(success=False, handled=True)
        await server.push(reply)
        return AuthResult(success=False, handled=True)


def make_authenticator(users):
    def authenticator(server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = login in users and users[login] == password
        # Never log the password, only who tried.
        log.info("AUTH %s for %r: %s", mechanism, login, "ok" if ok else "refused")
        return AuthResult(success=ok, handled=False,
                          auth_data=Authenticated(auth_data.login, mechanism))

    return authenticator


def server_context(cert, key):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--users", required=True, help="file of user:password lines")
    p.add_argument("--drop-dir", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--other-cert", help="certificate for another host (--wronghost-port)")
    p.add_argument("--other-key")
    p.add_argument("--starttls-port", type=int)
    p.add_argument("--tls-port", type=int)
    p.add_argument("--wronghost-port", type=int)
    p.add_argument("--plain-port", type=int)
    p.add_argument("--plainauth-port", type=int)
    p.add_argument("--xoauth2-starttls-port", type=int)
    p.add_argument("--xoauth2-tls-port", type=int)
    p.add_argument("--introspect-url", help="RFC 7662 endpoint for XOAUTH2/OAUTHBEARER tokens")
    p.add_argument("--slow-seconds", type=float, default=10.0)
    p.add_argument("--data-size-limit", type=int, default=100 * 1024 * 1024)
    args = p.parse_args()

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # aiosmtpd logs every command line (including AUTH's base64 payload) at DEBUG/INFO on
    # "mail.log"; keep it at ERROR so no credential reaches the log file.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")

    users = load_users(args.users)
    authenticator = make_authenticator(users)
    ctx = server_context(args.cert, args.key)
    other_ctx = server_context(args.other_cert, args.other_key) if args.other_cert else None
    loop = asyncio.get_running_loop()

    listeners = [
        # kind, port, implicit-TLS context, SMTP keyword arguments
        ("starttls", args.starttls_port, None,
         dict(tls_context=ctx, require_starttls=True, auth_required=True, auth_require_tls=True)),
        # Implicit TLS: aiosmtpd only counts STARTTLS as TLS, so auth_require_tls must be off.
        ("tls", args.tls_port, ctx, dict(auth_required=True, auth_require_tls=False)),
        ("wronghost", args.wronghost_port, other_ctx, dict(auth_required=True, auth_require_tls=False)),
        ("plain", args.plain_port, None, dict(auth_required=False, auth_require_tls=True)),
        ("plainauth", args.plainauth_port, None, dict(auth_required=True, auth_require_tls=False)),
        ("xoauth2-starttls", args.xoauth2_starttls_port, None,
         dict(tls_context=ctx, require_starttls=True, auth_required=True, auth_require_tls=True)),
        ("xoauth2-tls", args.xoauth2_tls_port, ctx,
         dict(auth_required=True, auth_require_tls=False)),
    ]
    servers = []
    for kind, port, implicit_ctx, kwargs in listeners:
        if not port:
            continue
        if kind == "wronghost" and implicit_ctx is None:
            p.error("--wronghost-port needs --other-cert and --other-key")
        if kind.startswith("xoauth2"):
            if not args.introspect_url:
                p.error("--%s-port needs --introspect-url" % kind)
            handler = OAuthDropHandler(port, kind, args.drop_dir, args.slow_seconds,
                                       args.introspect_url)
        else:
            handler = DropHandler(port, kind, args.drop_dir, args.slow_seconds)

        def factory(handler=handler, kwargs=kwargs):
            return SMTP(handler, hostname="localhost", ident="PCR test SMTP",
                        data_size_limit=args.data_size_limit, enable_SMTPUTF8=True,
                        authenticator=authenticator, loop=loop, **kwargs)

        srv = await loop.create_server(factory, host=args.host, port=port, ssl=implicit_ctx,
                                       reuse_address=True, backlog=256)
        servers.append(srv)
        log.info("listening: %s on %s:%d", kind, args.host, port)
    if not servers:
        p.error("no listener port given")

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for srv in servers:
        srv.close()
    log.info("stopped")


if __name__ == "__main__":
    asyncio.run(main())
