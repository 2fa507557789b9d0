"""Server health for JSON subscribers that ask for it (`"health": true`), from /metrics' numbers.

The dashboard shows calls now, recogniser and agent errors and dropped subscribers. Those are
counters `/metrics` already has, so they are read from the same registry (`metrics.SCRAPE`,
which with WORKERS > 1 is every worker's), never counted a second time: a health event and a
scrape taken at the same moment agree. The numbers are this server's (all its workers), not the
whole cluster's when several servers share Redis.

One task per process reads the registry every HEALTH_SECONDS while anyone listens and offers the
same encoded event to each health subscriber's bounded outbox; a subscriber whose outbox is full
is dropped (4429), as the hub does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timezone
from typing import Iterable, NamedTuple

import metrics
from hub import Subscriber

log = logging.getLogger(__name__)

HEALTH_SECONDS = 2.0


class Sample(NamedTuple):
    name: str  # as /metrics writes it: counters end in _total
    labels: dict[str, str]
    value: float


# Each figure of the health event: the sum of these samples (name, labels they must carry).
FIGURES: dict[str, list[tuple[str, dict[str, str]]]] = {
    "callsActive": [("calls_active", {}), ("agent_calls_active", {})],
    "subscribersActive": [("subscribers_active", {})],
    "recogniserErrors": [("upstream_errors_total", {})],
    "recogniserReconnects": [("upstream_reconnects_total", {})],
    "agentErrors": [("agent_provider_errors_total", {"fatal": "true"})],
    "agentWarnings": [("agent_provider_errors_total", {"fatal": "false"})],
    "droppedSubscribers": [("subscribers_dropped_total", {})],
    "badFrames": [("bad_frames_total", {})],
    "authFailures": [("auth_failures_total", {})],
}


def figures(samples: Iterable[Sample]) -> dict[str, int]:
    """The health figures from /metrics samples (a figure whose metric is absent is 0)."""
    totals = dict.fromkeys(FIGURES, 0.0)
    wanted: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for figure, sources in FIGURES.items():
        for name, labels in sources:
            wanted.setdefault(name, []).append((figure, labels))
    for sample in samples:
        for figure, labels in wanted.get(sample.name, ()):
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                totals[figure] += sample.value
    return {figure: int(total) for figure, total in totals.items()}


def read_samples() -> list[Sample]:
    """What a scrape of /metrics would show now."""
    metrics.flush()
    return [Sample(s.name, s.labels, s.value) for family in metrics.SCRAPE.collect() for s in family.samples]


def health_event() -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return json.dumps({"type": "health", "time": now, **figures(read_samples())})


class HealthFeed:
    """The subscribers that asked for health, and the one task that tells them."""

    def __init__(self, interval: float = HEALTH_SECONDS):
        self.interval = interval
        self.subscribers: set[Subscriber] = set()
        self._task: asyncio.Task | None = None

    def add(self, sub: Subscriber) -> None:
        """The figures now, then every `interval` seconds."""
        self.subscribers.add(sub)
        self._offer([sub], health_event())
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="health")

    def discard(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        if not self.subscribers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while self.subscribers:
            await asyncio.sleep(self.interval)
            self._offer(list(self.subscribers), health_event())

    def _offer(self, subscribers: list[Subscriber], message: str) -> None:
        for sub in subscribers:
            if not sub.offer(message):
                log.warning("subscriber %s dropped: %d messages queued and not read", sub.peer, sub.max_queue)
                self.subscribers.discard(sub)
                sub.drop()
