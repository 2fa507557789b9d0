"""Measure the embedded recognisers through the whole server: accuracy, latency, interims, capacity.

    .venv/bin/python bench/recognizer_bench.py --quick   # about 4 minutes: 1 and 2 calls, 20 s each
    .venv/bin/python bench/recognizer_bench.py           # about 12 minutes: 1, 2, 4, 6, 8 calls, 40 s each
    .venv/bin/python bench/recognizer_bench.py --engines whisper --calls 4 --seconds 60

Each engine runs as `python server.py` with no Deepgram key, exactly as `make run` starts it:
Whisper from this tree (STT_ENGINE=whisper), pocketsphinx from this repository's history as it
was before Whisper replaced it (git archive of --pocketsphinx-ref; needs `pocketsphinx`, in
requirements-dev.txt). Both get the same simulated calls in the same invocation, one load level
after the other: N concurrent calls, each with both legs speaking synthetic sentences (espeak-ng
on one leg, flite on the other, alternating between calls) with pauses of 0.6-1.6 s, sent in real
time as Twilio media by `simulate.py`, and one JSON subscriber on /client receiving everything.

Printed per engine and load level:

- WER per voice: word error rate of the finals of each leg against the sentences it spoke, after
  normalising case, punctuation and digits ("5-5-5" -> "five five five"); and the recall of the
  distinct words spoken.
- CPU per channel: CPU seconds of the server and its decoder processes per second of audio per
  channel (everything: VAD, decodes, interims, websockets), and the share of the 2 cores.
- final delay p50/p95: from the end of a spoken sentence (its last sample sent) to the arrival at
  the subscriber of the final that covers it.
- interim gap p50/p95/max: seconds between updates a subscriber sees while a leg is speaking
  (speech onset to the first interim, then interim to interim, until the sentence's final).
- close: from the call's last audio (then `stop`) to its `call_ended` (Metadata received). Every
  leg hangs up in the middle of a sentence, so the last words must come out of `CloseStream`.
- skipped: utterances not decoded because the pool was full (Whisper: /metrics; pocketsphinx: its
  rate-limited log line, so a lower bound).

An engine "carries" a load when nothing is skipped. Targets (issue 14) are checked for Whisper.
Everything shares the machine's cores: server, decoders, simulated calls and subscriber; on a
machine others are using the figures move by 10-30 % between invocations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import speech  # noqa: E402
from simulate import CallOptions, run_calls  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

POCKETSPHINX_REF = "b0bb4d6"  # the last commit with the pocketsphinx recogniser
SENTENCES = speech.SENTENCES + [
    "i would like to check the status of my account",
    "my phone number is five five five one two three four",
    "can you send me the invoice by email please",
    "the meeting has been moved to friday afternoon",
    "i need to speak with someone about a refund",
    "your package will arrive on tuesday before noon",
    "let me transfer you to the billing department",
    "could you spell your last name for me",
]
VOICES = ("espeak", "flite")
DIGITS = "zero one two three four five six seven eight nine".split()
TARGETS = {"flite WER": 0.15, "espeak WER": 0.30, "final p95 at 2 calls": 1.5, "interim gap p95": 1.5,
           "close max": 2.0, "calls carried": 4}


# --- Scoring ------------------------------------------------------------------------------------


def normalise(text: str) -> list[str]:
    text = re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text.lower())
    return re.sub(r"[^a-z' ]+", " ", text).replace(" '", " ").split()


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        previous, row = row, [i]
        for j, h in enumerate(hypothesis, 1):
            row.append(min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (r != h)))
    return row[-1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- The calls ------------------------------------------------------------------------------------


@dataclass
class Spoken:
    text: str
    start: float  # seconds into the leg
    end: float


@dataclass
class Leg:
    voice: str
    audio: bytes
    sentences: list[Spoken]  # spoken whole
    cut_off_at: float  # the call ends in the middle of one more sentence, which started here


def make_leg(seed: int, voice: str, seconds: float) -> Leg:
    """Sentences in random order with 0.6-1.6 s pauses: a busy talker, about 70 % speech. The
    call hangs up in the middle of a last sentence, the hard case for the end of a call."""
    rng = np.random.default_rng(seed)
    audio = bytearray(b"\xff" * int(rng.integers(2000, 12000)))
    sentences = []
    while True:
        text = SENTENCES[int(rng.integers(len(SENTENCES)))]
        spoken = speech.speak(text, voice)
        if len(audio) + len(spoken) > seconds * 8000:
            break
        sentences.append(Spoken(text, len(audio) / 8000, (len(audio) + len(spoken)) / 8000))
        audio += spoken + b"\xff" * int(rng.integers(4800, 12800))
    cut_off_at = len(audio) / 8000
    audio += spoken  # cut short below: only whole sentences are scored
    return Leg(voice, bytes(audio[: int(seconds * 8000)]), sentences, cut_off_at)


@dataclass
class Received:
    at: float
    message: dict


@dataclass
class LevelResult:
    engine: str
    calls: int
    errors: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VOICES})
    words: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VOICES})
    recall_hits: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VOICES})
    recall_words: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VOICES})
    final_delays: list[float] = field(default_factory=list)
    interim_gaps: list[float] = field(default_factory=list)
    closes: list[float] = field(default_factory=list)
    incomplete: int = 0
    cpu_per_channel: float = float("nan")
    cores: float = float("nan")
    skipped: int = 0
    skipped_exact: bool = True
    examples: list[tuple[str, str]] = field(default_factory=list)

    def wer(self, voice: str) -> float:
        return self.errors[voice] / max(1, self.words[voice])

    def recall(self, voice: str) -> float:
        return self.recall_hits[voice] / max(1, self.recall_words[voice])


def score_leg(result: LevelResult, leg: Leg, zero: float, results: list[Received]) -> None:
    """Compare one leg's messages with what it spoke; `zero` is when its audio position 0 was sent."""
    finals = [r for r in results if r.message["is_final"]]
    words = [w.get("punctuated_word", w["word"]) for r in finals for w in r.message["channel"]["alternatives"][0]["words"]
             if w["start"] < leg.cut_off_at - 0.3]  # not the sentence the call ended in (0.2 s pad)
    hypothesis = normalise(" ".join(words))
    reference = normalise(" ".join(s.text for s in leg.sentences))
    result.errors[leg.voice] += word_errors(reference, hypothesis)
    result.words[leg.voice] += len(reference)
    result.recall_hits[leg.voice] += len(set(reference) & set(hypothesis))
    result.recall_words[leg.voice] += len(set(reference))
    if len(result.examples) < 4:
        result.examples.append((" ".join(reference[:14]), " ".join(hypothesis[:14])))
    for sentence in leg.sentences:
        spoken_end = zero + sentence.end
        covering = [r for r in finals if r.message["start"] <= sentence.end <= r.message["start"] + r.message["duration"] + 0.05]
        if covering:
            result.final_delays.append(covering[0].at - spoken_end)
        # Updates a subscriber sees while this sentence is being spoken: its interims.
        onset = zero + sentence.start
        interims = [r.at for r in results if not r.message["is_final"] and onset < r.at < spoken_end
                    and r.message["start"] >= sentence.start - 0.5]
        if interims or any(not r.message["is_final"] for r in results):
            result.interim_gaps.extend(float(g) for g in np.diff([onset, *interims, spoken_end]))


