"""End-to-end benchmark of the proxy, against a bare `websockets` floor measured in the same run.

    .venv/bin/python bench/bench.py            # the full run (about 10 minutes)
    .venv/bin/python bench/bench.py --quick    # a smoke run (about 1-2 minutes)
    .venv/bin/python bench/bench.py --only ratio,latency --n 50 --seconds 20

Processes (all on 127.0.0.1; every run is bounded in count and time and stops by itself):
- the server under test: `python server.py` (STT_ENGINE=deepgram, DEEPGRAM_URL at the fake), or
  the floor: `bench/floor_server.py`, a bare websockets server that only reads frames;
- the Deepgram-compatible server: `bench/fake_deepgram.py` (local_stt.LocalSTT, deterministic
  engine), which records every frame's arrival and every message's send time;
- the load generator: `bench/loadgen.py twilio` (N calls, both legs, 20 ms frames, call starts
  spread over the 20 ms tick) and `bench/loadgen.py subs` (S raw-mode subscribers per call).

Measured:
- CPU per Twilio media frame of the server process only (utime+stime from /proc/PID/stat over
  the steady-state window), for the proxy and the floor, alternating, ratio of medians;
- latency from a chunk's send by the simulator to the arrival, at the Deepgram side, of the
  upstream frame holding its last byte (p50/p99); from the fake's send of a message to its
  arrival at each subscriber (p50/p99); growth of latency over the run;
- RSS above the idle process per active call; saturation: N grows until latency grows;
- a stalled-subscriber run; a soak run (fast pace, waves of calls) that counts asyncio tasks,
  open fds and RSS from the proxy's /metrics before, during and after;
- voice agents (`agent`): N calls on /agent against the fake Deepgram Voice Agent
  (tests/fake_agent.py), then against the fake OpenAI Realtime server (tests/fake_openai.py),
  speaking on a schedule, with barge-ins: server CPU per agent call-minute, provider audio in ->
  Twilio media out and the barge-in event -> clear (p50/p99), agent audio lost or reordered; for
  OpenAI also every truncate's `audio_end_ms` against what the caller had heard of the item.
- the greeting's delay (`greeting`): calls to /agent through the TwiML webhook (the provider
  session opened by /twiml) and straight to /agent (opened at the stream's `start`),
  alternating, against a fake OpenAI whose handshake takes `--greeting-handshake` seconds.

Every time is CLOCK_MONOTONIC, comparable across these processes. Targets are printed as
met/missed; nothing here is a test assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
API_KEY = "bench-deepgram-key"
LISTEN_QUERY = ("model=nova-3&encoding=mulaw&sample_rate=8000&channels=2&multichannel=true"
                "&interim_results=true&punctuate=true")
FRAME_MS = 20


# --- small process helpers -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds (children not included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    return sum(proc_times(pid))


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Proc:
    """A child process with its stdout read line by line on a thread."""

    def __init__(self, name: str, args: list[str], *, env=None, cwd=None, log: Path, stdin=False):
        self.name = name
        self.log = open(log, "wb")
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=cwd,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for raw in self.p.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.p.pid

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no {prefix!r} within {timeout:.0f} s (log: {self.log.name})")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.p.poll()}) before {prefix!r}; log: {self.log.name}")
            if line.startswith(prefix):
                return line

    def tell(self, line: str) -> None:
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def http_get(port: int, path: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def wait_http(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            http_get(port, "/healthz", 1.0)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered /healthz on port {port}")
            time.sleep(0.05)


def scrape(port: int) -> dict[str, float]:
    """The proxy's /metrics, unlabelled series only."""
    out = {}
    for line in http_get(port, "/metrics").splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


# --- one run ---------------------------------------------------------------------------------


@dataclass
class RunSpec:
    target: str  # "floor", "proxy" (this working tree), or the label of a --baseline or --variant
    n: int
    seconds: float  # audio per call
    pace: str = "realtime"  # or "fast"
    subs: int = 0  # healthy subscribers per call
    stalled: int = 0  # stalled subscribers per call
    warmup: float = 3.0
    label: str = ""
    scrape_every: float = 0.0  # seconds between /metrics scrapes (proxy only; 0 = never)
    waves: int = 1  # soak: run the calls this many times against the same server
    profile: str = ""  # py-spy collapsed-stack output for the server over the CPU window


