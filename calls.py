"""Calls in progress: each one's mixer, upstream socket and Twilio stream sockets.

A `Call` exists from the first `start` for a callSid until its end-of-call sequence is over. It
is the only thing that knows both sides: Twilio media goes in through `media()`, mixed frames
go out to the upstream, and the upstream's messages go to the hub.

Handover: Twilio may open a second socket for a callSid it already streams. The new socket
joins the same `Call` (same upstream socket, same subscribers). If it carries a new streamSid
its timestamps restart at 0, so they are offset to continue where the call's audio has got to;
overlapping audio from the old socket then counts as duplicate. The call ends when its last
socket has gone (with or without `stop`).

End of call: flush the mixer's tail, send it and CloseStream upstream, wait (bounded) for the
upstream's last messages and deliver them, and only then end the subscriptions. The registry
entry goes last, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Callable, Protocol

import metrics
from audio import StereoMixer
from config import Settings
from hub import CallInfo, FanOut
from twilio_events import Media, Start

log = logging.getLogger(__name__)


class Upstream(Protocol):
    """What a call needs from its recogniser connection (see upstream.DeepgramStream)."""

    stats: object

    def start(self) -> None: ...
    def send_audio(self, frame: bytes) -> None: ...
    async def finish(self) -> None: ...


UpstreamFactory = Callable[..., Upstream]  # (call_sid, on_message, on_error) -> Upstream


class Call:
    def __init__(self, start: Start, settings: Settings, hub: FanOut, upstream_factory: UpstreamFactory):
        self.call_sid = start.callSid
        self.stream_sid = start.streamSid
        self.hub = hub
        self.info = CallInfo(
            callSid=start.callSid,
            streamSid=start.streamSid,
            accountSid=start.accountSid,
            tracks=start.tracks,
            customParameters=dict(start.customParameters),
            startTime=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        )
        self.mixer = StereoMixer(
            frame_ms=settings.frame_ms,
            max_lag_ms=settings.max_lag_ms,
            max_gap_ms=settings.max_gap_ms,
            tracks=start.tracks,
        )
        self.upstream = upstream_factory(self.call_sid, self._on_message, self._on_error)
        self.sockets: set = set()  # Twilio websockets feeding this call
        self.counters: Counter[str] = Counter()  # ignored events and bad frames, by kind
        self.messages = 0  # upstream messages published
        self.deliveries = 0  # copies queued to subscribers
        self.started = time.monotonic()
        self.ending = False
        self.ended = asyncio.Event()

    def begin(self) -> None:
        self.hub.open_call(self.info)
        self.upstream.start()
        metrics.calls_total.inc()
        metrics.calls_active.inc()
        log.info(
            "call started callSid=%s streamSid=%s tracks=%s params=%d",
            self.call_sid, self.stream_sid, ",".join(self.info.tracks), len(self.info.customParameters),
        )

    def media(self, event: Media, offset_ms: int = 0) -> None:
        for frame in self.mixer.push(event.track, event.timestamp + offset_ms, event.payload):
            self.upstream.send_audio(frame)

    def count(self, kind: str) -> None:
        self.counters[kind] += 1

    async def end(self) -> None:
        """The end-of-call sequence; returns once subscribers have been told."""
        self.ending = True
        for frame in self.mixer.flush():
            self.upstream.send_audio(frame)
        await self.upstream.finish()
        stats = self.upstream.stats
        outcome = stats.outcome
        summary = {
            "streamSid": self.stream_sid,
            "duration": round(time.monotonic() - self.started, 3),
            "audioSeconds": round(self.mixer.position / 8000, 3),
            "messages": self.messages,
            "endOfCall": outcome,
            "reconnects": stats.reconnects,  # recogniser connections re-opened, audio replayed
            "anomalies": self.mixer.stats.anomalies(),  # gaps, reordered, duplicates, late, jumps
        }
        if stats.error:
            summary["error"] = stats.error
        self.hub.close_call(self.call_sid, summary)
        self._record_metrics(outcome)
        mixer = self.mixer.stats
        log.info(
            "call ended callSid=%s streamSid=%s duration=%.1fs audio_bytes=%d media_frames=%d "
            "upstream_frames=%d upstream_bytes=%d unsent_bytes=%d reconnects=%d messages=%d delivered=%d "
            "end_of_call=%s anomalies=%s",
            self.call_sid, self.stream_sid, summary["duration"], mixer.bytes_in, mixer.chunks,
            stats.frames_sent, stats.bytes_sent, stats.bytes_unsent, stats.reconnects, self.messages,
            self.deliveries, outcome, _format_counts({**mixer.anomalies(), **self.counters}),
        )
        self.ended.set()

    def _on_message(self, message: str) -> None:
        self.messages += 1
        self.deliveries += self.hub.publish(self.call_sid, message)

    def _on_error(self, error: str) -> None:
        self.hub.publish_event(self.call_sid, {"type": "error", "message": error})

    def figures(self) -> metrics.Figures:
        """This call's counters so far, summed into /metrics at scrape time (metrics.CallFigures)."""
        mixer, upstream = self.mixer.stats, self.upstream.stats
        figures = {
            ("media_frames", ""): mixer.chunks,
            ("upstream_bytes", ""): upstream.bytes_sent,
            ("upstream_unsent_bytes", ""): upstream.bytes_unsent,
            ("upstream_messages", ""): upstream.messages,
            ("keepalives", ""): upstream.keepalives,
        }
        for kind, value in mixer.anomalies().items():
            figures["mixer_anomalies", kind] = value
        return figures

    def _record_metrics(self, outcome: str) -> None:
        metrics.calls_active.dec()
        metrics.end_of_call_total.labels(outcome).inc()
        if self.upstream.stats.error:
            metrics.upstream_errors_total.inc()


