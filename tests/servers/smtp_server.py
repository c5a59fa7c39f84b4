#!/usr/bin/env python3
"""Local SMTP servers for the pcr_email tests (aiosmtpd, one asyncio loop, several ports).

Listeners (each optional, all on --host):
  --starttls-port   STARTTLS required, then AUTH PLAIN/LOGIN required
  --tls-port        implicit TLS (SMTPS), AUTH required
  --wronghost-port  implicit TLS with the certificate for another host, AUTH required
  --plain-port      no TLS, no AUTH (relay-style)
  --plainauth-port  no TLS, AUTH required and allowed in clear (for SSL="" with a login)

Every accepted message is saved to <drop-dir>/<port>/<n>.eml, then <n>.json
(mail_from, rcpt_tos, auth_user, tls, ...); both are written atomically (tmp + rename), and the
.json is written last, so a message is complete once its .json exists.

Recipient behaviour by local part (case-insensitive prefix):
  reject*       550 at RCPT          tempfail*      451 at RCPT
  datafail*     554 at DATA          datatempfail*  451 at DATA
  slow*         the DATA reply is delayed by --slow-seconds
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import time
import warnings

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

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
        tls = self.kind in ("tls", "wronghost") or getattr(server, "_tls_protocol", None) is not None
        auth = getattr(session, "auth_data", None)
        login = auth.login if isinstance(auth, LoginPassword) else None
        meta = {
            "n": n,
            "port": self.port,
            "listener": self.kind,
            "mail_from": envelope.mail_from,
            "mail_options": list(envelope.mail_options),
            "rcpt_tos": list(envelope.rcpt_tos),
            "rcpt_options": list(envelope.rcpt_options),
            "auth_user": login.decode("utf-8", "replace") if login else None,
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


def make_authenticator(users):
    def authenticator(server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = login in users and users[login] == password
        # Never log the password, only who tried.
        log.info("AUTH %s for %r: %s", mechanism, login, "ok" if ok else "refused")
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

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
    ]
    servers = []
    for kind, port, implicit_ctx, kwargs in listeners:
        if not port:
            continue
        if kind == "wronghost" and implicit_ctx is None:
            p.error("--wronghost-port needs --other-cert and --other-key")
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
