"""Process-wide counters, served at /metrics in the Prometheus text format.

Per-call figures live on the `Call` and go to the end-of-call log line; these are the totals an
operator graphs and alerts on.

Figures that change per media frame (frames, mixer anomalies, upstream bytes, ...) are plain
integers on each call, not Prometheus counters: a counter takes a lock per increment, 50 times a
second per leg per call. `CALL_FIGURES.flush()` sums them over the calls in progress (every
registered `source`) plus what ended calls left in `ended`, and adds the growth since its last
flush to real counters. Each figure only grows, and a call's figures move from live to ended in
one step, so the sum never double-counts and never goes back. A scrape flushes first, so the
process that answers is exact to the frame.

WORKERS > 1 (server.py's supervisor sets PROMETHEUS_MULTIPROC_DIR for its workers): every metric
is prometheus-client's multiprocess kind, kept in a file per process, and a scrape on any worker
reads them all (`MultiProcessCollector`). Each worker flushes its call figures and its process
figures (memory, fds, CPU, tasks) every FLUSH_SECONDS, so another worker's part of a scrape is at
most that old; still nothing per frame, and still exact once flushed.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter as Tally
from typing import Callable, Iterable

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, ProcessCollector, disable_created_metrics, generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

disable_created_metrics()  # the *_created series only add noise to a scrape
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ
FLUSH_SECONDS = 1.0

if MULTIPROCESS:
    # Metric objects write to this process's files; scrapes read every worker's files.
    REGISTRY = CollectorRegistry()  # the objects below (not scraped directly)
    SCRAPE = CollectorRegistry()
    MultiProcessCollector(SCRAPE)
else:
    REGISTRY = SCRAPE = CollectorRegistry()
    ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_open_fds, CPU seconds


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop: scraped from another thread
        return 0


asyncio_tasks = Gauge("asyncio_tasks", "Tasks alive in the event loop (leak detector)", registry=REGISTRY,
                      multiprocess_mode="livesum")
if not MULTIPROCESS:
    asyncio_tasks.set_function(_task_count)

calls_active = Gauge("calls_active", "Calls in progress", registry=REGISTRY, multiprocess_mode="livesum")
calls_total = Counter("calls", "Calls started", registry=REGISTRY)
twilio_streams_total = Counter("twilio_streams", "Twilio stream sockets that sent a start", registry=REGISTRY)
handovers_total = Counter("handovers", "Second Twilio sockets joining a call in progress", registry=REGISTRY)
twilio_events_total = Counter(
    "twilio_events_ignored", "Twilio events counted and ignored (mark, dtmf, unknown, ...)", ["event"],
    registry=REGISTRY,
)
bad_frames_total = Counter("bad_frames", "Unusable Twilio messages, by kind", ["kind"], registry=REGISTRY)
upstream_errors_total = Counter("upstream_errors", "Recogniser connections that failed", registry=REGISTRY)
upstream_reconnects_total = Counter(
    "upstream_reconnects", "Recogniser connections re-opened after a drop, audio replayed", registry=REGISTRY
)
upstream_connect_failures_total = Counter(
    "upstream_connect_failures", "Failed attempts to open a recogniser connection, by kind", ["kind"],
    registry=REGISTRY,
)
end_of_call_total = Counter(
    "end_of_call", "End-of-call flushes, by outcome (complete: Metadata received)", ["outcome"],
    registry=REGISTRY,
)
subscribers_active = Gauge("subscribers_active", "Connected /client subscribers", registry=REGISTRY,
                           multiprocess_mode="livesum")
subscribers_dropped_total = Counter(
    "subscribers_dropped", "Subscribers closed for falling behind", registry=REGISTRY
)
subscriber_rejections_total = Counter(
    "subscriber_rejections", "Subscriptions refused, by reason", ["reason"], registry=REGISTRY
)
subscriber_junk_total = Counter(
    "subscriber_junk_messages", "Messages subscribers sent after subscribing (ignored)", registry=REGISTRY
)
auth_failures_total = Counter(
    "auth_failures", "Connections refused for a missing or wrong credential, by route and reason",
    ["endpoint", "reason"], registry=REGISTRY,
)
limit_refusals_total = Counter(
    "limit_refusals", "Connections refused or closed for exceeding a configured limit, by limit", ["limit"],
    registry=REGISTRY,
)

redis_connected = Gauge("redis_connected", "1 while Redis answers (REDIS_URL set; the lowest of the workers)",
                        registry=REGISTRY, multiprocess_mode="livemin")
redis_publish_waiting = Gauge("redis_publish_waiting", "Entries waiting to be written to Redis", registry=REGISTRY,
                              multiprocess_mode="livesum")
redis_published_total = Counter("redis_published", "Entries written to Redis (calls' messages, starts, ends)",
                                registry=REGISTRY)
redis_publish_dropped_total = Counter(
    "redis_publish_dropped", "Entries not written to Redis because REDIS_BUFFER was full, by kind", ["kind"],
    registry=REGISTRY,
)
redis_received_total = Counter("redis_received", "Entries of other instances' calls read from Redis",
                               registry=REGISTRY)
redis_missed_total = Counter(
    "redis_missed", "Entries of other instances' calls that never arrived (not published, or lost by Redis)",
    registry=REGISTRY,
)
redis_errors_total = Counter("redis_errors", "Failed Redis round trips, by task", ["task"], registry=REGISTRY)


# name -> (help, label name or None); a call's figures are {(name, label value or ""): value}.
CALL_FIGURE_HELP = {
    "media_frames": ("Twilio media messages received", None),
    "mixer_anomalies": ("Chunks that were lost, late, duplicated, reordered or re-based", "kind"),
    "upstream_bytes": ("Audio bytes sent to the recogniser", None),
    "upstream_unsent_bytes": ("Audio bytes that never reached the recogniser", None),
    "upstream_messages": ("Messages received from the recogniser", None),
    "keepalives": ("KeepAlive messages sent to the recogniser", None),
}
Figures = dict[tuple[str, str], int]


class CallFigures:
    """Per-call integers, added to real counters by their growth at each flush."""

    def __init__(self) -> None:
        self.ended: Tally[tuple[str, str]] = Tally()
        self.sources: set[Callable[[], Iterable[Figures]]] = set()  # each: the live calls' figures
        self._flushed: Tally[tuple[str, str]] = Tally()
        self._counters = {name: Counter(name, help_text, [label] if label else [], registry=REGISTRY)
                          for name, (help_text, label) in CALL_FIGURE_HELP.items()}

    def flush(self) -> None:
        totals = Tally(self.ended)
        for source in list(self.sources):
            for figures in source():
                totals.update(figures)
        for (name, label), value in totals.items():
            growth = value - self._flushed[name, label]
            if growth > 0:
                counter = self._counters[name]
                (counter.labels(label) if label else counter).inc(growth)
        self._flushed = totals


CALL_FIGURES = CallFigures()

if MULTIPROCESS:  # what ProcessCollector reports for one process, summed over the workers
    process_memory = Gauge("process_resident_memory_bytes", "Resident memory of the server's processes",
                           registry=REGISTRY, multiprocess_mode="livesum")
    process_fds = Gauge("process_open_fds", "Open file descriptors of the server's processes",
                        registry=REGISTRY, multiprocess_mode="livesum")
    process_cpu = Counter("process_cpu_seconds", "CPU time of the server's processes", registry=REGISTRY)
    _process = ProcessCollector(registry=None)
    _cpu_flushed = [0.0]


def flush() -> None:
    """This process's figures into its metrics (every scrape; periodically with workers)."""
    CALL_FIGURES.flush()
    if MULTIPROCESS:
        asyncio_tasks.set(_task_count())
        values = {sample.name: sample.value for family in _process.collect() for sample in family.samples}
        process_memory.set(values.get("process_resident_memory_bytes", 0))
        process_fds.set(values.get("process_open_fds", 0))
        cpu = values.get("process_cpu_seconds_total", 0.0)
        process_cpu.inc(max(0.0, cpu - _cpu_flushed[0]))
        _cpu_flushed[0] = cpu


async def flush_periodically() -> None:
    while True:
        flush()
        await asyncio.sleep(FLUSH_SECONDS)


def render() -> bytes:
    flush()
    return generate_latest(SCRAPE)
