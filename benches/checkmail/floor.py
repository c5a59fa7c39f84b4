#!/usr/bin/env python3
"""The floor of the check-mail benchmark: the least a client must do to download every message.

    floor.py --protocol imap|pop3 [--tls --ca CA] --host H --ports P1,P2,.. --users U1,U2,..

Passwords come from the environment (PCR_PASS_<USER LOCAL PART>, as in .testenv/env), never
the command line. All mailboxes are read in parallel (asyncio), one connection each:
- IMAP: LOGIN, SELECT INBOX, one `UID FETCH 1:* BODY.PEEK[]`, LOGOUT;
- POP3: USER/PASS, STAT, every `RETR n` sent in one write (pipelined), QUIT (no DELE).
The bytes are only framed (IMAP literals, POP3 terminators) and counted, never parsed.
Prints one JSON object: messages and bytes per mailbox, seconds.
"""

import argparse
import asyncio
import json
import os
import re
import ssl
import sys
import time

LITERAL = re.compile(rb"\{(\d+)\}\r\n$")
LIMIT = 64 * 1024 * 1024


def password(user):
    local = user.split("@", 1)[0]
    value = os.environ.get("PCR_PASS_" + local.upper())
    if not value:
        sys.exit(f"floor.py: PCR_PASS_{local.upper()} is not set")
    return value


def quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def imap_response(reader, tag):
    """Reads until the tagged completion; returns (messages, literal bytes, final line)."""
    messages = octets = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        if line.startswith(b"* ") and b" FETCH " in line[:24]:
            messages += 1
        while True:
            m = LITERAL.search(line)
            if not m:
                break
            n = int(m.group(1))
            await reader.readexactly(n)
            octets += n
            line = await reader.readuntil(b"\r\n")
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise RuntimeError(line.decode(errors="replace").strip())
            return messages, octets


async def imap_mailbox(args, port, user, ctx):
    reader, writer = await asyncio.open_connection(args.host, port, ssl=ctx, limit=LIMIT,
                                                   server_hostname=args.tls_name if ctx else None)
    await reader.readuntil(b"\r\n")  # greeting
    writer.write(f"a LOGIN {quote(user)} {quote(password(user))}\r\n".encode())
    await imap_response(reader, b"a")
    writer.write(b"b SELECT INBOX\r\n")
    await imap_response(reader, b"b")
    writer.write(b"c UID FETCH 1:* BODY.PEEK[]\r\n")
    messages, octets = await imap_response(reader, b"c")
    writer.write(b"d LOGOUT\r\n")
    await imap_response(reader, b"d")
    writer.close()
    return {"user": user, "messages": messages, "bytes": octets}


async def pop3_ok(reader):
    line = await reader.readuntil(b"\r\n")
    if not line.startswith(b"+OK"):
        raise RuntimeError(line.decode(errors="replace").strip())
    return line


async def pop3_mailbox(args, port, user, ctx):
    reader, writer = await asyncio.open_connection(args.host, port, ssl=ctx, limit=LIMIT,
                                                   server_hostname=args.tls_name if ctx else None)
    await pop3_ok(reader)  # greeting
    writer.write(f"USER {user}\r\nPASS {password(user)}\r\nSTAT\r\n".encode())
    await pop3_ok(reader)
    await pop3_ok(reader)
    count = int((await pop3_ok(reader)).split()[1])
    writer.write(b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1)))
    octets = 0
    for _ in range(count):
        await pop3_ok(reader)
        octets += len(await reader.readuntil(b"\r\n.\r\n"))
    writer.write(b"QUIT\r\n")
    await pop3_ok(reader)
    writer.close()
    return {"user": user, "messages": count, "bytes": octets}


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=["imap", "pop3"], required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ports", required=True, help="one port per mailbox, comma-separated")
    p.add_argument("--users", required=True, help="one user per mailbox, comma-separated")
    p.add_argument("--tls", action="store_true", help="implicit TLS (IMAPS/POP3S)")
    p.add_argument("--ca", help="CA file to verify the server with")
    p.add_argument("--tls-name", default="localhost", help="name to verify in the certificate")
    args = p.parse_args()
    ports = [int(x) for x in args.ports.split(",")]
    users = args.users.split(",")
    ctx = None
    if args.tls:
        ctx = ssl.create_default_context(cafile=args.ca)
    one = imap_mailbox if args.protocol == "imap" else pop3_mailbox
    started = time.monotonic()
    results = await asyncio.gather(*(one(args, port, user, ctx) for port, user in zip(ports, users)))
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": round(seconds, 4), "mailboxes": results}))


if __name__ == "__main__":
    asyncio.run(main())