@dataclass
class RunResult:
    spec: RunSpec
    frames: int = 0  # Twilio media frames in the CPU window
    cpu_s: float = 0.0  # server CPU seconds in the window
    sys_s: float = 0.0  # of which in the kernel (stime)
    window_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    fake_cpu_s: float = 0.0
    subs_cpu_s: float = 0.0
    rss_idle: int = 0
    rss_peak: int = 0
    dg_lat: np.ndarray | None = None  # seconds, per tick (both legs' last bytes)
    dg_times: np.ndarray | None = None  # send time of each latency sample, relative to t0
    dg_missing: int = 0
    sub_lat: np.ndarray | None = None
    sub_times: np.ndarray | None = None
    sub_unmatched: int = 0
    sub_closed_ok: int = 0
    sub_count: int = 0
    lag_p99: float = 0.0  # load generator's own lateness (health of the measurement)
    metrics: list[tuple[float, str, dict]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def us_per_frame(self) -> float:
        return self.cpu_s / self.frames * 1e6 if self.frames else float("nan")

    @property
    def server_cores(self) -> float:
        return self.cpu_s / self.window_s if self.window_s else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
        self.run_no = 0
        self.py_spy = "py-spy"
        # Where each proxy target's server.py lives (this tree, and one checkout per --baseline
        # ref), and the extra environment of each --variant (this tree with other settings).
        self.roots = {"proxy": ROOT}
        self.envs: dict[str, dict[str, str]] = {}
        for i, ref in enumerate(args.baseline):
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True,
                                    capture_output=True, text=True).stdout.strip()
            self.roots[f"{ref} ({commit})"] = self._checkout(ref, self.tmp / f"baseline{i}")
        for variant in args.variant:
            label = " ".join(variant)
            self.roots[label] = ROOT
            self.envs[label] = dict(setting.split("=", 1) for setting in variant)

    @property
    def baselines(self) -> list[str]:
        """Every proxy target other than this tree as it is: --baseline refs, then --variants."""
        return [t for t in self.roots if t != "proxy"]

    @staticmethod
    def _checkout(ref: str, out: Path) -> Path:
        """The proxy's files at a git ref, for before/after runs in the same invocation."""
        out.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        return out

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def server_env(self, port: int, fake_port: int, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("DEEPGRAM_API_KEY", "DEEPGRAM_URL")}
        env.update({
            "PROXY_URL": f"127.0.0.1:{port}",
            "STT_ENGINE": "deepgram",
            "DEEPGRAM_API_KEY": API_KEY,
            "DEEPGRAM_URL": f"ws://127.0.0.1:{fake_port}/v1/listen?{LISTEN_QUERY}",
            "LOG_LEVEL": self.args.log_level,
            "PYTHONUNBUFFERED": "1",
        })
        # The server's admission limits (MAX_CALLS=100 by default) would refuse the benchmark's
        # load; lift them unless the environment sets them.
        for name in ("MAX_CALLS", "MAX_SUBSCRIBERS", "MAX_SUBSCRIBERS_PER_CALL"):
            env.setdefault(name, "100000")
        if self.args.frame_ms:
            env["DEEPGRAM_FRAME_MS"] = str(self.args.frame_ms)
        env.update(extra or {})
        return env

    def run(self, spec: RunSpec) -> RunResult:
        self.run_no += 1
        d = self.tmp / f"run{self.run_no:02d}-{spec.target}-{spec.n}"
        d.mkdir()
        res = RunResult(spec)
        procs: list[Proc] = []
        self.log(f"[bench] run {self.run_no}: {spec.label or spec.target} N={spec.n} S={spec.subs}"
                 f"{f'+{spec.stalled} stalled' if spec.stalled else ''} {spec.pace} {spec.seconds:g} s"
                 f"{f' x{spec.waves} waves' if spec.waves > 1 else ''}")
        try:
            self._run(spec, res, d, procs)
        finally:
            for p in reversed(procs):
                p.kill()
        return res

    def _run(self, spec: RunSpec, res: RunResult, d: Path, procs: list[Proc]) -> None:
        port = free_port()
        fake = None
        if spec.target != "floor":
            fake = Proc("fake-deepgram", [PY, str(HERE / "fake_deepgram.py"), "--port", "0",
                                          "--api-key", API_KEY, "--window-ms", str(self.args.window_ms),
                                          "--dump", str(d / "fake.pickle")], log=d / "fake.log")
            procs.append(fake)
            fake_port = int(fake.expect("READY", 20).split()[1])
            server = Proc(spec.target, [PY, str(self.roots[spec.target] / "server.py")],
                          env=self.server_env(port, fake_port, self.envs.get(spec.target)),
                          cwd=str(d), log=d / "server.log")
        else:
            server = Proc("floor", [PY, str(HERE / "floor_server.py"), "--port", str(port)],
                          log=d / "floor.log")
        procs.append(server)
        wait_http(port)
        time.sleep(0.3)
        res.rss_idle = proc_rss(server.pid)
        samples: list[tuple[float, float, int]] = []  # (t, cpu, rss) of the server
        stop_sampler = threading.Event()
        current_wave = [0]

        def sampler() -> None:
            next_scrape = 0.0
            while not stop_sampler.is_set():
                t = time.monotonic()
                try:
                    samples.append((t, proc_cpu(server.pid), proc_rss(server.pid)))
                except OSError:
                    return
                if spec.scrape_every and spec.target == "proxy" and t >= next_scrape:
                    next_scrape = t + spec.scrape_every
                    try:
                        res.metrics.append((t, f"during wave {current_wave[0] + 1}", scrape(port)))
                    except OSError:
                        pass
                stop_sampler.wait(0.2)

        if spec.scrape_every and spec.target == "proxy":
            res.metrics.append((time.monotonic(), "idle", scrape(port)))
        threading.Thread(target=sampler, daemon=True).start()
        lg_cpu = fk_cpu = sb_cpu = 0.0
        lat_parts = []
        frames_total = cpu_total = sys_total = window_total = 0.0
        lags = []
        for wave in range(spec.waves):
            current_wave[0] = wave
            w = self._wave(spec, res, d / f"w{wave}", port, server, procs)
            frames_total += w["frames"]
            cpu_total += w["cpu"]
            sys_total += w["sys"]
            window_total += w["window"]
            lg_cpu += w["lg_cpu"]
            sb_cpu += w["sb_cpu"]
            lags.append(w["lag_p99"])
            lat_parts.append(w)
            if spec.scrape_every and spec.target == "proxy":
                self._settle(port)
                res.metrics.append((time.monotonic(), f"after wave {wave + 1}", scrape(port)))
        stop_sampler.set()
        res.frames, res.cpu_s, res.sys_s, res.window_s = int(frames_total), cpu_total, sys_total, window_total
        res.loadgen_cpu_s, res.subs_cpu_s = lg_cpu, sb_cpu
        res.lag_p99 = max(lags)
        res.rss_peak = max((rss for _, _, rss in samples), default=res.rss_idle)
        if fake is not None:
            fk_cpu = proc_cpu(fake.pid)
        code = server.stop()
        if code not in (0, -signal.SIGTERM):
            res.notes.append(f"{server.name} exited with {code} (log {server.log.name})")
        if fake is not None:
            fake.stop()
            res.fake_cpu_s = fk_cpu
            with open(d / "fake.pickle", "rb") as f:
                conns = pickle.load(f)
            self._latencies(res, conns, lat_parts)

    def _settle(self, port: int, timeout: float = 30.0) -> None:
        """Soak: wait until the proxy reports no call and no subscriber, then a moment more."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = scrape(port)
            if m.get("calls_active", 1) == 0 and m.get("subscribers_active", 1) == 0:
                break
            time.sleep(0.2)
        time.sleep(1.0)

    def _wave(self, spec: RunSpec, res: RunResult, d: Path, port: int, server: Proc,
              procs: list[Proc], *, subs_port: int | None = None, cpu=None, extra_cpu=None) -> dict:
        """One wave of calls. `subs_port`: the subscribers' server, if not the calls' one;
        `cpu`: (utime, stime) of what is measured (default: the server process); `extra_cpu`:
        another figure read over the same window (w["extra_cpu"])."""
        d.mkdir()
        cpu = cpu or (lambda: proc_times(server.pid))
        extra_cpu = extra_cpu or (lambda: 0.0)
        ticks = int(spec.seconds * 1000 / FRAME_MS)
        tag = f"{self.run_no:02d}{d.name}"
        sids = [f"CA{tag}{i:06d}".ljust(34, "0")[:34] for i in range(spec.n)]
        cfg = {"url": f"ws://127.0.0.1:{port}/twilio", "call_sids": sids, "ticks": ticks,
               "pace": spec.pace, "out": str(d / "twilio.pickle"), "align_results": self.args.align_results}
        (d / "twilio.json").write_text(json.dumps(cfg))
        tw = Proc("loadgen-twilio", [PY, str(HERE / "loadgen.py"), "twilio", str(d / "twilio.json")],
                  log=d / "twilio.log", stdin=True)
        procs.append(tw)
        tw.expect("READY", 60 + spec.n * 0.2)
        subs = None
        if spec.target != "floor" and (spec.subs or spec.stalled):
            scfg = {"url": f"ws://127.0.0.1:{subs_port or port}/client", "call_sids": sids, "per_call": spec.subs,
                    "stalled_per_call": spec.stalled, "out": str(d / "subs.pickle"),
                    "deadline": spec.seconds * (1 if spec.pace == "realtime" else 10) + 120}
            (d / "subs.json").write_text(json.dumps(scfg))
            subs = Proc("loadgen-subs", [PY, str(HERE / "loadgen.py"), "subs", str(d / "subs.json")],
                        log=d / "subs.log")
            procs.append(subs)
            subs.expect("READY", 60 + spec.n * (spec.subs + spec.stalled) * 0.05)
        if spec.pace != "realtime":  # fast: from GO until every call has closed
            w0, c0, e0 = time.monotonic(), cpu(), extra_cpu()
        tw.tell("GO")
        t0 = float(tw.expect("T0", 10).split()[1])
        if spec.pace == "realtime":
            w0 = t0 + min(spec.warmup, spec.seconds / 4) + 1.0  # every call has started
            w1 = t0 + spec.seconds - 0.5
            time.sleep(max(0.0, w0 - time.monotonic()))
            c0, e0 = cpu(), extra_cpu()
            if spec.profile:
                spy = subprocess.Popen([self.py_spy, "record", "--pid", str(server.pid), "--rate", "250",
                                        "--duration", str(int(t0 + spec.seconds - 1 - time.monotonic())),
                                        "--format", "raw", "--output", spec.profile, "--nonblocking", "--gil"],
                                       stdout=subprocess.DEVNULL, stderr=open(d / "py-spy.log", "wb"))
            time.sleep(max(0.0, w1 - time.monotonic()))
            c1, e1 = cpu(), extra_cpu()
            timeout = 60 + spec.seconds
        else:  # the server has read everything once every call's close handshake is done
            timeout = 120 + spec.n * spec.seconds
        tw.expect("SENT", timeout)
        if spec.profile:
            spy.wait(30)
        tw.expect("DONE", 60)
        if spec.pace != "realtime":
            w1, c1, e1 = time.monotonic(), cpu(), extra_cpu()
        with open(d / "twilio.pickle", "rb") as f:
            twr = pickle.load(f)
        lg_cpu = twr["cpu"]
        frames = 0
        sent_at = twr["sent_at"]
        for arr in sent_at.values():
            a = np.frombuffer(arr, dtype=np.float64)
            frames += 2 * int(np.count_nonzero((a >= w0) & (a < w1))) if spec.pace == "realtime" \
                else 2 * int(np.count_nonzero(~np.isnan(a)))
        lag = np.frombuffer(twr["lag"], dtype=np.float64) if len(twr["lag"]) else np.zeros(1)
        sb = None
        sb_cpu = 0.0
        if subs is not None:
            subs.expect("DONE", 120)
            with open(d / "subs.pickle", "rb") as f:
                sb = pickle.load(f)
            sb_cpu = sb["cpu"]
            subs.stop()
        tw.stop()
        return {"frames": frames, "cpu": sum(c1) - sum(c0), "sys": c1[1] - c0[1], "window": w1 - w0, "lg_cpu": lg_cpu, "sb_cpu": sb_cpu,
                "extra_cpu": e1 - e0,
                "lag_p99": float(np.percentile(lag, 99)), "t0": t0, "sent_at": sent_at, "subs": sb,
                "warm_from": t0 + min(spec.warmup, spec.seconds / 4) + 1.0}

    def _latencies(self, res: RunResult, conns: list[dict], waves: list[dict]) -> None:
        by_index = {}
        sent_map: dict[bytes, float] = {}
        for c in conns:
            try:
                idx = int(c["sig"].decode())
            except (ValueError, UnicodeDecodeError):
                continue
            by_index.setdefault(idx, []).append(c)
            for t, key in c["sent"]:
                sent_map[key] = t
        lat, lat_t, sub, sub_t = [], [], [], []
        missing = unmatched = closed_ok = count = 0
        for w in waves:
            t0, warm = w["t0"], w["warm_from"]
            # Each wave's calls have the same indices; pick the connection opened in that wave.
            for idx, arr in w["sent_at"].items():
                sent = np.frombuffer(arr, dtype=np.float64)
                cands = [c for c in by_index.get(idx, []) if c["opened"] <= t0 + 1 and
                         (c["closed"] is None or c["closed"] >= t0)]
                if not cands:
                    missing += len(sent)
                    continue
                c = cands[-1]
                times = np.array([t for t, _ in c["arrivals"]])
                cum = np.cumsum([n for _, n in c["arrivals"]])
                k = np.arange(len(sent))
                last_byte = 320 * k + 319  # outbound's last byte of tick k, interleaved
                j = np.searchsorted(cum, last_byte, side="right")
                ok = (j < len(times)) & ~np.isnan(sent)
                missing += int(np.count_nonzero(~ok & ~np.isnan(sent)))
                keep = ok & (sent >= warm)
                lat.append(times[j[keep]] - sent[keep])
                lat_t.append(sent[keep] - t0)
            if w["subs"]:
                for idx, times, keys, code in w["subs"]["records"]:
                    count += 1
                    closed_ok += code == 1000
                    tarr = np.frombuffer(times, dtype=np.float64)
                    for t, key in zip(tarr, keys):
                        ts = sent_map.get(key)
                        if ts is None:
                            unmatched += 1
                        elif ts >= warm:
                            sub.append(t - ts)
                            sub_t.append(ts - t0)
        res.dg_lat = np.concatenate(lat) if lat else np.zeros(0)
        res.dg_times = np.concatenate(lat_t) if lat_t else np.zeros(0)
        res.dg_missing = missing
        res.sub_lat, res.sub_times = np.array(sub), np.array(sub_t)
        res.sub_unmatched, res.sub_closed_ok, res.sub_count = unmatched, closed_ok, count


# --- statistics and the table ----------------------------------------------------------------


def pct(a: np.ndarray | None, q: float) -> float:
    return float(np.percentile(a, q)) * 1000 if a is not None and len(a) else float("nan")


def growth_ms(lat: np.ndarray, times: np.ndarray) -> tuple[float, float, float]:
    """(p99 of the first quarter, p99 of the last quarter, difference of their medians), in ms."""
    if lat is None or len(lat) < 40:
        return float("nan"), float("nan"), float("nan")
    order = np.argsort(times)
    lat = lat[order]
    q = len(lat) // 4
    first, last = lat[:q], lat[-q:]
    return (float(np.percentile(first, 99)) * 1000, float(np.percentile(last, 99)) * 1000,
            (float(np.median(last)) - float(np.median(first))) * 1000)


def fmt(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def machine() -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import websockets
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [f"machine: {os.cpu_count()} cores, {model}, {mem} RAM, Linux {platform.release()}",
            f"software: Python {platform.python_version()}, websockets {websockets.__version__}; "
            f"load average at start {load}",
            "all processes (server, fake Deepgram, load generator, subscribers) share these cores"]


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.targets: list[tuple[str, str, str]] = []  # (target, measured, met/missed)
        self.data: dict = {}

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        self.lines.append(line(header))
        self.lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        self.lines.extend(line(r) for r in rows)
        self.lines.append("")

    def target(self, name: str, measured: str, met: bool | None) -> None:
        self.targets.append((name, measured, "n/a" if met is None else ("met" if met else "MISSED")))


def run_row(r: RunResult) -> list[str]:
    s = r.spec
    return [s.target, s.pace, str(s.n), f"{r.frames}", fmt(r.cpu_s, 2), fmt(r.server_cores, 2),
            fmt(r.us_per_frame, 1), fmt(100 * r.sys_s / r.cpu_s if r.cpu_s else float("nan"), 0),
            fmt(r.lag_p99 * 1000, 1)]


# --- scenarios ---------------------------------------------------------------------------------


def scenario_ratio(b: Bench, rep: Report, pace: str, n: int, seconds: float, pairs: int) -> None:
    targets = ("floor", *b.baselines, "proxy")
    runs: dict[str, list[RunResult]] = {t: [] for t in targets}
    rows = []
    for _ in range(pairs):
        for target in targets:
            r = b.run(RunSpec(target, n, seconds, pace=pace, subs=b.args.subs if target != "floor" else 0,
                              label=f"ratio {pace}"))
            runs[target].append(r)
            rows.append(run_row(r))
    median = {t: statistics.median(r.us_per_frame for r in runs[t]) for t in targets}
    floor, proxy = median["floor"], median["proxy"]
    ratio = proxy / floor
    rep.add(f"### CPU per Twilio media frame, {pace} pace, N = {n} "
            f"({'call starts spread over the 20 ms tick' if pace == 'realtime' else 'as fast as the server reads'}; "
            f"proxy with S = {b.args.subs} subscriber per call; alternating {'/'.join(targets)})", "")
    rep.table(["server", "pace", "N", "media frames", "CPU s", "cores", "µs/frame", "% kernel",
               "loadgen lag p99 ms"], rows)
    rep.add(f"median: floor {floor:.1f} µs/frame, proxy {proxy:.1f} µs/frame, **ratio {ratio:.2f}×**", "")
    for label in b.baselines:
        base = median[label]
        rep.add(f"baseline {label}: {base:.1f} µs/frame, ratio {base / floor:.2f}× the floor; "
                f"**proxy / baseline {proxy / base:.2f}**", "")
    rep.data[f"ratio_{pace}"] = {"median_us": median, "ratio": ratio,
                                 "runs": [[r.spec.target, r.us_per_frame] for v in runs.values() for r in v]}
    if pace == "realtime":
        rep.target(f"CPU per media frame ≤ 1.25× floor (N = {n}, real time)", f"{ratio:.2f}×", ratio <= 1.25)
    else:
        rep.target(f"CPU per media frame vs floor (N = {n}, fast pace; no target)", f"{ratio:.2f}×", None)


def latency_rows(r: RunResult) -> list[str]:
    g = growth_ms(r.dg_lat, r.dg_times)
    return [str(r.spec.n), f"{r.spec.subs}{'+' + str(r.spec.stalled) + ' stalled' if r.spec.stalled else ''}",
            f"{r.spec.seconds:g}", fmt(pct(r.dg_lat, 50)), fmt(pct(r.dg_lat, 99)),
            f"{fmt(g[0])} → {fmt(g[1])}", fmt(pct(r.sub_lat, 50), 2), fmt(pct(r.sub_lat, 99), 2),
            fmt(r.server_cores, 2), fmt((r.rss_peak - r.rss_idle) / max(1, r.spec.n) / 1024, 0),
            fmt(r.lag_p99 * 1000, 1), str(r.dg_missing)]


LAT_HEADER = ["N", "S", "s", "DG p50 ms", "DG p99 ms", "DG p99 first¼ → last¼", "sub p50 ms", "sub p99 ms",
              "server cores", "KB RSS/call", "loadgen lag p99 ms", "chunks missing"]


def frame_ms(b: Bench) -> int:
    return b.args.frame_ms or int(os.environ.get("DEEPGRAM_FRAME_MS", "100") or 100)


def scenario_latency(b: Bench, rep: Report, ns: list[int], seconds: float, long_seconds: float) -> None:
    rows, results = [], []
    for n in ns:
        secs = long_seconds if n == max(ns) else seconds
        r = b.run(RunSpec("proxy", n, secs, subs=b.args.subs, label="latency"))
        results.append(r)
        rows.append(latency_rows(r))
        rep.data[f"latency_{n}"] = summary(r)
    rep.add(f"### Latency, real time (DG: simulator send → arrival at the Deepgram side of the upstream "
            f"frame holding the chunk's last byte; {frame_ms(b)} ms upstream frames; sub: Deepgram send → "
            f"subscriber receive)", "")
    rep.table(LAT_HEADER, rows)
    big = results[-1]
    limit = frame_ms(b) + 10
    g = growth_ms(big.dg_lat, big.dg_times)
    p99 = pct(big.dg_lat, 99)
    stable = g[2] == g[2] and g[2] < 10 and g[1] <= max(g[0] * 1.25, g[0] + 10)
    rep.target(f"≥ 200 real-time calls: DG p99 ≤ {limit} ms and no growth over {big.spec.seconds:g} s "
               f"(N = {big.spec.n})",
               f"p99 {p99:.1f} ms, first¼ {g[0]:.1f} → last¼ {g[1]:.1f} ms, median drift {g[2]:+.1f} ms, "
               f"{big.dg_missing} missing",
               big.spec.n >= 200 and p99 <= limit and stable and big.dg_missing == 0)
    per_call = (big.rss_peak - big.rss_idle) / big.spec.n / 1024
    rep.target(f"≤ 100 KB RSS per active call above idle (N = {big.spec.n})",
               f"{per_call:.0f} KB (idle {big.rss_idle / 2**20:.1f} MiB, peak {big.rss_peak / 2**20:.1f} MiB)",
               per_call <= 100)


def scenario_fanout(b: Bench, rep: Report, n: int, s: int, seconds: float) -> None:
    for label in b.baselines:
        base = b.run(RunSpec(label, n, seconds, subs=s, label="fan-out"))
        rep.add(f"### Subscriber fan-out, baseline {label}: N = {n}, S = {s}", "")
        rep.table(LAT_HEADER, [latency_rows(base)])
    r = b.run(RunSpec("proxy", n, seconds, subs=s, label="fan-out"))
    rep.add(f"### Subscriber fan-out: N = {n}, S = {s} raw-mode subscribers per call, real time", "")
    rep.table(LAT_HEADER, [latency_rows(r)])
    rep.add(f"{r.sub_count} subscribers, {len(r.sub_lat)} deliveries measured, {r.sub_unmatched} unmatched, "
            f"{r.sub_closed_ok} closed with 1000 at the end", "")
    p99 = pct(r.sub_lat, 99)
    rep.target(f"subscriber delivery p99 ≤ 10 ms (N = {n}, S = {s})", f"{p99:.2f} ms", p99 <= 10)
    rep.data["fanout"] = summary(r)


def scenario_stalled(b: Bench, rep: Report, n: int, s: int, seconds: float) -> None:
    r = b.run(RunSpec("proxy", n, seconds, subs=s, stalled=1, label="stalled subscriber"))
    rep.add(f"### Stalled subscriber: N = {n}, S = {s} healthy + 1 stalled (never reads) per call", "")
    rep.table(LAT_HEADER, [latency_rows(r)])
    rep.add(f"healthy subscribers: {r.sub_count}, {len(r.sub_lat)} deliveries, {r.sub_unmatched} unmatched, "
            f"{r.sub_closed_ok} closed with 1000 at the end", "")
    p99 = pct(r.sub_lat, 99)
    rep.target(f"healthy subscribers unaffected by a stalled one (p99 ≤ 10 ms, N = {n})", f"{p99:.2f} ms",
               p99 <= 10)
    rep.data["stalled"] = summary(r)


def scenario_saturation(b: Bench, rep: Report, ns: list[int], seconds: float) -> None:
    rows, best, sat_n = [], None, None
    limit = frame_ms(b) + 10
    for n in ns:
        r = b.run(RunSpec("proxy", n, seconds, subs=b.args.subs, label="saturation"))
        g = growth_ms(r.dg_lat, r.dg_times)
        p99 = pct(r.dg_lat, 99)
        # Saturated: latency drifts up during the run, or chunks queue for longer than a frame.
        grows = (not (g[2] == g[2]) or g[2] > 10 or pct(r.dg_lat, 50) > frame_ms(b) or p99 > 1000
                 or r.dg_missing > 0)
        verdict = "grows (saturated)" if grows else ("stable, p99 over target" if p99 > limit else "stable")
        if r.lag_p99 > 0.02:
            verdict += "; load generator late"
        rows.append([str(n), fmt(pct(r.dg_lat, 50)), fmt(p99), fmt(g[2]), fmt(r.server_cores, 2),
                     fmt(r.lag_p99 * 1000, 1), fmt((r.loadgen_cpu_s) / max(r.spec.seconds, 1), 2), verdict])
        rep.data.setdefault("saturation", []).append({"n": n, **summary(r), "verdict": verdict})
        if grows:
            sat_n = n
            break
        if p99 <= limit:
            best = (n, r)
    rep.add(f"### Saturation: N grows until latency grows without bound ({seconds:g} s real time per step, "
            f"S = {b.args.subs})", "")
    rep.table(["N", "DG p50 ms", "DG p99 ms", "median drift ms", "server cores", "loadgen lag p99 ms",
               "loadgen cores", "verdict"], rows)
    if best:
        n, r = best
        proj = n / r.server_cores if r.server_cores else float("nan")
        rep.add(f"largest N carried with stable latency and DG p99 ≤ {limit} ms: **{n} calls** on one process "
                f"({r.server_cores:.2f} cores busy; projected {proj:.0f} calls per fully busy core)"
                + (f"; at N = {sat_n} latency grew" if sat_n else f"; no saturation found up to N = {n}"), "")
        rep.target("calls per core at saturation (measured)", f"{n} stable{f', {sat_n} grows' if sat_n else ''}; "
                   f"projected {proj:.0f}/core", None)
    else:
        rep.add("no step was stable", "")


def scenario_soak(b: Bench, rep: Report, n: int, seconds: float, waves: int) -> None:
    r = b.run(RunSpec("proxy", n, seconds, pace="fast", subs=1, waves=waves, scrape_every=0.5, label="soak"))
    keys = ["calls_active", "subscribers_active", "asyncio_tasks", "process_open_fds",
            "process_resident_memory_bytes"]
    def cells(m: dict) -> list[str]:
        return [fmt(m.get(k, float("nan")), 0) if k != keys[-1] else f"{m.get(k, 0) / 2**20:.1f} MiB"
                for k in keys]

    rows, peaks = [], []
    for wave in range(1, waves + 1):
        during = [m for _, phase, m in r.metrics if phase == f"during wave {wave}"]
        peaks.append({k: max((m.get(k, 0) for m in during), default=0) for k in keys})
    for t, phase, m in r.metrics:
        if phase.startswith("during"):
            continue
        if phase.startswith("after wave"):
            wave = int(phase.split()[-1])
            rows.append([f"peak during wave {wave}"] + cells(peaks[wave - 1]))
        rows.append([phase] + cells(m))
    peak = {k: max(p[k] for p in peaks) for k in keys}
    rep.add(f"### Soak: {waves} waves of {n} calls × {seconds:g} s of audio at fast pace, S = 1 "
            f"(proxy's /metrics before, during, after)", "")
    rep.table(["when", "calls", "subscribers", "asyncio tasks", "open fds", "RSS"], rows)
    rep.add(f"{r.frames} media frames in {r.window_s:.1f} s ({r.frames / max(r.window_s, 1e-9):.0f}/s), "
            f"{r.us_per_frame:.1f} µs CPU/frame, {r.dg_missing} chunks missing upstream", "")
    phases = [(phase, m) for _, phase, m in r.metrics if not phase.startswith("during")]
    idle, after = phases[0][1], phases[-1][1]
    tasks_ok = after.get("asyncio_tasks") == idle.get("asyncio_tasks")
    fds_ok = after.get("process_open_fds") == idle.get("process_open_fds")
    rss = [m.get("process_resident_memory_bytes", 0) for _, m in phases[1:]]
    # Flat: the allocator keeps the first wave's high-water mark, but a leak climbs past it
    # wave after wave. So no later wave may end more than 5 % above the first wave's peak.
    rss_mark = peaks[0]["process_resident_memory_bytes"] if peaks else 0
    rss_flat = len(rss) < 2 or max(rss[1:]) <= max(rss_mark, rss[0]) * 1.05
    rep.target("soak: no leaked tasks or sockets after all calls end; RSS after each wave ≤ 1.05 × "
               "the first wave's peak",
               f"tasks {idle.get('asyncio_tasks'):.0f} → {after.get('asyncio_tasks'):.0f}, fds "
               f"{idle.get('process_open_fds'):.0f} → {after.get('process_open_fds'):.0f}, RSS first-wave peak "
               f"{rss_mark / 2**20:.1f}, after each wave " + ", ".join(f"{x / 2**20:.1f}" for x in rss) + " MiB",
               tasks_ok and fds_ok and rss_flat and r.dg_missing == 0)
    rep.data["soak"] = {"metrics": [(phase, m) for _, phase, m in r.metrics if not phase.startswith("during")],
                        "peak": peak, **summary(r)}


def scenario_profile(b: Bench, rep: Report, n: int, seconds: float, out: Path) -> None:
    """Where the proxy's CPU goes: py-spy (sampling, --nonblocking) over the steady window."""
    import shutil
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PY).parent))
    if not spy:
        rep.add("### Profile: py-spy not found (`.venv/bin/pip install py-spy`)", "")
        return
    b.py_spy = spy
    r = b.run(RunSpec("proxy", n, seconds, subs=b.args.subs, label="profile", profile=str(out)))
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        samples += c
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            total[f] = total.get(f, 0) + c
    us = r.us_per_frame
    rows = [[name, f"{100 * c / samples:.1f}", f"{100 * total[name] / samples:.1f}"]
            for name, c in sorted(own.items(), key=lambda x: -x[1])[:25]]
    rep.add(f"### Profile of the proxy: N = {n}, real time, S = {b.args.subs} (py-spy, {samples} samples "
            f"holding the GIL: Python code only, not system calls or idle waits; {us:.1f} µs CPU per media "
            f"frame in this run, {100 * r.sys_s / max(r.cpu_s, 1e-9):.0f} % of it in the kernel)", "")
    rep.table(["function (own time)", "% of Python samples", "% inclusive"], rows)
    incl = [[name, f"{100 * c / samples:.1f}"] for name, c in sorted(total.items(), key=lambda x: -x[1])[:30]]
    rep.add("inclusive:", "")
    rep.table(["function (inclusive)", "% samples"], incl)