def _format_counts(counts: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in counts.items() if v) or "none"


class Calls:
    """The registry of calls in progress, keyed by callSid."""

    def __init__(self, settings: Settings, hub: FanOut, upstream_factory: UpstreamFactory):
        self.settings = settings
        self.hub = hub
        self.upstream_factory = upstream_factory
        self._calls: dict[str, Call] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def figures(self) -> list[metrics.Figures]:
        """Every call in progress's counters (a source for metrics.CALL_FIGURES)."""
        return [call.figures() for call in self._calls.values()]

    async def join(self, start: Start, socket) -> tuple[Call, int]:
        """A Twilio socket sent `start`: the call it belongs to, and its timestamp offset (ms)."""
        metrics.twilio_streams_total.inc()
        call = self._calls.get(start.callSid)
        if call is not None and call.ending:
            await call.ended.wait()  # a new stream right after the old one ended: a new call
            call = self._calls.get(start.callSid)
        if call is None:
            call = Call(start, self.settings, self.hub, self.upstream_factory)
            self._calls[call.call_sid] = call
            call.sockets.add(socket)
            call.begin()
            return call, 0
        offset = 0 if start.streamSid == call.stream_sid else call.mixer.frontier_ms
        call.sockets.add(socket)
        call.stream_sid = start.streamSid
        metrics.handovers_total.inc()
        log.info(
            "call %s: another Twilio socket joined (streamSid=%s, offset %d ms); %d sockets",
            call.call_sid, start.streamSid, offset, len(call.sockets),
        )
        return call, offset

    async def leave(self, call: Call, socket) -> None:
        """A Twilio socket is done; the last one to go runs the end-of-call sequence."""
        call.sockets.discard(socket)
        if call.sockets or call.ending:
            return
        try:
            await call.end()
        finally:
            if self._calls.get(call.call_sid) is call:
                del self._calls[call.call_sid]
                # In the same step, so a scrape counts the call once: live until here, ended after.
                metrics.CALL_FIGURES.ended.update(call.figures())
            call.ended.set()

    async def close_all(self, timeout: float) -> None:
        """Shutdown: close every Twilio socket so each call runs its end-of-call sequence."""
        calls = list(self._calls.values())
        for call in calls:
            for socket in list(call.sockets):
                await socket.close(1001, "server shutting down")
        if calls:
            done, pending = await asyncio.wait([asyncio.ensure_future(c.ended.wait()) for c in calls],
                                               timeout=timeout)
            for waiter in pending:
                waiter.cancel()
            if pending:
                log.warning("shutdown: %d calls did not finish within %.0f s", len(pending), timeout)
