"""Measure the embedded agent: how fast it hears and answers, and what a call costs in CPU.

    .venv/bin/python bench/embedded_agent_bench.py --quick   # 1 call, 2 turns per mode (~1 min)
    .venv/bin/python bench/embedded_agent_bench.py           # 1, 2 and 4 calls, 4 turns each (~5 min)
    .venv/bin/python bench/embedded_agent_bench.py --calls 1,3 --turns 6

The agent runs as its own process (`python -m agent.embedded`), so its CPU (recogniser worker
processes and flite runs included) is read from /proc apart from the load generator's. Each
simulated caller connects as the Twilio side would (Settings, mulaw 8 kHz both ways), waits for
the greeting to finish playing, then says sentences (espeak-ng, fed in real time in 20 ms
frames with silence between, as Twilio streams), each after the previous answer has played.

Per turn it records:
- UserStartedSpeaking delay: first audible sample of the sentence sent -> UserStartedSpeaking
  received. This is what barge-in waits for.
- answer delay: last audible sample sent -> first audio byte of the answer received. It
  includes the recogniser's end-of-speech hangover, the decode, thinking and the first
  sentence's synthesis. The agent's own split is in its LatencyReport (stt, tts).
- whether the user ConversationText contains the sentence's words (word error rate).

Each run starts a fresh agent (which loads the recogniser's model in every worker process before
it listens) and makes one unmeasured call first, so that the measured calls find every cache warm.

Both modes run in the same invocation, alternating: `live` (WebRTC VAD, the project's
recogniser, flite) and `deterministic` (energy VAD, checksum "recogniser", tones): the
latter is the cost of the protocol, pacing and detection alone, the baseline for the ratio.
Everything shares the machine's cores (agent, load generator, other engineers' jobs): figures
on a busy machine are high; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import codec  # noqa: E402
from agent_client import AgentClient, settings_message  # noqa: E402
from recognizer_bench import SENTENCES, normalise, word_errors  # noqa: E402
from speech import speak  # noqa: E402

KEY = "bench-key"
SILENCE = b"\xff"
GREETING = "Hello, this is the offline demo agent. How can I help?"
TICKS = os.sysconf("SC_CLK_TCK")


# --- The agent process and its CPU ---------------------------------------------------------


def _cpu_ticks(pid: int, *, waited_children: bool) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if waited_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: finished flite runs
    return ticks


def tree_cpu_seconds(pid: int) -> float:
    """The agent's CPU: itself, children it has reaped (flite), live children (recogniser workers)."""
    total = _cpu_ticks(pid, waited_children=True)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += _cpu_ticks(int(child), waited_children=False)
        except FileNotFoundError:  # a flite run that just ended: it is in cutime next time
            pass
    return total / TICKS


class AgentProcess:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.embedded", "--port", "0", "--api-key", KEY, "--mode", mode],
            cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if match := re.search(r" on (ws://\S+)", line):
                self.url = match.group(1)
                break
        else:
            raise RuntimeError(f"the agent did not start (exit status {self.process.wait()})")
        # Keep reading its log so that a full pipe never blocks it; keep the last lines for errors.
        self.log: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# --- One simulated caller ------------------------------------------------------------------


@dataclass
class Turn:
    sentence: str
    heard: str = ""
    uss_delay: float | None = None
    answer_delay: float | None = None
    stt_latency: float | None = None
    tts_latency: float | None = None


@dataclass
class CallResult:
    turns: list[Turn] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def voiced_span(mulaw: bytes) -> tuple[int, int]:
    """Where the speech in a fixture begins and ends (byte offsets): the synthesiser pads both ends
    with near-silence, which must not count as the caller speaking."""
    level = np.abs(codec.ulaw_to_pcm16(mulaw).astype(np.int32))
    loud = np.flatnonzero(level > 0.05 * level.max())
    return int(loud[0]), int(loud[-1]) + 1


async def stream_silence(client: AgentClient, until: float) -> None:
    """What Twilio does between utterances: 20 ms of silence every 20 ms."""
    frame = SILENCE * 160
    next_at = time.monotonic()
    while next_at < until:
        await client.ws.send(frame)
        next_at += 0.02
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def one_call(url: str, sentences: list[str], start_delay: float) -> CallResult:
    await asyncio.sleep(start_delay)  # calls do not all start in the same millisecond
    result = CallResult()
    started = time.monotonic()
    client = await AgentClient.open(url, KEY)
    try:
        await client.send(settings_message(greeting=GREETING))
        greeted = await client.wait_for("AgentAudioDone", timeout=60)
        await stream_silence(client, started + len(client.audio(end=greeted)) / 8000 + 0.5)
        for sentence in sentences:
            turn = Turn(sentence)
            result.turns.append(turn)
            mark = len(client.received)
            speech = speak(sentence, "espeak")
            first_voiced, last_voiced = voiced_span(speech)
            sending_started = await client.send_audio(speech, realtime=True)
            speech_started = sending_started + first_voiced / 8000
            speech_ended = sending_started + last_voiced / 8000
            silence = asyncio.create_task(stream_silence(client, speech_ended + 60))
            try:
                user = await client.wait_for("ConversationText", after=mark, role="user", timeout=30)
                first_audio = await client.wait_for("audio", after=user, timeout=30)
                done = await client.wait_for("AgentAudioDone", after=first_audio, timeout=60)
            finally:
                silence.cancel()
            uss = [r for r in client.received[mark:user] if r.type == "UserStartedSpeaking"]
            turn.uss_delay = uss[0].at - speech_started if uss else None
            turn.heard = client.received[user].message.content
            turn.answer_delay = client.received[first_audio].at - speech_ended
            reports = client.messages("LatencyReport", user)
            if reports:
                turn.stt_latency, turn.tts_latency = reports[0].stt_latency, reports[0].tts_latency
            # Let the answer play out (as the caller would listen) before the next sentence.
            played = client.received[first_audio].at + len(client.audio(first_audio, done + 1)) / 8000
            await stream_silence(client, played + 0.5)
    except AssertionError as exc:
        result.errors.append(str(exc).splitlines()[0][:200])
    finally:
        result.seconds = time.monotonic() - started
        await client.close()
    return result