AGENT_EVERY, AGENT_REPLY_SECONDS = 4.0, 2.0  # the fake agent's schedule


def scenario_agent(b: Bench, rep: Report, n: int, seconds: float) -> None:
    """N concurrent agent calls on /agent against the fake Deepgram Voice Agent (tests/fake_agent.py).

    The fake greets, then speaks a 2 s reply every 4 s (at twice real time, as TTS streams); each
    caller speaks over every reply, alternately 0.6 s in (audio still arriving) and 1.4 s in (all
    sent, still playing), so the fake sends UserStartedSpeaking and the server must `clear`. The
    load generator plays Twilio: it echoes each mark when its audio would have played. The same
    load runs through a bare relay (bench/floor_agent.py) first: its latency is what this machine
    adds whatever the server does.
    """
    runs = {target: agent_run(b, target, n, seconds) for target in ("floor", "proxy", "openai")}
    floor, openai = runs["floor"], runs["openai"]
    rep.add(f"### Agent calls: N = {n} for {seconds:g} s each (starts spread over {AGENT_EVERY:g} s), a "
            f"{AGENT_REPLY_SECONDS:g} s reply every {AGENT_EVERY:g} s at 2x real time, a barge-in on each", "")
    rows = []
    for name, r in runs.items():
        rows.append([name, f"{r['cpu_per_call_minute']:.2f} s ({r['cores']:.2f} cores)",
                     f"{r['forward_p50_ms']:.2f} / {r['forward_p99_ms']:.2f}", f"{r['barge_p50_ms']:.2f} / "
                     f"{r['barge_p99_ms']:.2f}", f"{r['checked_seconds']:.0f} s, {r['lost']}", str(r["violations"]),
                     f"{r['lag_p99_ms']:.1f}"])
    rep.table(["target", "server CPU per call-minute", "provider audio -> media, p50 / p99 ms",
               "barge-in event -> clear, p50 / p99 ms", "audio checked, bytes lost or reordered",
               "protocol violations", "load generator lag p99 ms"], rows)
    for name in ("proxy", "openai"):
        r = runs[name]
        rep.add(f"{name}: {r['chunks']} agent audio chunks timed, {r['barge_ins']} barge-ins "
                f"({r['no_clear']} with nothing playing)", "")
    rep.add(f"openai: {openai['truncations']} truncates, {openai['rejected']} rejected by the fake; audio_end_ms "
            f"minus what the caller had heard of the item when the clear reached it: p50 "
            f"{openai['trunc_err_p50_ms']:+.1f} ms, p1 {openai['trunc_err_p1_ms']:+.1f} ms, p99 "
            f"{openai['trunc_err_p99_ms']:+.1f} ms, from {openai['trunc_err_min_ms']:+.1f} to "
            f"{openai['trunc_err_max_ms']:+.1f} ms, {100 * openai['trunc_within_frame']:.1f} % within ±20 ms "
            "(negative: cut before the heard position, by the time the clear took to reach the caller)",
            "proxy = the server with Deepgram's Voice Agent (the fake), openai = the server with OpenAI "
            "Realtime (the fake); floor = a bare relay with no framing, ledger or hub", "")
    for name in ("proxy", "openai"):
        r = runs[name]
        rep.target(f"{name}: {n} concurrent agent calls on one process", f"{r['calls']} calls, {r['sessions']} "
                   "sessions", r["sessions"] == n == r["calls"])
        rep.target(f"{name}: agent audio forwarding p99 ≤ 5 ms", f"{r['forward_p99_ms']:.2f} ms (floor "
                   f"{floor['forward_p99_ms']:.2f} ms)", r["forward_p99_ms"] <= 5)
        rep.target(f"{name}: barge-in reaction (clear) p99 ≤ 5 ms", f"{r['barge_p99_ms']:.2f} ms (floor "
                   f"{floor['barge_p99_ms']:.2f} ms)", r["barge_p99_ms"] <= 5)
        rep.target(f"{name}: agent audio: 0 bytes lost or reordered", str(r["lost"]),
                   r["lost"] == 0 and r["violations"] == 0)
    rep.target("openai: no truncate rejected, none beyond the heard position by more than one frame (20 ms)",
               f"{openai['rejected']} rejected, at most {openai['trunc_err_max_ms']:+.1f} ms",
               openai["rejected"] == 0 and openai["trunc_err_max_ms"] <= 20)
    rep.data["agent"] = runs


