"""Scale-out benchmark: Redis between instances, and WORKERS on one machine (README "Scaling out").

    .venv/bin/python bench/scaleout.py            # the full run (about 6-15 minutes)
    .venv/bin/python bench/scaleout.py --quick    # a smoke run (about 2 minutes)
    .venv/bin/python bench/scaleout.py --only latency,cpu,capacity --keep

Scenarios (each compares against a baseline measured in the same run, alternating):
- latency: N calls (100) sent to instance A, S (2) raw subscribers per call connected to
  instance B, one Redis between them: delivery latency from the fake Deepgram's send of a
  message to its arrival at a subscriber on B (so it includes A's own hop), p50/p99; next to the
  same calls with the subscribers on A itself.
- cpu: CPU per Twilio media frame of one server with REDIS_URL against the same server without
  it (the in-process hub), N = 50, S = 1 subscriber per call on the same server; the
  redis-server process's own CPU is reported apart.
- capacity: WORKERS=2 against WORKERS=1 (both with REDIS_URL, S = 1), alternating at each N
  step: the largest N whose Deepgram-side p99 stays within one upstream frame + 10 ms and does
  not grow during the step. CPU is the whole process tree (supervisor and workers).

Everything (servers, redis-server, the fake Deepgram, the load generators) shares this machine's
cores, so a capacity figure is what is left for the server after the load generator and the
fake have taken theirs. The processes, the load generator and the latency arithmetic are those of
bench/bench.py. Targets are printed as met/missed; nothing here is a test assertion.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from bench import (
    API_KEY, HERE, PY, ROOT, Bench, Proc, Report, RunResult, RunSpec, finish, fmt, free_port, growth_ms,
    machine, parse_args as bench_args, pct, proc_cpu, proc_times, wait_http,
)


@dataclass
class Setup:
    label: str
    servers: list[dict] = field(default_factory=lambda: [{}])  # extra settings per server; [0] gets the calls
    subs_on: int = 0  # which server the subscribers connect to
    redis: bool = True


def tree(pid: int) -> list[int]:
    """A process and its descendants (a WORKERS supervisor and its workers)."""
    pids = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    pids += tree(int(child))
    except OSError:
        pass
    return pids


def tree_times(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) summed over the processes."""
    user = system = 0.0
    for pid in pids:
        try:
            u, s = proc_times(pid)
        except OSError:
            continue
        user, system = user + u, system + s
    return user, system


def start_redis(d: Path) -> tuple[Proc, int]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server; make test installs it)")
    port = free_port()
    proc = Proc("redis", [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                          "no", "--dir", str(d)], log=d / "redis.log")
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


class Runner:
    """One measured run of a Setup: start everything, drive N calls and S subscribers per call."""

    def __init__(self, bench: Bench):
        self.b = bench

    def run(self, setup: Setup, n: int, subs: int, seconds: float) -> RunResult:
        b = self.b
        b.run_no += 1
        d = b.tmp / f"run{b.run_no:02d}-{setup.label.replace(' ', '_')}-{n}"
        d.mkdir()
        b.log(f"[scaleout] run {b.run_no}: {setup.label} N={n} S={subs} {seconds:g} s")
        res = RunResult(RunSpec(setup.label, n, seconds, subs=subs, label=setup.label))
        procs: list[Proc] = []
        try:
            self._run(setup, res, d, procs)
        finally:
            for p in reversed(procs):
                p.kill()
        return res

    def _run(self, setup: Setup, res: RunResult, d: Path, procs: list[Proc]) -> None:
        b = self.b
        extra = {}
        redis = None
        if setup.redis:
            redis, redis_port = start_redis(d)
            procs.append(redis)
            extra["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        fake = Proc("fake-deepgram", [PY, str(HERE / "fake_deepgram.py"), "--port", "0", "--api-key", API_KEY,
                                      "--window-ms", str(b.args.window_ms), "--dump", str(d / "fake.pickle")],
                    log=d / "fake.log")
        procs.append(fake)
        fake_port = int(fake.expect("READY", 20).split()[1])
        servers = []
        for i, settings in enumerate(setup.servers):
            port = free_port()
            server = Proc(f"server{i}", [PY, str(ROOT / "server.py")], env=b.server_env(port, fake_port, {**extra, **settings}),
                          cwd=str(d), log=d / f"server{i}.log")
            procs.append(server)
            servers.append((server, port))
        for _, port in servers:
            wait_http(port)
        time.sleep(1.0)  # workers started, Redis registrations done
        pids = [pid for server, _ in servers for pid in tree(server.pid)]
        wave = b._wave(res.spec, res, d / "w0", servers[0][1], servers[0][0], procs, subs_port=servers[setup.subs_on][1],
                       cpu=lambda: tree_times(pids), extra_cpu=lambda: proc_cpu(redis.pid) if redis else 0.0)
        res.frames, res.cpu_s, res.window_s = wave["frames"], wave["cpu"], wave["window"]
        res.lag_p99 = wave["lag_p99"]
        res.notes.append(f"redis_cpu={wave['extra_cpu']}")
        for server, _ in servers:
            code = server.stop()
            if code != 0:
                res.notes.append(f"{server.name} exited with {code} (log {server.log.name})")
        fake.stop()
        with open(d / "fake.pickle", "rb") as f:
            b._latencies(res, pickle.load(f), [wave])


