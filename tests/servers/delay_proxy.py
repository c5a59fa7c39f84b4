#!/usr/bin/env python3
"""TCP proxy adding a fixed latency in each direction (for benchmarks over a "WAN").

    delay_proxy.py --delay-ms 20 LISTEN_PORT:TARGET_HOST:TARGET_PORT [...]

Each chunk read from one side is written to the other side `delay-ms` after it was read, so
the byte stream and its order are preserved and throughput is not limited (the link is
pipelined, like a long wire). End-of-stream is forwarded after the same delay; TLS passes
through untouched.
"""

import argparse
import asyncio
import logging
import signal
import sys

log = logging.getLogger("pcr-delay-proxy")


async def pump(reader, writer, delay):
    """Copies reader -> writer, each chunk delivered `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def read_side():
        try:
            while True:
                data = await reader.read(65536)
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


async def handle(client_reader, client_writer, target_host, target_port, delay):
    try:
        # Connection setup pays one extra one-way delay, so the server's greeting reaches
        # the client one round trip after connect(), as over a real link.
        await asyncio.sleep(delay)
        up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
    except OSError as e:
        log.warning("connect to %s:%d failed: %s", target_host, target_port, e)
        client_writer.close()
        return
    try:
        await asyncio.gather(
            pump(client_reader, up_writer, delay),
            pump(up_reader, client_writer, delay),
        )
    finally:
        for w in (up_writer, client_writer):
            w.close()


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
    p.add_argument("mappings", nargs="+", type=parse_mapping)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    delay = args.delay_ms / 1000.0
    servers = []
    for listen, host, port in args.mappings:
        def cb(r, w, host=host, port=port):
            return handle(r, w, host, port, delay)
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
