#!/usr/bin/env python3
"""TCP proxy adding a fixed latency in each direction (for benchmarks over a "WAN").

    delay_proxy.py --delay-ms 20 [--stats FILE] LISTEN_PORT:TARGET_HOST:TARGET_PORT [...]

Each chunk read from one side is written to the other side `delay-ms` after it was read, so
the byte stream and its order are preserved and throughput is not limited (the link is
pipelined, like a long wire). End-of-stream is forwarded after the same delay; TLS passes
through untouched.

With `--stats FILE`, one JSON line per connection is appended to FILE when it closes: the
listen port, bytes each way, `round_trips`: the number of times the server started sending
after the client had sent (the connection's opening counts as the client's turn, so a greeting
counts, and so does every TLS handshake flight), as seen at the proxy; and `waits`: those of
them where the server had been silent for at least the delay before, i.e. it had nothing left
to answer and waited a whole round trip for the client (a pipelining client that sends more
commands while replies still stream in makes direction changes, not waits).
"""

import argparse
import asyncio
import json
import logging
import signal
import sys
import time

log = logging.getLogger("pcr-delay-proxy")


class ConnStats:
    """Bytes and direction changes of one proxied connection (for --stats)."""

    def __init__(self, listen, delay):
        self.listen = listen
        self.delay = delay
        self.opened = time.time()
        self.bytes = {"c2s": 0, "s2c": 0}
        self.last = "c2s"  # the client opened the connection
        self.last_s2c = None
        self.round_trips = 0
        self.waits = 0

    def saw(self, direction, n):
        now = time.monotonic()
        self.bytes[direction] += n
        if direction != self.last:
            if direction == "s2c":
                self.round_trips += 1
                if self.last_s2c is None or now - self.last_s2c >= self.delay:
                    self.waits += 1
            self.last = direction
        if direction == "s2c":
            self.last_s2c = now

    def record(self, path):
        line = json.dumps({"listen": self.listen, "opened": round(self.opened, 3),
                           "seconds": round(time.time() - self.opened, 3),
                           "c2s_bytes": self.bytes["c2s"], "s2c_bytes": self.bytes["s2c"],
                           "round_trips": self.round_trips, "waits": self.waits})
        with open(path, "a") as f:
            f.write(line + "\n")


async def pump(reader, writer, delay, stats=None, direction=None):
    """Copies reader -> writer, each chunk delivered `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def read_side():
        try:
            while True:
                data = await reader.read(65536)
                if stats is not None and data:
                    stats.saw(direction, len(data))
                queue.put_nowait((loop.time() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            queue.put_nowait((loop.time() + delay, b""))

    reading = asyncio.ensure_future(read_side())
    try:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()


async def handle(client_reader, client_writer, target_host, target_port, delay, listen=None, stats_path=None):
    try:
        # Connection setup pays one extra one-way delay, so the server's greeting reaches
        # the client one round trip after connect(), as over a real link.
        await asyncio.sleep(delay)
        up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
    except OSError as e:
        log.warning("connect to %s:%d failed: %s", target_host, target_port, e)
        client_writer.close()
        return
    stats = ConnStats(listen, delay) if stats_path else None
    try:
        await asyncio.gather(
            pump(client_reader, up_writer, delay, stats, "c2s"),
            pump(up_reader, client_writer, delay, stats, "s2c"),
        )
    finally:
        for w in (up_writer, client_writer):
            w.close()
        if stats is not None:
            stats.record(stats_path)


def parse_mapping(text):
    try:
        listen, host, port = text.split(":")
        return int(listen), host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError("expected LISTEN_PORT:TARGET_HOST:TARGET_PORT, got %r" % text)


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--delay-ms", type=float, required=True, help="latency added in each direction")
    p.add_argument("--stats", metavar="FILE", help="append one JSON line per closed connection to FILE")
    p.add_argument("mappings", nargs="+", type=parse_mapping)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    delay = args.delay_ms / 1000.0
    servers = []
    for listen, host, port in args.mappings:
        def cb(r, w, host=host, port=port, listen=listen):
            return handle(r, w, host, port, delay, listen, args.stats)
        servers.append(await asyncio.start_server(cb, args.host, listen, reuse_address=True, backlog=256))
        log.info("%s:%d -> %s:%d (+%gms each way)", args.host, listen, host, port, args.delay_ms)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    asyncio.run(main())
