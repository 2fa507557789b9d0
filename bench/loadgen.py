"""The benchmark's load generator: Twilio calls (one process) and subscribers (another).

    python bench/loadgen.py twilio CONFIG.json     # N calls, both legs, 20 ms frames
    python bench/loadgen.py subs CONFIG.json       # S raw-mode subscribers per call
    python bench/loadgen.py agent CONFIG.json      # N agent calls on /agent, with Twilio's player

Both speak a line protocol with the orchestrator (bench.py) on stdin/stdout:
  twilio: connects every call and sends `connected` + `start` (with `simulate.TwilioStream`),
          prints READY, waits for a GO line, prints `T0 <monotonic>`, plays the media (each
          call sends `stop` and closes right after its own last chunk), writes its results (pickle) and prints DONE.
  subs:   connects and subscribes (the calls must be in progress), prints READY, records every
          message's arrival until the calls end (or --deadline), writes results, prints DONE.

Why not `simulate.run_calls()`: at 200+ calls one Python process cannot afford a task wake-up,
a `json.dumps`, a base64 encode and a `ws.send()` per 20 ms frame per leg while sharing two
cores with the server it measures. Here one scheduler task sends every call's due frames; each
message's text is a template with the numbers filled in (byte-for-byte the shape
`TwilioStream.media()` produces, checked at start-up) and is framed by hand as a masked client
text frame, written with one `transport.write()` per call per 20 ms tick (inbound + outbound,
as Twilio emits both tracks of a tick together). The server receives exactly what a real
client would send. `sent_at` is `time.monotonic()` just before each write.

Call `i`'s inbound audio starts with `b"%08d" % i`: the Deepgram side finds its call by that.
"""

from __future__ import annotations

import array
import asyncio
import base64
import hashlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from simulate import TwilioStream  # noqa: E402

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

FRAME_MS = 20
CHUNK_BYTES = 160  # 20 ms of 8 kHz mu-law
CONNECT_CONCURRENCY = 32


def payloads(index: int) -> tuple[bytes, bytes]:
    """Per-call constant audio: inbound starts with the call's index, outbound differs."""
    tag = b"%08d" % index
    inbound = (tag + bytes((index * 7 + k * 13) % 256 for k in range(CHUNK_BYTES)))[:CHUNK_BYTES]
    outbound = bytes((index * 11 + k * 5 + 1) % 256 for k in range(CHUNK_BYTES))
    return inbound, outbound


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


class CallSender:
    """One call: its socket, its stream builder and its message templates."""

    __slots__ = ("index", "ws", "stream", "mask", "tmpl", "sent_at", "seq", "offset_s", "transport",
                 "start_tick")

    def __init__(self, index: int, call_sid: str, ticks: int, offset_s: float):
        self.index = index
        self.ws = None
        self.transport = None
        self.stream = TwilioStream(call_sid=call_sid, tracks=["inbound", "outbound"])
        self.mask = os.urandom(4)
        self.sent_at = array.array("d")
        self.seq = 0
        self.offset_s = offset_s  # phase within the 20 ms tick
        self.start_tick = 0  # global tick at which this call's audio starts
        inbound, outbound = payloads(index)
        self.tmpl = {}
        for track, audio in (("inbound", inbound), ("outbound", outbound)):
            b64 = base64.b64encode(audio).decode("ascii")
            self.tmpl[track] = (
                '{"event":"media","sequenceNumber":"%d","streamSid":"' + self.stream.stream_sid
                + '","media":{"track":"' + track + '","chunk":"%d","timestamp":"%d","payload":"'
                + b64 + '"}}'
            )

    def check_template(self) -> None:
        """The hand-made text must equal what TwilioStream.media() builds."""
        probe = TwilioStream(stream_sid=self.stream.stream_sid, tracks=["inbound", "outbound"])
        probe.sequence = 41
        inbound, _ = payloads(self.index)
        want = probe.media("inbound", 60, inbound, chunk=4)
        got = self.tmpl["inbound"] % (42, 4, 60)
        if want != got:
            raise SystemExit(f"loadgen: template differs from TwilioStream.media():\n{got}\n{want}")

    def frame(self, text: str) -> bytes:
        data = text.encode()
        n = len(data)
        if n < 126:
            head = bytes((0x81, 0x80 | n))
        elif n < 65536:
            head = bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x81, 0xFF)) + n.to_bytes(8, "big")
        return head + self.mask + apply_mask(data, self.mask)

    def tick_bytes(self, k: int) -> bytes:
        """Both legs' media messages for tick k (timestamp 20 k ms, chunk k + 1)."""
        ts = k * FRAME_MS
        seq = self.stream.sequence
        a = self.tmpl["inbound"] % (seq + 1, k + 1, ts)
        b = self.tmpl["outbound"] % (seq + 2, k + 1, ts)
        self.stream.sequence = seq + 2
        return self.frame(a) + self.frame(b)