# --- Running a server -------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    root: Path
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children still alive (the decoder pool)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):  # children are listed under the thread that forked them
        try:
            pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def run_level(target: Target, calls: int, seconds: float, workdir: Path) -> LevelResult:
    port = free_port()
    log_path = workdir / f"{target.name}-{calls}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPGRAM_API_KEY", "DEEPGRAM_URL")}
    env.update(target.env, PROXY_URL=f"127.0.0.1:{port}", LOG_LEVEL="INFO", MAX_CALLS="1000")
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "server.py"], cwd=target.root, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while "(/twilio" not in log_path.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{target.name} server did not start:\n{log_path.read_text()}")
            await asyncio.sleep(0.1)
        legs = [(make_leg(2 * i, VOICES[i % 2], seconds), make_leg(2 * i + 1, VOICES[(i + 1) % 2], seconds))
                for i in range(calls)]
        options = [CallOptions(inbound=a.audio, outbound=b.audio, call_sid=f"CA{i:032x}", seed=i,
                               start_offset_ms=1000 * i / calls) for i, (a, b) in enumerate(legs)]
        received: list[Received] = []
        ended: set[str] = set()

        async def subscribe() -> None:
            async with connect(f"ws://127.0.0.1:{port}/client") as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "subscribe", "callSid": "*"}))
                async for text in ws:
                    message = json.loads(text)
                    received.append(Received(time.monotonic(), message))
                    if message["type"] == "call_ended":
                        ended.add(message["callSid"])
                        if len(ended) == calls:
                            return

        listener = asyncio.create_task(subscribe())
        await asyncio.sleep(0.5)
        cpu_before, wall_before = cpu_seconds(server.pid), time.monotonic()
        skipped_before = scrape(port, 'embedded_stt_skipped_total{kind="final"}') if target.name == "whisper" else 0
        results = await run_calls(f"ws://127.0.0.1:{port}/twilio", options)
        await asyncio.wait_for(listener, 60)
        cpu, wall = cpu_seconds(server.pid) - cpu_before, time.monotonic() - wall_before
        level = LevelResult(target.name, calls)
        level.cpu_per_channel = cpu / (2 * calls * seconds)
        level.cores = cpu / wall
        if target.name == "whisper":
            level.skipped = int(scrape(port, 'embedded_stt_skipped_total{kind="final"}') - skipped_before)
        else:
            totals = re.findall(r"totals: (\d+) skipped", log_path.read_text())
            level.skipped, level.skipped_exact = (int(totals[-1]) if totals else 0), False
    finally:
        server.terminate()
        server.wait(30)
    for (inbound, outbound), call in zip(legs, results):
        sid = call.call_sid
        mine = [r for r in received if r.message.get("callSid") == sid]
        transcripts = [Received(r.at, r.message["data"]) for r in mine
                       if r.message["type"] == "transcript" and r.message["data"]["type"] == "Results"]
        for channel, leg in enumerate((inbound, outbound)):
            track = ("inbound", "outbound")[channel]
            sent = [c for c in call.sent if c.track == track]
            zero = min(c.sent_at - c.timestamp / 1000 for c in sent)
            score_leg(level, leg, zero, [r for r in transcripts if r.message["channel_index"][0] == channel])
        last_audio = max(c.sent_at for c in call.sent)
        end = next(r for r in mine if r.message["type"] == "call_ended")
        level.closes.append(end.at - last_audio)
        level.incomplete += end.message["endOfCall"] != "complete"
    return level


