"""The Docker image, built from the repository's Dockerfile and run with podman: README "Docker".

The image is built on a Debian base made here (`container.base_tarball()`), started on a network
that reaches nothing but its published port (`container.isolated_network()`), configured the way
the README says (`--env-file`, credentials required on 0.0.0.0), and driven from the host as
Twilio and a subscriber would: `simulate.py` plays real speech, `websocat` subscribes. The
recogniser is whatever the image uses by default without a Deepgram key, so the test checks words
and message shapes, not one engine's output.

Needs root, podman, runc, mmdebstrap and iptables (`make test` installs them). Skipped without
them on a developer's machine, failed under CI. Build time and image size are printed at the end
of the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import container
from conftest import websocat_path
from speech import SENTENCES, require_program, speak

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/twilio-transcribe:test"
BASE_IMAGE = "localhost/twilio-transcribe-base:local"
PACKAGE_INDEX = ("pypi.org", 443)  # where the Dockerfile's pip install goes
SHUTDOWN_TIMEOUT = 10
CLIENT_TOKEN = "container-test-subscriber-token"
CALL_TOKEN = "container-test-call-token"
SECURE_SETTINGS = {  # what README "Security" asks for on 0.0.0.0, minus Twilio signatures
    "CLIENT_TOKENS": CLIENT_TOKEN,
    "CALL_TOKEN": CALL_TOKEN,
    "SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
}


def _require_tools() -> None:
    for program in ("podman", "runc", "mmdebstrap", "iptables"):
        require_program(program)
    if os.geteuid() != 0:
        message = "the container test needs root (rootful podman, firewall rules)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class Deployment:
    """The built image, and the containers started from it on the isolated network."""

    def __init__(self, podman: container.Podman, network: container.Network):
        self.podman = podman
        self.network = network

    def start(self, name: str, settings: dict[str, str]) -> "Running":
        env_file = self.podman.folder / f"{name}.env"
        env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        self.podman("run", "--detach", "--name", name, "--network", self.network.name,
                    "--publish", "127.0.0.1::5000", "--env-file", str(env_file), IMAGE)
        address = self.podman("port", name, "5000/tcp").stdout.strip()  # 127.0.0.1:PORT
        running = Running(self.podman, name, int(address.rsplit(":", 1)[1]))
        running.wait_until_up()
        return running


class Running:
    def __init__(self, podman: container.Podman, name: str, port: int):
        self.podman, self.name, self.port = podman, name, port

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_until_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/healthz") == (200, "ok\n"):
                    return
            except OSError:
                pass
            if self.podman.inspect(self.name, "{{.State.Running}}") != "true":
                break
            time.sleep(0.2)
        raise AssertionError(f"container {self.name} did not come up:\n{self.logs()}")

    async def wait_for_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the logs of {self.name}:\n{self.logs()}")
            await asyncio.sleep(0.1)

    def stop(self, grace: int) -> tuple[int, float]:
        """`podman stop` (SIGTERM, SIGKILL after `grace` seconds): (exit code, seconds taken)."""
        started = time.monotonic()
        self.podman("stop", "--time", str(grace), self.name, timeout=grace + 30)
        seconds = time.monotonic() - started
        return int(self.podman.inspect(self.name, "{{.State.ExitCode}}")), seconds


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, pytestconfig):
    """Build the image once for this module; storage, network and firewall rules removed after."""
    _require_tools()
    report = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    with container.exclusive():
        container.remove_firewall_rules()  # left by a run that was killed
        podman = container.Podman(tmp_path_factory.mktemp("podman"))
        try:
            tarball, base_seconds = container.base_tarball()
            podman("import", *(f"--change={change}" for change in container.BASE_CHANGES),
                   str(tarball), BASE_IMAGE, timeout=300)
            started = time.monotonic()
            podman("build", "--format", "docker", "--network", "host", "--pull=never",  # docker: keeps HEALTHCHECK
                   "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--tag", IMAGE, str(ROOT), timeout=1800)
            build_seconds = time.monotonic() - started
            size = int(podman.inspect(IMAGE, "{{.Size}}"))
            base = f"made in {base_seconds:.0f} s" if base_seconds else "cached"
            with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
                report.ensure_newline()
                report.write_line(f"container image: built in {build_seconds:.0f} s on the Debian base "
                                  f"({base}), {size / 1e6:.0f} MB")
            with container.isolated_network(podman, "isolated") as network:
                yield Deployment(podman, network)
        finally:
            podman.remove()


@pytest.fixture(scope="module")
def server(deployment):
    """One container with the README's production settings (credentials from --env-file)."""
    running = deployment.start("server", SECURE_SETTINGS)
    yield running
    running.stop(grace=SHUTDOWN_TIMEOUT + 10)


