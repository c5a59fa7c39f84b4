#!/usr/bin/env python3
"""A TCP server that accepts connections and never sends a byte (for timeout tests).

Whatever the client sends is read and discarded so its writes never block; the connection
stays open until the client closes it.
"""

import argparse
import asyncio
import signal


async def swallow(reader, writer):
    try:
        while await reader.read(65536):
            pass
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    server = await asyncio.start_server(swallow, args.host, args.port, reuse_address=True, backlog=256)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
