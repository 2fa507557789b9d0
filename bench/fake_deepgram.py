"""The benchmark's Deepgram: `local_stt.LocalSTT` (deterministic engine) in its own process.

    python bench/fake_deepgram.py --port P --api-key K --window-ms 1000 --dump OUT.pickle

Prints `READY <port>` once listening. On SIGTERM (or SIGINT) it stops and writes, per
connection, what the benchmark needs to compute latencies, then exits:
  sig       the first 8 bytes of channel 0 (the load generator puts the call's index there)
  arrivals  [(time.monotonic(), nbytes)] per binary frame received
  sent      [(time.monotonic(), blake2b-8 digest of the text)] per message sent
Every time is CLOCK_MONOTONIC, comparable with the other benchmark processes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import logging
import pickle
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local_stt import DeterministicEngine, Faults, LocalSTT  # noqa: E402


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def dump(stt: LocalSTT, path: str) -> None:
    out = []
    for record in stt.connections:
        out.append({
            "sig": bytes(record.audio[0][:8]) if record.audio else b"",
            "opened": record.opened,
            "closed": record.closed,
            "arrivals": record.arrivals,
            "sent": [(t, digest(text)) for t, text in record.sent],
            "bytes": len(record.raw),
            "close_code": record.close_code,
        })
    with open(path, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)


async def main_async(args: argparse.Namespace) -> None:
    # A long idle timeout: calls are opened well before the benchmark's media starts flowing.
    faults = Faults(idle_timeout=args.idle_timeout)
    factory = functools.partial(DeterministicEngine, window=args.window_ms / 1000)
    stt = LocalSTT("127.0.0.1", args.port, args.api_key, factory, faults)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with stt:
        print(f"READY {stt.port}", flush=True)
        await stop.wait()
    dump(stt, args.dump)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="bench-key")
    parser.add_argument("--window-ms", type=int, default=1000)
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    parser.add_argument("--dump", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
