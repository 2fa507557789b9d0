"""WORKERS=N: N server processes on one port, to use every core of a machine.

`python server.py` with WORKERS > 1 runs `supervise()`: it starts N copies of
`server.py --worker I`, each a complete server (its own calls, recogniser connections and
subscribers) listening on the same host:port with SO_REUSEPORT, so the kernel spreads new
connections over them. They meet through Redis (REDIS_URL is required) exactly as instances on
different machines do: a subscriber reaching worker 2 gets a call that Twilio sent to worker 1.

- /metrics: the supervisor gives the workers a fresh PROMETHEUS_MULTIPROC_DIR (removed at
  exit), so every metric is prometheus-client's multiprocess kind and any worker's scrape shows
  the whole server (metrics.py).
- SIGTERM or SIGINT: passed to every worker; each drains its calls (SHUTDOWN_TIMEOUT) and exits;
  the supervisor exits 0 once all have (a worker still there SHUTDOWN_TIMEOUT + 10 s later is
  killed, and the exit status is 1).
- A worker that dies on its own is logged and started again (its live gauges are dropped, its
  counters stay counted). Three that die within 10 s of starting in a row stop the server
  (exit status 1): something is wrong with the set-up, not with a call.

The embedded recogniser runs in each worker, each with a process pool sized to the cores: with
it, N workers means N pools competing for the same cores (README "Scaling out").
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from config import Settings

log = logging.getLogger("workers")

QUICK_DEATH_SECONDS = 10.0
MAX_QUICK_DEATHS = 3
POLL_SECONDS = 0.2


def supervise(settings: Settings, server_py: Path) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="twilio-transcribe-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    workers: dict[int, tuple[subprocess.Popen, float]] = {}
    stop_deadline: list[float] = []  # set once a signal arrived
    status = 0

    def start(index: int) -> None:
        process = subprocess.Popen([sys.executable, str(server_py), "--worker", str(index)], env=env)
        workers[index] = (process, time.monotonic())

    def stop(signum: int, _frame) -> None:
        if not stop_deadline:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(workers))
            stop_deadline.append(time.monotonic() + settings.shutdown_timeout + 10)
        for process, _ in workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("starting %d workers on %s:%d (SO_REUSEPORT)", settings.workers, settings.host, settings.port)
    for index in range(1, settings.workers + 1):
        start(index)
    quick_deaths = 0
    try:
        while workers:
            time.sleep(POLL_SECONDS)
            for index, (process, started) in list(workers.items()):
                code = process.poll()
                if code is None:
                    if stop_deadline and time.monotonic() > stop_deadline[0]:
                        log.error("worker %d (pid %d) did not stop in time: killed", index, process.pid)
                        process.kill()
                    continue
                del workers[index]
                mark_process_dead(process.pid, metrics_dir)
                if stop_deadline:
                    if code != 0:
                        status = 1
                    continue
                quick_deaths = quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH_SECONDS else 0
                if quick_deaths >= MAX_QUICK_DEATHS:
                    log.error("worker %d exited with %s: %d workers in a row died within %.0f s of starting; "
                              "stopping", index, code, quick_deaths, QUICK_DEATH_SECONDS)
                    status = 1
                    stop(signal.SIGTERM, None)
                    continue
                log.error("worker %d (pid %d) exited with %s; starting it again", index, process.pid, code)
                start(index)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("all workers stopped")
    return status