# --- A run ---------------------------------------------------------------------------------


@dataclass
class RunResult:
    mode: str
    calls: int
    results: list[CallResult]
    cpu_seconds: float
    wall_seconds: float

    @property
    def turns(self) -> list[Turn]:
        return [t for r in self.results for t in r.turns]

    @property
    def call_minutes(self) -> float:
        return sum(r.seconds for r in self.results) / 60


async def run(mode: str, calls: int, turns: int) -> RunResult:
    agent = AgentProcess(mode)
    try:
        # One unmeasured call first: the measured calls find the decoder and flite warm.
        await one_call(agent.url, SENTENCES[:1], start_delay=0)
        cpu_before, wall_before = tree_cpu_seconds(agent.process.pid), time.monotonic()
        results = await asyncio.gather(*[
            one_call(agent.url, [SENTENCES[(i + j) % len(SENTENCES)] for j in range(turns)], start_delay=i * 0.37)
            for i in range(calls)
        ])
        cpu = tree_cpu_seconds(agent.process.pid) - cpu_before
        return RunResult(mode, calls, list(results), cpu, time.monotonic() - wall_before)
    finally:
        agent.stop()


def _ms(values: list[float | None]) -> str:
    measured = sorted(v for v in values if v is not None)
    if not measured:
        return "-"
    p95 = measured[min(len(measured) - 1, round(0.95 * (len(measured) - 1)))]
    return f"{statistics.median(measured) * 1000:.0f} / {p95 * 1000:.0f}"


def wer(pairs: list[tuple[str, str]]) -> float:
    """Word error rate over (sentence said, text the agent heard) pairs."""
    references = [normalise(said) for said, _ in pairs]
    errors = sum(word_errors(ref, normalise(heard)) for ref, (_, heard) in zip(references, pairs))
    return errors / max(1, sum(map(len, references)))


def print_table(runs: list[RunResult]) -> None:
    baseline = {r.calls: r for r in runs if r.mode == "deterministic"}
    print()
    print("| mode | calls | turns | UserStartedSpeaking delay p50 / p95 (ms) | answer delay p50 / p95 (ms) "
          "| stt / tts p50 (ms) | WER | CPU s per call-minute | vs deterministic | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        turns = r.turns
        per_minute = r.cpu_seconds / r.call_minutes if r.call_minutes else float("nan")
        base = baseline.get(r.calls)
        ratio = "1.00x" if base is r else (
            f"{per_minute / (base.cpu_seconds / base.call_minutes):.1f}x" if base and base.cpu_seconds else "-")
        heard = [(t.sentence, t.heard) for t in turns if t.heard]
        error_rate = f"{wer(heard) * 100:.0f} %" if heard and r.mode == "live" else "-"
        stt = _ms([t.stt_latency for t in turns]).split(" / ")[0]
        tts = _ms([t.tts_latency for t in turns]).split(" / ")[0]
        errors = sum(len(c.errors) for c in r.results)
        print(f"| {r.mode} | {r.calls} | {len(turns)} | {_ms([t.uss_delay for t in turns])} "
              f"| {_ms([t.answer_delay for t in turns])} | {stt} / {tts} | {error_rate} | {per_minute:.2f} "
              f"| {ratio} | {errors} |")
    for r in runs:
        for c in r.results:
            for error in c.errors:
                print(f"  {r.mode} x{r.calls}: {error}")
    print()
    print(f"{os.cpu_count()} cores, load average now {os.getloadavg()[0]:.2f}; the machine is shared, so "
          "figures vary between runs. CPU: the agent process and its children only.")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 call, 2 turns per mode")
    parser.add_argument("--calls", default="1,2,4", help="concurrent calls, comma-separated")
    parser.add_argument("--turns", type=int, default=4, help="sentences each caller says")
    args = parser.parse_args()
    calls = [1] if args.quick else [int(n) for n in args.calls.split(",")]
    turns = 2 if args.quick else args.turns
    runs = []
    for n in calls:
        for mode in ("deterministic", "live"):
            print(f"running {mode}, {n} call(s), {turns} turns each ...", flush=True)
            runs.append(await run(mode, n, turns))
    print_table(runs)


if __name__ == "__main__":
    asyncio.run(main())
