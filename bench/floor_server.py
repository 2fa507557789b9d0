"""The floor: a bare `websockets` server that only reads frames (`async for message in ws: pass`).

    python bench/floor_server.py --port P

Same library, same `serve()` options as the proxy (no compression, same max_size) and the same
malloc settings (tuning.py: without them a read can cost three extra system calls, by luck of
start-up), nothing else: what any Python websocket server must spend to receive Twilio's frames. Prints
`READY <port>`; answers GET /healthz without upgrading; exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import signal
import sys
from pathlib import Path

from websockets.asyncio.server import serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tuning  # noqa: E402


async def handler(ws) -> None:
    async for _ in ws:
        pass


def process_request(connection, request):
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "ok\n")
    return None


async def main_async(port: int, max_size: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, "127.0.0.1", port, process_request=process_request,
                     compression=None, max_size=max_size) as server:
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-size", type=int, default=65_536)
    args = parser.parse_args()
    tuning.tune_allocator()
    asyncio.run(main_async(args.port, args.max_size))


if __name__ == "__main__":
    main()