def agent_run(b: Bench, target: str, n: int, seconds: float) -> dict:
    """One run of N agent calls through the server (`proxy`) or the bare relay (`floor`)."""
    b.run_no += 1
    d = b.tmp / f"run{b.run_no:02d}-agent-{target}-{n}"
    d.mkdir()
    procs: list[Proc] = []
    every = AGENT_EVERY
    b.log(f"[bench] run {b.run_no}: agent calls, {target}, N={n} {seconds:g} s")
    try:
        fake_py = "fake_openai.py" if target == "openai" else "fake_agent.py"
        fake = Proc("fake-agent", [PY, str(ROOT / "tests" / fake_py), "--port", "0", "--api-key", API_KEY,
                                   "--reply-every", str(every), "--reply-seconds", str(AGENT_REPLY_SECONDS),
                                   "--speed", "2", "--dump", str(d / "fake.pickle")], log=d / "fake.log")
        procs.append(fake)
        fake_port = int(fake.expect("READY", 30).split()[1])
        agent_url = f"ws://127.0.0.1:{fake_port}/v1/agent/converse"
        provider = {"DEEPGRAM_AGENT_URL": agent_url, "AGENT_PROVIDER": "deepgram"}
        if target == "openai":
            provider = {"OPENAI_REALTIME_URL": f"ws://127.0.0.1:{fake_port}/v1/realtime?model=gpt-realtime",
                        "OPENAI_API_KEY": API_KEY, "AGENT_PROVIDER": "openai"}
        port = free_port()
        if target == "floor":
            server = Proc("floor-agent", [PY, str(HERE / "floor_agent.py"), "--port", str(port), "--agent-url",
                                          agent_url, "--api-key", API_KEY], log=d / "floor.log")
        else:
            env = b.server_env(port, free_port(), {  # the recogniser is never used: its URL can be dead
                **provider, "AGENT_PROMPT": "bench call {call}", "AGENT_GREETING": "Hello from the benchmark."})
            server = Proc("proxy", [PY, str(ROOT / "server.py")], env=env, cwd=str(d), log=d / "server.log")
        procs.append(server)
        wait_http(port)
        ticks = int(seconds * 1000 / FRAME_MS)
        speech_at = [every * k + (0.6 if k % 2 else 1.4) for k in range(1, int(seconds / every))]
        sids = [f"CAagent{b.run_no:02d}{i:06d}".ljust(34, "0")[:34] for i in range(n)]
        cfg = {"url": f"ws://127.0.0.1:{port}/agent", "call_sids": sids, "ticks": ticks, "speech_at": speech_at,
               "speech_seconds": 0.3, "spread_seconds": every, "out": str(d / "agent.pickle")}
        (d / "agent.json").write_text(json.dumps(cfg))
        lg = Proc("loadgen-agent", [PY, str(HERE / "loadgen.py"), "agent", str(d / "agent.json")],
                  log=d / "agent.log", stdin=True)
        procs.append(lg)
        lg.expect("READY", 60 + n * 0.3)
        lg.tell("GO")
        t0 = float(lg.expect("T0", 10).split()[1])
        w0, w1 = t0 + every + 1.0, t0 + seconds - 0.5  # every call started, until the first hang up
        time.sleep(max(0.0, w0 - time.monotonic()))
        c0 = proc_times(server.pid)
        time.sleep(max(0.0, w1 - time.monotonic()))
        c1 = proc_times(server.pid)
        lg.expect("SENT", 60 + seconds + every)
        lg.expect("DONE", 60)
        server.stop()
        fake.stop()
        with open(d / "agent.pickle", "rb") as f:
            loadgen = pickle.load(f)
        with open(d / "fake.pickle", "rb") as f:
            sessions = {s["call"]: s for s in pickle.load(f)}
    finally:
        for p in reversed(procs):
            p.kill()
    return agent_figures(loadgen, sessions, w0, w1, sum(c1) - sum(c0), n)