async def _open(url: str, sem: asyncio.Semaphore):
    async with sem:
        for attempt in range(5):
            try:
                return await connect(url, compression=None, open_timeout=30, close_timeout=10,
                                     max_queue=None)
            except OSError:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))


async def _drain_incoming(ws) -> None:
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass


async def run_twilio(cfg: dict) -> None:
    url, sids, ticks, pace = cfg["url"], cfg["call_sids"], cfg["ticks"], cfg["pace"]
    n = len(sids)
    spread = cfg.get("spread", True)
    # Call i starts at phase i/N of the 20 ms tick (real calls are not in step), plus a whole
    # number of ticks spreading the starts over one second: otherwise every call's transcript
    # windows would end in the same 20 ms and the subscribers would see bursts no real call mix
    # produces. `align_results` keeps all starts within one tick.
    def phase(i: int) -> float:
        return i * FRAME_MS / n / 1000 if spread else 0.0

    def start_tick(i: int) -> int:
        return 0 if cfg.get("align_results") or not spread else (i * 17) % 50

    calls = [CallSender(i, sid, ticks, phase(i)) for i, sid in enumerate(sids)]
    for c in calls:
        c.start_tick = start_tick(c.index)
    calls[0].check_template()
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_call(c: CallSender) -> None:
        c.ws = await _open(url, sem)
        c.transport = c.ws.transport
        await c.ws.send(c.stream.connected())
        await c.ws.send(c.stream.start())

    await asyncio.gather(*(open_call(c) for c in calls))
    readers = [asyncio.create_task(_drain_incoming(c.ws)) for c in calls]
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if not line.startswith("GO"):
        raise SystemExit("loadgen: expected GO")
    t0 = time.monotonic() + 0.05
    print(f"T0 {t0!r}", flush=True)
    lag = array.array("d")  # how late each write went out vs its schedule (load-generator health)

    async def finish(c: CallSender) -> None:
        """`stop` and close as soon as the call's own audio is over, as Twilio does at hang-up."""
        try:
            await c.ws.send(c.stream.stop())
            await c.ws.close()
        except ConnectionClosed:
            pass

    finishing = []
    if pace == "realtime":
        # One scheduler for every call: wake at the next due time, write what is due.
        order = sorted(calls, key=lambda c: c.offset_s)
        period = FRAME_MS / 1000
        last_tick = max(c.start_tick for c in calls) + ticks
        for g in range(last_tick):
            base = t0 + g * period
            for c in order:
                k = g - c.start_tick
                if not 0 <= k < ticks:
                    continue
                due = base + c.offset_s
                now = time.monotonic()
                if due - now > 0.0005:
                    await asyncio.sleep(due - now)
                    now = time.monotonic()
                if c.transport.is_closing():
                    c.sent_at.append(float("nan"))
                    continue
                data = c.tick_bytes(k)
                c.sent_at.append(now)
                lag.append(now - due)
                c.transport.write(data)
                if k == ticks - 1:
                    finishing.append(asyncio.create_task(finish(c)))
    else:  # fast: every call as fast as the server reads, bounded by the socket's flow control
        batch = cfg.get("batch_ticks", 10)

        async def blast(c: CallSender) -> None:
            for k0 in range(0, ticks, batch):
                now = time.monotonic()
                parts = []
                for k in range(k0, min(ticks, k0 + batch)):
                    parts.append(c.tick_bytes(k))
                    c.sent_at.append(now)
                if c.transport.is_closing():
                    return
                c.transport.write(b"".join(parts))
                await c.ws.drain()
                await asyncio.sleep(0)
            await finish(c)

        finishing = [asyncio.create_task(blast(c)) for c in calls]
        await asyncio.gather(*finishing)
    t_media_end = time.monotonic()
    print(f"SENT {t_media_end!r}", flush=True)
    await asyncio.gather(*finishing)
    await asyncio.gather(*readers)
    result = {
        "t0": t0,
        "t_media_end": t_media_end,
        "t_closed": time.monotonic(),
        "sent_at": {c.index: c.sent_at for c in calls},
        "lag": lag,
        "cpu": time.process_time(),
    }
    with open(cfg["out"], "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    print("DONE", flush=True)


async def run_subs(cfg: dict) -> None:
    url, sids = cfg["url"], cfg["call_sids"]
    per_call, stalled_per_call = cfg["per_call"], cfg.get("stalled_per_call", 0)
    deadline = cfg.get("deadline", 600.0)
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    healthy: list[tuple[int, object]] = []
    stalled: list[object] = []

    async def subscribe(index: int, sid: str, stall: bool) -> None:
        ws = await _open(url, sem)
        greeting = json.loads(await ws.recv())
        if sid not in greeting:
            raise SystemExit(f"subs: call {sid} not in progress")
        await ws.send(sid)
        if stall:
            ws.transport.pause_reading()  # never read again: the kernel buffers fill, then the proxy's
            stalled.append(ws)
        else:
            healthy.append((index, ws))

    await asyncio.gather(*(subscribe(i, sid, stall)
                           for i, sid in enumerate(sids)
                           for stall in [False] * per_call + [True] * stalled_per_call))
    print("READY", flush=True)
    records: list[tuple[int, array.array, list[bytes], int | None]] = []

    async def listen(index: int, ws) -> None:
        times, keys = array.array("d"), []
        try:
            async for message in ws:
                times.append(time.monotonic())
                keys.append(digest(message) if isinstance(message, str) else b"")
        except ConnectionClosed:
            pass
        records.append((index, times, keys, ws.close_code))

    tasks = [asyncio.create_task(listen(i, ws)) for i, ws in healthy]
    done, pending = await asyncio.wait(tasks, timeout=deadline) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    stalled_codes = []
    for ws in stalled:
        stalled_codes.append(ws.close_code)
        ws.transport.abort()
    with open(cfg["out"], "wb") as f:
        pickle.dump({"records": records, "stalled_codes": stalled_codes, "cpu": time.process_time()},
                    f, protocol=pickle.HIGHEST_PROTOCOL)
    print("DONE", flush=True)


# --- agent calls (<Connect><Stream> on /agent) -----------------------------------------------------


def _loud(n: int) -> bytes:
    """A loud 300 Hz tone in mu-law: speech to the fake agent's voice-activity detection."""
    import numpy as np

    import codec
    t = np.arange(n) / 8000
    return codec.pcm16_to_ulaw((12000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16))


class AgentCaller:
    """One agent call: the caller's media out, and Twilio's player for what comes back.

    The player is event-driven rather than ticking: each `media` extends the time its queue plays
    until (real time from when it arrived, or from when the queue ran dry), a `mark` is echoed
    when the queue reaches it, and `clear` echoes the pending marks at once.
    """

    def __init__(self, index: int, call_sid: str, sender: CallSender):
        self.index = index
        self.sender = sender  # for the stream ids, the masking and the framing
        self.ws = None
        self.play_end = 0.0
        self.pending: dict[str, asyncio.TimerHandle] = {}
        self.media: list[tuple[float, str, int, int]] = []  # (arrival, segment, offset in segment, bytes)
        self.unassigned: list[tuple[float, bytes, int]] = []  # media waiting for the mark naming its segment
        self.segments: dict[str, bytearray] = {}
        self.received = 0  # agent audio bytes received: the stream position of the next byte
        self.stream_at: dict[str, int] = {}  # stream position of each segment's first byte
        self.cuts: list[tuple[float, float]] = []  # (time of a clear, stream position played by then)
        self.clears = array.array("d")
        self.echoes = 0
        self.bad: list[str] = []

    def on_message(self, text: str) -> None:
        now = time.monotonic()
        message = json.loads(text)
        event = message.get("event")
        if event == "media":
            audio = base64.b64decode(message["media"]["payload"])
            self.unassigned.append((now, audio, self.received))
            self.received += len(audio)
            self.play_end = max(now, self.play_end) + len(audio) / 8000
        elif event == "mark":
            name = message["mark"]["name"]
            segment = name.rsplit("/", 1)[0]
            buf = self.segments.setdefault(segment, bytearray())
            for at, audio, position in self.unassigned:
                self.stream_at.setdefault(segment, position)
                self.media.append((at, segment, len(buf), len(audio)))
                buf += audio
            self.unassigned.clear()
            delay = max(0.0, self.play_end - now)
            self.pending[name] = asyncio.get_running_loop().call_later(delay, self.echo, name)
        elif event == "clear":
            self.clears.append(now)
            self.cuts.append((now, self.received - max(0.0, self.play_end - now) * 8000))  # what had played
            self.unassigned.clear()
            self.play_end = now
            for name, handle in list(self.pending.items()):
                handle.cancel()
                self.echo(name)
        else:
            self.bad.append(text[:100])

    def echo(self, name: str) -> None:
        self.pending.pop(name, None)
        stream = self.sender.stream
        stream.sequence += 1
        text = ('{"event":"mark","sequenceNumber":"%d","streamSid":"%s","mark":{"name":%s}}'
                % (stream.sequence, stream.stream_sid, json.dumps(name)))
        if not self.sender.transport.is_closing():
            self.sender.transport.write(self.sender.frame(text))
            self.echoes += 1


async def run_agent(cfg: dict) -> None:
    """N agent calls in real time: silence, with a burst of speech at each `speech_at` second."""
    url, sids, ticks = cfg["url"], cfg["call_sids"], cfg["ticks"]
    speech = {round(at * 50) + k for at in cfg["speech_at"] for k in range(round(cfg["speech_seconds"] * 50))}
    silence_b64 = base64.b64encode(b"\xff" * CHUNK_BYTES).decode()
    loud_b64 = base64.b64encode(_loud(CHUNK_BYTES)).decode()
    n = len(sids)
    callers = []
    for i, sid in enumerate(sids):
        sender = CallSender(i, sid, ticks, i * FRAME_MS / n / 1000)
        sender.stream.tracks = ["inbound"]
        sender.stream.custom_parameters = {"call": str(i)}
        callers.append(AgentCaller(i, sid, sender))
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_call(c: AgentCaller) -> None:
        c.ws = await _open(url, sem)
        c.sender.ws, c.sender.transport = c.ws, c.ws.transport
        await c.ws.send(c.sender.stream.connected())
        await c.ws.send(c.sender.stream.start())

    async def listen(c: AgentCaller) -> None:
        try:
            async for message in c.ws:
                c.on_message(message)
        except ConnectionClosed:
            pass

    await asyncio.gather(*(open_call(c) for c in callers))
    readers = [asyncio.create_task(listen(c)) for c in callers]
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line.startswith("GO"):
        raise SystemExit("loadgen: expected GO")
    t0 = time.monotonic() + 0.05
    print(f"T0 {t0!r}", flush=True)
    lag = array.array("d")
    period = FRAME_MS / 1000
    # Call i starts i/N of `spread_seconds` late, so the calls' replies and barge-ins are spread
    # over time as in a real mix of calls, not all in the same 20 ms.
    spread = round(cfg.get("spread_seconds", 0) * 50)
    for c in callers:
        c.sender.start_tick = c.index * spread // n
    for g in range(ticks + spread):
        base = t0 + g * period
        for c in callers:
            k = g - c.sender.start_tick
            if not 0 <= k < ticks:
                continue
            payload = loud_b64 if k in speech else silence_b64
            due = base + c.sender.offset_s
            now = time.monotonic()
            if due - now > 0.0005:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            if c.sender.transport.is_closing():
                continue
            stream = c.sender.stream
            stream.sequence += 1
            text = ('{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":{"track":"inbound",'
                    '"chunk":"%d","timestamp":"%d","payload":"%s"}}'
                    % (stream.sequence, stream.stream_sid, k + 1, k * FRAME_MS, payload))
            lag.append(now - due)
            c.sender.transport.write(c.sender.frame(text))
    print(f"SENT {time.monotonic()!r}", flush=True)
    for c in callers:
        try:
            await c.ws.send(c.sender.stream.stop())
            await c.ws.close()
        except ConnectionClosed:
            pass
    await asyncio.gather(*readers)
    result = {"t0": t0, "lag": lag, "cpu": time.process_time(),
              "calls": {c.index: {"media": c.media, "segments": {s: bytes(b) for s, b in c.segments.items()},
                                  "clears": c.clears, "echoes": c.echoes, "bad": c.bad, "cuts": c.cuts,
                                  "stream_at": c.stream_at} for c in callers}}
    with open(cfg["out"], "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    print("DONE", flush=True)


def main() -> None:
    role, path = sys.argv[1], sys.argv[2]
    cfg = json.loads(Path(path).read_text())
    roles = {"twilio": run_twilio, "subs": run_subs, "agent": run_agent}
    asyncio.run(roles[role](cfg))


if __name__ == "__main__":
    main()