def redis_cpu(r: RunResult) -> float:
    return float(next(n.split("=")[1] for n in r.notes if n.startswith("redis_cpu=")))


# --- scenarios ---------------------------------------------------------------------------------


def scenario_latency(runner: Runner, rep: Report, n: int, s: int, seconds: float) -> None:
    cross = Setup("subscribers on B", servers=[{}, {}], subs_on=1)
    local = Setup("subscribers on A", servers=[{}, {}], subs_on=0)
    rows, results = [], {}
    for setup in (local, cross):
        r = runner.run(setup, n, s, seconds)
        results[setup.label] = r
        rows.append([setup.label, str(n), str(s), fmt(pct(r.sub_lat, 50), 2), fmt(pct(r.sub_lat, 99), 2),
                     str(len(r.sub_lat)), str(r.sub_unmatched), f"{r.sub_closed_ok}/{r.sub_count}",
                     fmt(pct(r.dg_lat, 99)), str(r.dg_missing), fmt(r.lag_p99 * 1000, 1)])
    rep.add(f"### Cross-instance delivery: N = {n} calls to instance A, S = {s} raw subscribers per call, "
            f"{seconds:g} s real time, one Redis (latency: fake Deepgram send → subscriber receive)", "")
    rep.table(["subscribers", "N", "S", "p50 ms", "p99 ms", "deliveries", "unmatched", "closed 1000",
               "DG p99 ms", "chunks missing", "loadgen lag p99 ms"], rows)
    r = results[cross.label]
    p99 = pct(r.sub_lat, 99)
    rep.target(f"cross-instance delivery p99 ≤ 10 ms (N = {n}, S = {s})",
               f"p50 {pct(r.sub_lat, 50):.2f} ms, p99 {p99:.2f} ms ({r.sub_unmatched} unmatched, "
               f"{r.sub_closed_ok}/{r.sub_count} closed with 1000)", p99 <= 10 and r.sub_unmatched == 0)
    rep.data["latency"] = {k: {"p50_ms": pct(v.sub_lat, 50), "p99_ms": pct(v.sub_lat, 99),
                               "deliveries": len(v.sub_lat), "unmatched": v.sub_unmatched} for k, v in results.items()}


def scenario_cpu(runner: Runner, rep: Report, n: int, seconds: float, pairs: int) -> None:
    setups = (Setup("in-process hub", redis=False), Setup("Redis hub"))
    runs: dict[str, list[RunResult]] = {s.label: [] for s in setups}
    rows = []
    for _ in range(pairs):
        for setup in setups:
            r = runner.run(setup, n, 1, seconds)
            runs[setup.label].append(r)
            redis_us = redis_cpu(r) / r.frames * 1e6 if r.frames else float("nan")
            rows.append([setup.label, str(n), str(r.frames), fmt(r.cpu_s, 2), fmt(r.us_per_frame, 1),
                         fmt(redis_us, 1) if setup.redis else "-", fmt(pct(r.sub_lat, 99), 2), fmt(r.lag_p99 * 1000, 1)])
    median = {k: statistics.median(r.us_per_frame for r in v) for k, v in runs.items()}
    redis_median = statistics.median(redis_cpu(r) / r.frames * 1e6 for r in runs["Redis hub"])
    ratio = median["Redis hub"] / median["in-process hub"]
    with_redis = (median["Redis hub"] + redis_median) / median["in-process hub"]
    rep.add(f"### CPU per Twilio media frame: Redis hub against the in-process hub, N = {n}, S = 1 on the same "
            f"server, {seconds:g} s real time, alternating", "")
    rep.table(["hub", "N", "media frames", "server CPU s", "server µs/frame", "redis-server µs/frame",
               "sub p99 ms", "loadgen lag p99 ms"], rows)
    rep.add(f"median: in-process {median['in-process hub']:.1f} µs/frame, Redis {median['Redis hub']:.1f} µs/frame "
            f"(**{ratio:.3f}×**), plus redis-server {redis_median:.1f} µs/frame ({with_redis:.3f}× counting it)", "")
    rep.target("Redis adds ≤ 15 % CPU per frame over the in-process hub (server process)",
               f"{(ratio - 1) * 100:+.1f} % (redis-server's own CPU would add {redis_median:.1f} µs/frame more)",
               ratio <= 1.15)
    rep.data["cpu"] = {"median_us": median, "redis_server_us": redis_median, "ratio": ratio}