def agent_figures(loadgen: dict, sessions: dict, w0: float, w1: float, cpu: float, n: int) -> dict:
    """Latencies and losses of an agent run, from the load generator's and the fake's records."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_agent import reply_audio

    calls = loadgen["calls"]
    forward, barge, violations, trunc_err, rejected, truncations = [], [], 0, [], 0, 0
    lost = checked = cut_chunks = no_clear = 0
    for i, call in calls.items():
        session = sessions.get(i)
        if session is None:
            continue
        violations += len(session["violations"]) + len(call["bad"])
        names = session.get("segments") or [f"r{k}" for k in range(1, len(session["replies"]) + 1)]
        # Provider audio in -> Twilio media out: each chunk's first byte, found in what the caller got.
        where: dict[str, list[tuple[int, float]]] = {}
        for at, segment, offset, nbytes in call["media"]:
            where.setdefault(segment, []).append((offset + nbytes, at))
        for sent_at, reply, offset, _ in session["audio_chunks"]:
            if not w0 <= sent_at <= w1:
                continue
            arrival = next((at for end, at in where.get(names[reply - 1], []) if end > offset), None)
            if arrival is None:
                cut_chunks += 1  # never sent on: dropped by a barge-in
            else:
                forward.append(arrival - sent_at)
        # UserStartedSpeaking in -> clear out.
        clears = np.frombuffer(call["clears"], dtype=np.float64)
        for said in session["barge_ins"]:
            later = clears[(clears >= said) & (clears < said + 1.0)]
            if len(later):
                barge.append(later[0] - said)
            else:
                no_clear += 1  # nothing was playing
        # Bytes lost or reordered: each reply as received must be its audio (a prefix of it when cut).
        for k, (text, length) in enumerate(session["replies"], start=1):
            got = call["segments"].get(names[k - 1], b"")
            audio = reply_audio(text)
            if len(audio) != length:
                audio = reply_audio(text, length / 8000)
            want = audio + b"\xff" * (-len(audio) % 160)
            checked += len(got)
            if got != want[:len(got)]:
                lost += sum(1 for x, y in zip(got, want) if x != y) + max(0, len(got) - len(want))
        # OpenAI: each truncate against what the caller had heard of that item when a clear reached it
        # (the clear nearest to the truncate's value; the caller's player is continuous).
        rejected += len(session.get("rejected", []))
        for item, end_ms in session.get("truncations", []):
            truncations += 1
            start, length = call["stream_at"].get(item), len(call["segments"].get(item, b""))
            if start is None or not call["cuts"]:
                continue
            heard = [min(max(0.0, played - start), length) / 8 for _, played in call["cuts"]]
            trunc_err.append(min((end_ms - h for h in heard), key=abs))
    forward_a, barge_a, err_a = np.array(forward), np.array(barge), np.array(trunc_err)
    lag = np.frombuffer(loadgen["lag"], dtype=np.float64)
    return {"calls": len(calls), "sessions": len(sessions), "cpu_s": cpu, "cores": cpu / (w1 - w0),
            "cpu_per_call_minute": cpu / (n * (w1 - w0) / 60), "forward_p50_ms": pct(forward_a, 50),
            "forward_p99_ms": pct(forward_a, 99), "chunks": len(forward_a), "cut_chunks": cut_chunks,
            "barge_p50_ms": pct(barge_a, 50), "barge_p99_ms": pct(barge_a, 99), "barge_ins": len(barge_a),
            "no_clear": no_clear, "checked_seconds": checked / 8000, "lost": lost, "violations": violations,
            "lag_p99_ms": float(np.percentile(lag, 99)) * 1000 if len(lag) else float("nan"),
            "truncations": truncations, "rejected": rejected,
            "trunc_err_p50_ms": float(np.percentile(err_a, 50)) if len(err_a) else float("nan"),
            "trunc_err_p1_ms": float(np.percentile(err_a, 1)) if len(err_a) else float("nan"),
            "trunc_err_p99_ms": float(np.percentile(err_a, 99)) if len(err_a) else float("nan"),
            "trunc_err_max_ms": float(err_a.max()) if len(err_a) else float("nan"),
            "trunc_err_min_ms": float(err_a.min()) if len(err_a) else float("nan"),
            "trunc_within_frame": float(np.mean(np.abs(err_a) <= 20)) if len(err_a) else float("nan")}


def scenario_greeting(b: Bench, rep: Report, calls: int, handshake: float, gap: float) -> None:
    """The greeting's delay with and without the webhook's pre-connect (OpenAI, fake with a slow handshake).

    Three kinds of call, in turn, one at a time: `direct` opens /agent without the webhook (the
    provider session is opened at `start`); `webhook, gap 0` GETs /twiml (which opens the session)
    and opens the stream the moment the TwiML is back; `webhook, gap G` waits G seconds first, as
    Twilio does to parse the TwiML and open the stream (G is an assumption: Twilio does not publish
    it). Measured: `start` sent -> first agent audio received.
    """
    import asyncio
    import xml.etree.ElementTree as ET

    sys.path.insert(0, str(ROOT))
    from simulate import TwilioStream
    from websockets.asyncio.client import connect

    b.run_no += 1
    d = b.tmp / f"run{b.run_no:02d}-greeting"
    d.mkdir()
    b.log(f"[bench] run {b.run_no}: greeting delay, {calls} calls, provider handshake {handshake:g} s")
    procs: list[Proc] = []
    try:
        fake = Proc("fake-openai", [PY, str(ROOT / "tests" / "fake_openai.py"), "--port", "0", "--api-key", API_KEY,
                                    "--handshake-delay", str(handshake)], log=d / "fake.log")
        procs.append(fake)
        fake_port = int(fake.expect("READY", 30).split()[1])
        port = free_port()
        env = b.server_env(port, free_port(), {
            "OPENAI_REALTIME_URL": f"ws://127.0.0.1:{fake_port}/v1/realtime?model=gpt-realtime",
            "OPENAI_API_KEY": API_KEY, "AGENT_PROVIDER": "openai", "AGENT_GREETING": "Hello from the benchmark."})
        server = Proc("proxy", [PY, str(ROOT / "server.py")], env=env, cwd=str(d), log=d / "server.log")
        procs.append(server)
        wait_http(port)

        async def one(k: int, webhook: bool, wait: float) -> float:
            call_sid = f"CA{b.run_no:02d}{k:030x}"
            params = {}
            if webhook:
                url = f"http://127.0.0.1:{port}/twiml?CallSid={call_sid}"
                body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
                params = {p.get("name"): p.get("value") for p in ET.fromstring(body).iter("Parameter")}
                await asyncio.sleep(wait)
            stream = TwilioStream(call_sid=call_sid, tracks=["inbound"], custom_parameters=params)
            async with connect(f"ws://127.0.0.1:{port}/agent", compression=None) as ws:
                await ws.send(stream.connected())
                started = time.monotonic()
                await ws.send(stream.start())
                async for message in ws:
                    if '"event":"media"' in message.replace(" ", ""):
                        delay = time.monotonic() - started
                        break
                await ws.send(stream.stop())
            await asyncio.sleep(0.3)
            return delay

        kinds = {"direct": (False, 0.0), "webhook, gap 0": (True, 0.0), f"webhook, gap {gap:g} s": (True, gap)}

        async def all_calls() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {kind: [] for kind in kinds}
            for k in range(calls):
                kind = list(kinds)[k % len(kinds)]
                out[kind].append(await one(k, *kinds[kind]))
            return out

        delays = asyncio.run(all_calls())
    finally:
        for p in reversed(procs):
            p.kill()
    rows = [[kind, str(len(v)), f"{1000 * statistics.median(v):.0f}", f"{1000 * max(v):.0f}"]
            for kind, v in delays.items()]
    rep.add(f"### Greeting delay: OpenAI (fake) with a {handshake:g} s handshake, {calls} calls one at a time", "")
    rep.table(["stream opened", "calls", "start -> first agent audio, median ms", "max ms"], rows)
    saved = statistics.median(delays["direct"]) - statistics.median(delays[list(delays)[2]])
    rep.target(f"pre-connect hides the provider handshake when Twilio takes {gap:g} s to open the stream",
               f"{1000 * saved:.0f} ms saved of {1000 * min(gap, handshake):.0f} ms",
               saved >= 0.8 * min(gap, handshake))
    rep.data["greeting"] = delays


def summary(r: RunResult) -> dict:
    g = growth_ms(r.dg_lat, r.dg_times)
    return {"n": r.spec.n, "subs": r.spec.subs, "seconds": r.spec.seconds, "pace": r.spec.pace,
            "frames": r.frames, "cpu_s": r.cpu_s, "us_per_frame": r.us_per_frame, "server_cores": r.server_cores,
            "dg_p50_ms": pct(r.dg_lat, 50), "dg_p99_ms": pct(r.dg_lat, 99), "dg_missing": r.dg_missing,
            "dg_p99_first_quarter_ms": g[0], "dg_p99_last_quarter_ms": g[1], "dg_median_drift_ms": g[2],
            "sub_p50_ms": pct(r.sub_lat, 50), "sub_p99_ms": pct(r.sub_lat, 99), "sub_unmatched": r.sub_unmatched,
            "rss_idle": r.rss_idle, "rss_peak": r.rss_peak, "loadgen_lag_p99_ms": r.lag_p99 * 1000,
            "loadgen_cpu_s": r.loadgen_cpu_s, "fake_cpu_s": r.fake_cpu_s, "subs_cpu_s": r.subs_cpu_s,
            "notes": r.notes}


# --- command line --------------------------------------------------------------------------------

SCENARIOS = ("ratio", "fast", "latency", "fanout", "stalled", "saturation", "soak", "agent", "greeting")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="smoke run: small N, short runs (~1-2 min)")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios to run")
    p.add_argument("--n", type=int, help="calls for the floor-ratio runs (default 50)")
    p.add_argument("--pairs", type=int, help="floor/proxy pairs per ratio scenario (default 3)")
    p.add_argument("--seconds", type=float, help="audio per call in ratio/latency/fan-out runs (default 20)")
    p.add_argument("--fast-seconds", type=float, help="audio per call in the fast-pace ratio runs (default 20)")
    p.add_argument("--latency-ns", type=ints, help="N for the latency runs (default 50,200; the largest runs long)")
    p.add_argument("--long-seconds", type=float, help="the largest latency run's length (default 120)")
    p.add_argument("--subs", type=int, default=1, help="subscribers per call in ratio/latency/saturation (1)")
    p.add_argument("--fanout", default=None, help="N,S for the fan-out run (default 100,10)")
    p.add_argument("--stalled", default=None, help="N,S healthy subscribers for the stalled run (default 50,3)")
    p.add_argument("--saturation-ns", type=ints, help="N steps, stopping at the first that grows (default 100,150,200,250,300,400,500)")
    p.add_argument("--saturation-seconds", type=float, help="seconds per saturation step (default 20)")
    p.add_argument("--soak", default=None, help="CALLS,SECONDS,WAVES for the soak (default 100,120,3)")
    p.add_argument("--agent", default=None, help="N,SECONDS for the agent-call run (default 100,60)")
    p.add_argument("--greeting-calls", type=int, help="calls in the greeting-delay run (default 20)")
    p.add_argument("--greeting-handshake", type=float, default=0.5,
                   help="seconds the fake OpenAI takes to answer an upgrade in the greeting run (0.5)")
    p.add_argument("--greeting-gap", type=float, default=0.5,
                   help="assumed seconds from Twilio fetching the TwiML to the stream's start (0.5)")
    p.add_argument("--frame-ms", type=int, default=0, help="set DEEPGRAM_FRAME_MS for the server (default: its own)")
    p.add_argument("--window-ms", type=int, default=1000, help="fake Deepgram's result window (default 1000)")
    p.add_argument("--align-results", action="store_true",
                   help="start every call within one 20 ms tick (default: starts also spread over 1 s, so "
                        "transcript messages of different calls are not in step)")
    p.add_argument("--log-level", default="WARNING", help="server LOG_LEVEL (default WARNING)")
    p.add_argument("--profile", type=Path, help="also profile the proxy (py-spy) at N=--n; collapsed stacks here")
    p.add_argument("--baseline", metavar="GIT_REF[,GIT_REF...]", type=lambda t: [r for r in t.split(",") if r],
                   default=[], help="also run the proxy as of these git refs (e.g. HEAD for uncommitted changes), "
                                    "alternating with the working tree in the ratio and fan-out scenarios: "
                                    "before/after in one run")
    p.add_argument("--variant", metavar="VAR=VALUE[,VAR=VALUE...]", action="append", default=[],
                   type=lambda t: [v for v in t.split(",") if v],
                   help="also run this tree with these server settings (e.g. DEEPGRAM_FRAME_MS=200), like a "
                        "--baseline; repeatable")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, raw timings)")
    a = p.parse_args(argv)
    q = a.quick
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    for s in a.only:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    a.n = a.n or (20 if q else 50)
    a.pairs = a.pairs or (1 if q else 3)
    a.seconds = a.seconds or (8 if q else 20)
    a.fast_seconds = a.fast_seconds or (5 if q else 20)
    a.latency_ns = a.latency_ns or ([20, 50] if q else [50, 200])
    a.long_seconds = a.long_seconds or (10 if q else 120)
    a.fanout = ints(a.fanout) if a.fanout else ([20, 3] if q else [100, 10])
    a.stalled = ints(a.stalled) if a.stalled else ([10, 2] if q else [50, 3])
    a.saturation_ns = a.saturation_ns or ([100] if q else [100, 150, 200, 250, 300, 400, 500])
    a.saturation_seconds = a.saturation_seconds or (8 if q else 20)
    a.soak = ints(a.soak) if a.soak else ([20, 20, 3] if q else [100, 120, 3])
    a.agent = ints(a.agent) if a.agent else ([20, 20] if q else [100, 60])
    a.greeting_calls = a.greeting_calls or (9 if q else 30)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    rep = Report()
    started = time.monotonic()
    failed = True
    rep.add("## Proxy benchmark" + (" (--quick)" if args.quick else ""), "")
    rep.add(*[f"- {line}" for line in machine()], "")
    try:
        if "ratio" in args.only:
            scenario_ratio(bench, rep, "realtime", args.n, args.seconds, args.pairs)
        if "fast" in args.only:
            scenario_ratio(bench, rep, "fast", args.n, args.fast_seconds, max(1, args.pairs - 1))
        if "latency" in args.only:
            scenario_latency(bench, rep, args.latency_ns, args.seconds, args.long_seconds)
        if "fanout" in args.only:
            scenario_fanout(bench, rep, args.fanout[0], args.fanout[1], args.seconds)
        if "stalled" in args.only:
            scenario_stalled(bench, rep, args.stalled[0], args.stalled[1], args.seconds)
        if "saturation" in args.only:
            scenario_saturation(bench, rep, args.saturation_ns, args.saturation_seconds)
        if "soak" in args.only:
            scenario_soak(bench, rep, *args.soak)
        if "agent" in args.only:
            scenario_agent(bench, rep, *args.agent)
        if "greeting" in args.only:
            scenario_greeting(bench, rep, args.greeting_calls, args.greeting_handshake, args.greeting_gap)
        if args.profile:
            scenario_profile(bench, rep, args.n, max(args.seconds, 20), args.profile)
        failed = False
    finally:
        finish(rep, bench, args, started, failed)
    return 0


def finish(rep: Report, bench: Bench, args: argparse.Namespace, started: float, failed: bool) -> None:
    """The targets table, the report on stdout, --json, and the run directory removed (unless --keep)."""
    rep.add("### Targets", "")
    rep.table(["target", "measured", "verdict"], [list(t) for t in rep.targets])
    rep.add(f"benchmark wall time {time.monotonic() - started:.0f} s; run directory {bench.tmp}"
            + ("" if args.keep or failed else " (removed)"))
    print("\n".join(rep.lines), flush=True)
    if args.json:
        rep.data["targets"] = rep.targets
        rep.data["machine"] = machine()
        args.json.write_text(json.dumps(rep.data, indent=1, default=str))
    if not args.keep and not failed:
        import shutil
        shutil.rmtree(bench.tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
