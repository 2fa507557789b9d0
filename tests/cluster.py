"""Real processes for the scale-out tests: Debian's `redis-server` and `server.py`, on free ports.

Each server process is the real program (`python server.py`), configured by environment
variables as an operator would, in front of a Deepgram-compatible server (`local_stt.LocalSTT`)
that runs in the test's event loop, so a test can compare what reached "Deepgram" with what
every subscriber received.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect

from conftest import LISTEN_QUERY, STT_KEY, wait_for
from test_integration import _http_get, metric_values
from speech import require_program

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """Debian's redis-server on 127.0.0.1, no persistence (a restart loses everything, as a crash would)."""

    def __init__(self, tmp: Path, port: int = 0, password: str | None = None):
        self.port = port or free_port()
        self.password = password
        self.tmp = tmp
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [require_program("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.tmp)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: what a crash looks like; everything in memory is gone."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class ServerProcess:
    """`python server.py` with the given settings, on a free port, logging to a file."""

    def __init__(self, tmp: Path, name: str, stt_url: str, redis_url: str | None, port: int = 0, **settings):
        self.name = name
        self.port = port or free_port()
        self.log_path = tmp / f"{name}.log"
        self.env = {k: v for k, v in os.environ.items() if k not in ("DEEPGRAM_API_KEY", "DEEPGRAM_URL", "REDIS_URL")}
        self.env.update({
            "PROXY_URL": f"127.0.0.1:{self.port}", "STT_ENGINE": "deepgram", "DEEPGRAM_API_KEY": STT_KEY,
            "DEEPGRAM_URL": f"{stt_url}?{LISTEN_QUERY}", "LOG_LEVEL": "INFO", "REDIS_HEARTBEAT_SECONDS": "0.3",
            "DEEPGRAM_CLOSE_TIMEOUT": "5", "SHUTDOWN_TIMEOUT": "15",
        })
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        self.env.update({k: str(v) for k, v in settings.items()})
        self.tmp = tmp
        self.process: subprocess.Popen | None = None

    async def start(self) -> "ServerProcess":
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=self.tmp, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        await wait_for(self.healthy, timeout=30, what=f"{self.name} up")
        return self

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()}")
        try:
            return _http_get(self.port, "/healthz") == "ok\n"
        except OSError:
            return False

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def metrics(self) -> dict[str, float]:
        return await metric_values(self.port)

    async def greeting(self) -> list[str]:
        """The calls in progress as a new /client connection is told them."""
        async with connect(self.url("/client")) as ws:
            return json.loads(await ws.recv())

    async def wait_listed(self, call_sid: str, listed: bool = True, timeout: float = 10.0) -> float:
        """Until the greeting does (or no longer does) list the call; returns the seconds it took."""
        started = time.monotonic()
        while (call_sid in await self.greeting()) != listed:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{self.name}: {call_sid} {'not ' if listed else ''}listed after {timeout} s")
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def terminate(self, timeout: float = 40.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()



class Cluster:
    """One Redis, one Deepgram-compatible server, and any number of server processes."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.stt = None
        self.servers: list[ServerProcess] = []

    async def start(self, window: float = 0.1) -> "Cluster":
        import functools

        from local_stt import DeterministicEngine, LocalSTT

        self.redis.start()
        self.stt = LocalSTT(api_key=STT_KEY, engine_factory=functools.partial(DeterministicEngine, window=window))
        await self.stt.start()
        return self

    async def server(self, name: str, *, redis: bool = True, **settings) -> ServerProcess:
        server = ServerProcess(self.tmp, name, self.stt.url, self.redis.url if redis else None, **settings)
        self.servers.append(server)
        return await server.start()

    def messages(self, record) -> list[str]:
        """What one recogniser connection sent, in order."""
        return [text for _, text in record.sent]

    async def close(self) -> None:
        for server in self.servers:
            await asyncio.to_thread(server.close)
        if self.stt is not None:
            await self.stt.stop()
        self.redis.stop()