# --- the image ---------------------------------------------------------------------------------


def test_image_has_the_application_and_flite_and_leaves_out_tests_venvs_and_git(server):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = sorted({path.split("/")[0] for path in tracked.stdout.split()
                      if path.endswith(".py") and not path.startswith(("tests/", "bench/"))})
    listing = server.podman("exec", server.name, "ls", "-A", "/app").stdout.split()
    assert set(modules) <= set(listing), set(modules) - set(listing)
    assert {"LICENSE", "requirements.txt"} <= set(listing)
    assert not {"tests", "bench", ".git", ".venv", ".env", ".ci", "__pycache__", "docs"} & set(listing), listing
    # The dashboard's files (web/), every one, and the server in the container serves them.
    assets = sorted(path for path in tracked.stdout.split() if path.startswith("web/"))
    in_image = server.podman("exec", server.name, "find", "web", "-type", "f").stdout.split()
    assert assets and sorted(in_image) == assets
    status, page = server.get("/")
    assert status == 200 and page == (ROOT / "web" / "index.html").read_text()
    assert (ROOT / ".git").exists() and (ROOT / "tests").is_dir()  # so leaving them out was tested
    # The embedded agent's voice: flite speaks inside the image.
    server.podman("exec", server.name, "flite", "-t", "hello", "-o", "/tmp/hello.wav")
    size = server.podman("exec", server.name, "stat", "-c", "%s", "/tmp/hello.wav").stdout
    assert int(size) > 8000  # more than a header: a quarter second of 16 kHz audio at least


