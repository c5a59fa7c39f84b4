#!/usr/bin/env python3
"""Writes the check-mail benchmark's corpus: MAILBOXES directories of COUNT messages each.

    corpus.py OUT_DIR [--mailboxes 4] [--count 500] [--seed 360]

Deterministic for a given seed. Message sizes follow what a service desk mailbox receives:
mostly text + HTML alternatives of a few KB to ~40 KB (signatures, quoted threads), about one
in twelve with a base64 attachment of 30-300 KB (screenshots, PDFs; random, incompressible
bytes). The mean is about 31 KB, so 4 x 500 messages are about 61 MB. Every message is an
ordinary human request (no SD number, no auto-reply header, a unique Message-ID), so each one
must become exactly one Inquiry.

Files are Maildir names with Dovecot's `,S=<size>` (the size with LF line endings, as stored),
sorted oldest first; OUT_DIR/<n>/ holds mailbox n (1-based) and OUT_DIR/manifest.json sizes.
"""

import argparse
import base64
import json
import os
import random

WORDS = (
    "phone line desk voicemail extension building room floor network jack port switch outage "
    "printer projector wifi access point badge cable fiber closet conference bridge license "
    "account password reset laptop monitor dock headset ticket request urgent please thanks "
    "morning afternoon tomorrow schedule move install replace broken noisy slow dropped calls "
    "forwarding hunt group queue department office lab lecture hall library campus north south "
    "east west annex basement roof quote invoice purchase order approval budget vendor contract"
).split()
FIRST = "ada grace alan katherine dorothy linus barbara edsger margaret donald frances john".split()
LAST = "lovelace hopper turing johnson vaughan torvalds liskov dijkstra hamilton knuth allen".split()
BASE_TIME = 1741683600  # 2025-03-11 09:00 UTC


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def paragraph_block(rng, size):
    """Plain text of about `size` bytes, wrapped at ~72 columns."""
    lines, total = [], 0
    while total < size:
        line = words(rng, rng.randint(9, 13))
        line = line[:1].upper() + line[1:] + "."
        lines.append(line)
        total += len(line) + 1
        if rng.random() < 0.15:
            lines.append("")
    return "\n".join(lines) + "\n"


def b64_lines(data):
    s = base64.b64encode(data).decode()
    return "\n".join(s[i:i + 76] for i in range(0, len(s), 76))


def message(rng, mailbox, n, stamp):
    first, last = rng.choice(FIRST), rng.choice(LAST)
    sender = f"{first}.{last}{rng.randint(1, 99)}@example.edu"
    subject = words(rng, rng.randint(3, 8)).capitalize()
    text_size = int(min(60000, max(1500, rng.lognormvariate(8.5, 0.6))))
    text = f"Hello Service Desk,\n\n{paragraph_block(rng, text_size)}\nRegards,\n{first.title()} {last.title()}\n"
    html = "<html><body>" + "".join(
        f"<p>{p}</p>" for p in text.split("\n\n") if p.strip()) + "</body></html>\n"
    date = stamp
    headers = (
        f"Return-Path: <{sender}>\n"
        f"Received: from mail.example.edu (mail.example.edu [192.0.2.10])\n\tby mx.test.local; {date}\n"
        f"Date: {date}\n"
        f"From: {first.title()} {last.title()} <{sender}>\n"
        f"To: Service Desk <bench{mailbox}@test.local>\n"
        f"Subject: {subject}\n"
        f"Message-ID: <bench.{mailbox}.{n}.{rng.getrandbits(48):012x}@example.edu>\n"
        "MIME-Version: 1.0\n"
    )
    alternative = (
        "Content-Type: multipart/alternative; boundary=\"alt-{b}\"\n\n"
        "--alt-{b}\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{text}\n"
        "--alt-{b}\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{html}\n"
        "--alt-{b}--\n"
    ).format(b=f"{mailbox}-{n}", text=text, html=html)
    if rng.random() < 1 / 12:
        size = rng.randint(30_000, 300_000)
        name = rng.choice(["screenshot.png", "quote.pdf", "floor-plan.pdf", "photo.jpg"])
        ctype = {"png": "image/png", "pdf": "application/pdf", "jpg": "image/jpeg"}[name.rsplit(".", 1)[1]]
        body = (
            f"Content-Type: multipart/mixed; boundary=\"mix-{mailbox}-{n}\"\n\n"
            f"--mix-{mailbox}-{n}\n{alternative}\n"
            f"--mix-{mailbox}-{n}\nContent-Type: {ctype}; name=\"{name}\"\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\nContent-Transfer-Encoding: base64\n\n"
            f"{b64_lines(rng.randbytes(size))}\n--mix-{mailbox}-{n}--\n"
        )
    else:
        body = alternative
    return (headers + body).encode()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--mailboxes", type=int, default=4)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--seed", type=int, default=360)
    args = p.parse_args()
    import email.utils
    manifest = {"seed": args.seed, "mailboxes": {}}
    for mailbox in range(1, args.mailboxes + 1):
        rng = random.Random(args.seed * 1000 + mailbox)
        out = os.path.join(args.out, str(mailbox))
        os.makedirs(out, exist_ok=True)
        sizes = []
        for n in range(1, args.count + 1):
            t = BASE_TIME + n * 60
            raw = message(rng, mailbox, n, email.utils.formatdate(t))
            name = f"{t}.M{n:06d}P{mailbox}.bench,S={len(raw)}"
            with open(os.path.join(out, name), "wb") as f:
                f.write(raw)
            sizes.append(len(raw))
        manifest["mailboxes"][str(mailbox)] = sizes
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    every = [s for v in manifest["mailboxes"].values() for s in v]
    print(f"{len(every)} messages, {sum(every) / 1e6:.1f} MB, mean {sum(every) / len(every) / 1e3:.1f} KB, "
          f"largest {max(every) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