# --- Report ---------------------------------------------------------------------------------------------


def report(levels: list[LevelResult], seconds: float) -> None:
    print(f"\n## Results: {os.cpu_count()} CPUs, {seconds:.0f} s calls, both legs speaking, real time\n")
    print("| engine | calls | espeak WER (of words) | flite WER (of words) | recall espeak / flite | CPU s per s per channel | cores used "
          "| final delay p50 / p95 | interim gap p50 / p95 / max | close max | skipped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in levels:
        gaps = (f"{percentile(r.interim_gaps, 50):.2f} / {percentile(r.interim_gaps, 95):.2f} / "
                f"{max(r.interim_gaps):.2f} s" if r.interim_gaps else "none")
        skipped = f"{r.skipped}" if r.skipped_exact else f"≥ {r.skipped}"
        closes = f"{max(r.closes):.2f} s" + (f" ({r.incomplete} incomplete)" if r.incomplete else "")
        print(f"| {r.engine} | {r.calls} | {r.wer('espeak'):.1%} of {r.words['espeak']} | "
              f"{r.wer('flite'):.1%} of {r.words['flite']} | "
              f"{r.recall('espeak'):.0%} / {r.recall('flite'):.0%} | {r.cpu_per_channel:.3f} | {r.cores:.2f} | "
              f"{percentile(r.final_delays, 50):.2f} / {percentile(r.final_delays, 95):.2f} s | {gaps} | "
              f"{closes} | {skipped} |")
    for engine in dict.fromkeys(r.engine for r in levels):
        mine = [r for r in levels if r.engine == engine]
        carried = max((r.calls for r in mine if r.skipped == 0), default=0)
        print(f"\n{engine}: carried {carried} concurrent calls with no skipped utterance "
              f"(levels tried: {', '.join(str(r.calls) for r in mine)})")
        print(f"  e.g. spoke: {mine[0].examples[0][0]!r}\n       heard: {mine[0].examples[0][1]!r}")
        if engine != "whisper":
            continue
        at2 = next((r for r in mine if r.calls == 2), mine[0])
        all_gaps = [g for r in mine if r.skipped == 0 for g in r.interim_gaps]
        checks = {
            "flite WER": (at2.wer("flite"), f"{at2.wer('flite'):.1%}"),
            "espeak WER": (at2.wer("espeak"), f"{at2.wer('espeak'):.1%}"),
            "final p95 at 2 calls": (percentile(at2.final_delays, 95), f"{percentile(at2.final_delays, 95):.2f} s"),
            "interim gap p95": (percentile(at2.interim_gaps, 95), f"{percentile(at2.interim_gaps, 95):.2f} s"),
            "close max": (max(at2.closes), f"{max(at2.closes):.2f} s"),
            "calls carried": (carried, str(carried)),
        }
        print(f"  targets at {at2.calls} calls (carried: all levels):")
        for name, (value, shown) in checks.items():
            goal = TARGETS[name]
            met = value >= goal if name == "calls carried" else value <= goal
            print(f"    {name:22s} {shown:>8s}  target {'≥' if name == 'calls carried' else '≤'} {goal}  "
                  f"{'met' if met else 'MISSED'}")
        if all_gaps:
            print(f"  interim gaps over every level carried: p95 {percentile(all_gaps, 95):.2f} s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 2 calls of 20 s (about 4 minutes)")
    parser.add_argument("--calls", help="load levels, ascending (default 1,2,4,6,8; quick 1,2)")
    parser.add_argument("--seconds", type=float, help="audio per call (default 40; quick 20)")
    parser.add_argument("--engines", default="whisper,pocketsphinx", help="whisper, pocketsphinx or both")
    parser.add_argument("--pocketsphinx-ref", default=POCKETSPHINX_REF, help="git ref with the pocketsphinx engine")
    parser.add_argument("--keep-going", action="store_true", help="try every level even after one skips")
    args = parser.parse_args()
    calls = [int(n) for n in (args.calls or ("1,2" if args.quick else "1,2,4,6,8")).split(",")]
    seconds = args.seconds or (20.0 if args.quick else 40.0)
    workdir = Path(tempfile.mkdtemp(prefix="recognizer-bench-"))
    targets = []
    for name in args.engines.split(","):
        if name == "whisper":
            targets.append(Target("whisper", ROOT, {"STT_ENGINE": "whisper"}))
        elif name == "pocketsphinx":
            checkout = workdir / "pocketsphinx"
            checkout.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.pocketsphinx_ref], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive, check=True)
            targets.append(Target("pocketsphinx", checkout, {"STT_ENGINE": "pocketsphinx"}))
        else:
            parser.error(f"unknown engine {name!r}")
    print(f"recogniser bench: engines {args.engines}, calls {calls}, {seconds:.0f} s each; logs in {workdir}",
          file=sys.stderr)
    levels = []
    for n in calls:  # engines alternate at each level, so both see the same machine load
        for target in targets:
            if any(r.engine == target.name and r.skipped for r in levels) and not args.keep_going:
                continue
            started = time.monotonic()
            level = await run_level(target, n, seconds, workdir)
            levels.append(level)
            print(f"  {target.name} x{n}: espeak WER {level.wer('espeak'):.1%}, flite WER {level.wer('flite'):.1%}, "
                  f"final p95 {percentile(level.final_delays, 95):.2f} s, skipped {level.skipped} "
                  f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    report(levels, seconds)


if __name__ == "__main__":
    asyncio.run(main())