def test_dockerignore_keeps_secrets_tests_and_venvs_out_and_lets_new_packages_and_assets_in(deployment, tmp_path):
    """The repository's .dockerignore, applied by the builder to a made-up working copy."""
    kept = ["server.py", "LICENSE", "requirements.txt", "agent/__init__.py", "agent/voice.py",
            "dashboard/static/app.js", "dashboard/index.html", "web/app.js", "web/favicon.svg"]
    left_out = [".env", ".env.production", "tls/key.pem", "agent/cert.pem", "tests/test_server.py",
                "bench/bench.py", ".venv/bin/python", "venv/pyvenv.cfg", ".git/HEAD", ".ci/run",
                "agent/__pycache__/voice.cpython-311.pyc", "__pycache__/server.cpython-311.pyc", "call.wav",
                "node_modules/left-pad/index.js", ".pytest_cache/README.md", "Makefile", "Dockerfile",
                "docs/dashboard.png", "test-artifacts/dashboard.png"]
    context = tmp_path / "context"
    for name in kept + left_out:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(name)
    (context / ".dockerignore").write_text((ROOT / ".dockerignore").read_text())
    (context / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY . /context/\n")
    deployment.podman("build", "--pull=never", "--tag", "localhost/dockerignore:test", str(context))
    listing = deployment.podman("run", "--rm", "localhost/dockerignore:test", "find", "/context", "-type", "f")
    copied = sorted(path.removeprefix("/context/") for path in listing.stdout.split())
    assert copied == sorted(kept)


def test_healthz_readyz_and_the_image_healthcheck(server):
    assert server.get("/healthz") == (200, "ok\n")
    assert server.get("/readyz")[0] == 200
    assert server.podman("healthcheck", "run", server.name, check=False).returncode == 0
    assert server.podman.inspect(server.name, "{{.State.Health.Status}}") == "healthy"


def test_the_server_runs_as_an_unprivileged_user(server):
    pid = server.podman.inspect(server.name, "{{.State.Pid}}")  # as the host's kernel sees it
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    uids = [int(uid) for uid in status["Uid"].split()]  # real, effective, saved, filesystem
    gids = [int(gid) for gid in status["Gid"].split()]
    assert min(uids) > 0 and min(gids) > 0, status["Uid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:2] == [b"python", b"server.py"], cmdline


def test_the_container_reaches_nothing_but_answers_on_its_published_port(server, deployment):
    """The host's own ports on the bridge (IPv4 and IPv6) and the package index answer the host,
    not the container; the container has no name resolution either."""
    gateway = deployment.network.gateway
    index_ip = socket.getaddrinfo(*PACKAGE_INDEX, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    interface = deployment.network.interface
    listeners, targets = [], {"package index": (index_ip, PACKAGE_INDEX[1])}
    try:
        host_v4 = socket.create_server((gateway, 0))
        listeners.append(host_v4)
        targets["host on the bridge"] = (gateway, host_v4.getsockname()[1])
        link_local = _link_local_address(interface)
        if link_local:  # the bridge has IPv6 too: a second way to the host
            host_v6 = socket.create_server((link_local, 0, 0, socket.if_nametoindex(interface)),
                                           family=socket.AF_INET6)
            listeners.append(host_v6)
            targets["host on the bridge, IPv6"] = (f"{link_local}%eth0", host_v6.getsockname()[1])
        for listener in listeners:  # each is reachable from the host
            with socket.socket(listener.family) as client:
                client.settimeout(10)
                client.connect(listener.getsockname())
        socket.create_connection(targets["package index"], timeout=10).close()
        probe = server.podman("exec", server.name, "python", "-c", PROBE, json.dumps(targets)).stdout
    finally:
        for listener in listeners:
            listener.close()
    results = json.loads(probe)
    assert results.pop("dns").startswith("error"), "the container resolved a name"
    assert results and all(outcome.startswith("error") for outcome in results.values()), results
    assert server.get("/healthz") == (200, "ok\n")  # while the published port answers


# Run inside the container: try each (host, port) and a name lookup, print what happened.
PROBE = """
import json, socket, sys
results = {}
for name, (host, port) in json.loads(sys.argv[1]).items():
    try:
        socket.create_connection((host, port), timeout=5).close()
        results[name] = "connected"
    except OSError as exc:
        results[name] = f"error: {exc}"
try:
    socket.getaddrinfo("pypi.org", 443)
    results["dns"] = "resolved"
except OSError as exc:
    results["dns"] = f"error: {exc}"
print(json.dumps(results))
"""


def _link_local_address(interface: str, timeout: float = 10) -> str | None:
    """The host's fe80:: address on `interface` once usable (duplicate detection done), if any."""
    deadline = time.monotonic() + timeout
    while True:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            address, _, _, scope, flags, name = line.split()
            if name == interface and scope == "20":  # link scope
                if not int(flags, 16) & IFA_F_TENTATIVE:
                    return ":".join(address[i:i + 4] for i in range(0, 32, 4))
                break
        else:
            return None
        if time.monotonic() > deadline:
            raise AssertionError(f"{interface}: IPv6 link-local address still tentative")
        time.sleep(0.1)


IFA_F_TENTATIVE = 0x40  # linux/if_addr.h


def test_the_server_refuses_to_start_on_0_0_0_0_without_credentials(deployment):
    result = deployment.podman("run", "--rm", "--network", deployment.network.name, IMAGE, check=False)
    assert result.returncode == 2, result.stderr
    # podman's own lines (no systemd for health timers here) start with time=
    server_lines = [line for line in result.stderr.splitlines() if not line.startswith("time=")]
    assert len(server_lines) == 1, server_lines  # one line, no traceback
    assert server_lines[0].startswith("configuration error: PROXY_URL: 0.0.0.0 is reachable from other machines")


# --- calls through the container -----------------------------------------------------------------


class Subscriber:
    """websocat subscribed to every call in JSON mode, with the subscriber token.

    `--exit-on-eof`: when the server closes, websocat answers the close frame (without it websocat
    leaves the handshake open while its input is, and the server waits for it until SHUTDOWN_TIMEOUT).
    """

    def __init__(self, running: Running):
        self.running = running
        self.messages: list[dict] = []
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> "Subscriber":
        self.process = await asyncio.create_subprocess_exec(
            websocat_path(), "--exit-on-eof", f"-H=Authorization: Bearer {CLIENT_TOKEN}", self.running.url("/client"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        greeting = await asyncio.wait_for(self.process.stdout.readline(), 20)
        assert json.loads(greeting) == [], greeting
        self.process.stdin.write(b'{"type":"subscribe","callSid":"*"}\n')
        await self.process.stdin.drain()
        await self.running.wait_for_log("joined * (json mode)")
        return self

    async def until_call_ended(self, call_sid: str, timeout: float) -> list[dict]:
        """Messages of `call_sid` up to and including its `call_ended`."""
        async with asyncio.timeout(timeout):
            while True:
                line = await self.process.stdout.readline()
                assert line, f"subscriber closed: {(await self.process.stderr.read()).decode()}"
                message = json.loads(line)
                self.messages.append(message)
                if message["type"] == "call_ended" and message["callSid"] == call_sid:
                    return [m for m in self.messages if m.get("callSid") == call_sid]

    async def close(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.kill()
        if self.process:
            await self.process.wait()


async def start_call(running: Running, audio: bytes, folder: Path) -> tuple[str, asyncio.subprocess.Process]:
    """`simulate.py` plays `audio` (8 kHz mu-law, caller's leg) in real time: (callSid, process)."""
    path = folder / "call.ulaw"
    path.write_bytes(audio)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "simulate.py"), running.url("/twilio"), str(path), "--raw",
        "--param", f"token={CALL_TOKEN}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    call_sid = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
    assert call_sid.startswith("CA"), call_sid
    return call_sid, process


def transcript_words(messages: list[dict]) -> list[str]:
    """Words of the caller's channel, each message checked against the deepgram-sdk models."""
    from test_local_stt import validate

    results = [validate(json.dumps(m["data"])) for m in messages if m["type"] == "transcript"]
    return " ".join(r.channel.alternatives[0].transcript for r in results
                    if type(r).__name__ == "ListenV1Results" and r.channel_index == [0, 2]).split()


async def test_a_call_with_speech_is_transcribed_inside_the_container(server, tmp_path):
    subscriber = await Subscriber(server).start()
    try:
        call_sid, call = await start_call(server, speak(SENTENCES[1]), tmp_path)  # "please call me back ..."
        messages = await subscriber.until_call_ended(call_sid, timeout=120)
        out, err = await asyncio.wait_for(call.communicate(), 30)
    finally:
        await subscriber.close()
    assert call.returncode == 0, err.decode()
    assert "close=1000" in out.decode()
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "call_started" and kinds[-1] == "call_ended", kinds
    transcripts = [m["data"] for m in messages if m["type"] == "transcript"]
    assert transcripts[-1]["type"] == "Metadata"
    words = transcript_words(messages)
    assert len({"back", "morning", "order"} & set(words)) >= 2, words
    assert messages[-1]["endOfCall"] == "complete"


async def test_sigterm_mid_call_delivers_the_last_words_and_exits_0_in_time(deployment, tmp_path):
    running = deployment.start("stopped-mid-call", SECURE_SETTINGS)
    subscriber = await Subscriber(running).start()
    try:
        speech = b"".join(speak(sentence) for sentence in SENTENCES)  # about 8 s
        call_sid, call = await start_call(running, speech, tmp_path)
        await running.wait_for_log(f"call started callSid={call_sid}")
        await asyncio.sleep(2)  # mid-sentence
        code, seconds = await asyncio.to_thread(running.stop, SHUTDOWN_TIMEOUT + 10)
        messages = await subscriber.until_call_ended(call_sid, timeout=30)
        out, _ = await asyncio.wait_for(call.communicate(), 30)
    finally:
        await subscriber.close()
    assert code == 0, running.logs()
    assert seconds < SHUTDOWN_TIMEOUT, (seconds, running.logs())
    assert "close=1001" in out.decode()  # the server told "Twilio" it was going away
    assert [m["data"]["type"] for m in messages if m["type"] == "transcript"][-1] == "Metadata"
    assert messages[-1]["endOfCall"] == "complete"
    assert messages[-1]["audioSeconds"] >= 2
    assert "stopped" in running.logs()


async def test_sigterm_when_idle_exits_0_at_once(deployment):
    running = deployment.start("stopped-idle", SECURE_SETTINGS)
    code, seconds = await asyncio.to_thread(running.stop, SHUTDOWN_TIMEOUT + 10)
    assert code == 0, running.logs()
    assert seconds < 5