def scenario_capacity(runner: Runner, rep: Report, ns: list[int], seconds: float) -> None:
    limit = runner.b.args.frame_ms or 100
    limit += 10
    setups = (Setup("WORKERS=1", servers=[{"WORKERS": "1"}]), Setup("WORKERS=2", servers=[{"WORKERS": "2"}]))
    rows, carried, saturated = [], {s.label: 0 for s in setups}, set()
    for n in ns:
        for setup in setups:
            if setup.label in saturated:
                continue
            r = runner.run(setup, n, 1, seconds)
            g = growth_ms(r.dg_lat, r.dg_times)
            p50, p99 = pct(r.dg_lat, 50), pct(r.dg_lat, 99)
            grows = not (g[2] == g[2]) or g[2] > 10 or p50 > limit - 10 or p99 > 1000 or r.dg_missing > 0
            verdict = "grows (saturated)" if grows else ("stable, p99 over target" if p99 > limit else "carried")
            if r.lag_p99 > 0.02:
                verdict += "; load generator late"
            if grows:
                saturated.add(setup.label)
            elif p99 <= limit:
                carried[setup.label] = max(carried[setup.label], n)
            rows.append([setup.label, str(n), fmt(p50), fmt(p99), fmt(g[2]), fmt(r.server_cores, 2),
                         fmt(r.lag_p99 * 1000, 1), verdict])
            rep.data.setdefault("capacity", []).append({"setup": setup.label, "n": n, "dg_p50_ms": p50,
                                                        "dg_p99_ms": p99, "drift_ms": g[2],
                                                        "cores": r.server_cores, "verdict": verdict})
        if len(saturated) == len(setups):
            break
    rep.add(f"### Capacity: WORKERS=2 against WORKERS=1 (REDIS_URL set, S = 1), {seconds:g} s real time per step, "
            f"alternating; carried = DG p99 ≤ {limit} ms and no growth", "")
    rep.table(["setup", "N", "DG p50 ms", "DG p99 ms", "median drift ms", "server cores (all processes)",
               "loadgen lag p99 ms", "verdict"], rows)
    one, two = carried["WORKERS=1"], carried["WORKERS=2"]
    ratio = two / one if one else float("nan")
    top = max(ns)
    rep.add(f"largest N carried: WORKERS=1 **{one}**, WORKERS=2 **{two}**"
            + ("" if len(saturated) == len(setups) else f" (steps stop at N = {top}: "
               + ", ".join(f"{s.label} never saturated" for s in setups if s.label not in saturated) + ")"), "")
    rep.target("WORKERS=2 carries ≥ 1.7× the calls of WORKERS=1 (same run)",
               f"{two} vs {one} calls: {ratio:.2f}×" + ("" if len(saturated) == len(setups) else " (a lower bound: "
                                                       "not every setup saturated within the steps)"),
               ratio >= 1.7 if one else None)


SCENARIOS = ("latency", "cpu", "capacity")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small N, short runs (~3 min)")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--latency", default=None, help="N,S for the cross-instance run (default 100,2)")
    p.add_argument("--seconds", type=float, help="audio per call in the latency and cpu runs (default 20)")
    p.add_argument("--pairs", type=int, help="in-process/Redis pairs in the cpu scenario (default 3)")
    p.add_argument("--cpu-n", type=int, help="calls in the cpu scenario (default 50)")
    p.add_argument("--capacity-ns", type=lambda t: [int(x) for x in t.split(",") if x],
                   help="N steps for the capacity scenario (default 100,200,300,400,500,600,700,800)")
    p.add_argument("--capacity-seconds", type=float, help="seconds per capacity step (default 20)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, raw timings)")
    a = p.parse_args(argv)
    q = a.quick
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    for s in a.only:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    a.latency = [int(x) for x in a.latency.split(",")] if a.latency else ([30, 2] if q else [100, 2])
    a.seconds = a.seconds or (8 if q else 20)
    a.pairs = a.pairs or (1 if q else 3)
    a.cpu_n = a.cpu_n or (20 if q else 50)
    a.capacity_ns = a.capacity_ns or ([100, 200] if q else [100, 200, 300, 400, 500, 600, 700, 800])
    a.capacity_seconds = a.capacity_seconds or (8 if q else 20)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(bench_args(["--only", "ratio"] + (["--keep"] if args.keep else [])))
    runner = Runner(bench)
    rep = Report()
    started = time.monotonic()
    failed = True
    rep.add("## Scale-out benchmark" + (" (--quick)" if args.quick else ""), "")
    rep.add(*[f"- {line}" for line in machine()], "")
    try:
        if "latency" in args.only:
            scenario_latency(runner, rep, args.latency[0], args.latency[1], args.seconds)
        if "cpu" in args.only:
            scenario_cpu(runner, rep, args.cpu_n, args.seconds, args.pairs)
        if "capacity" in args.only:
            scenario_capacity(runner, rep, args.capacity_ns, args.capacity_seconds)
        failed = False
    finally:
        finish(rep, bench, args, started, failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
