"""Measure the embedded recogniser: accuracy, speed and how many calls a machine carries.

    .venv/bin/python bench/recognizer_bench.py [--seconds 20] [--calls 2,4,6,8,10]

Prints three tables:

1. Front end: WER of the shipped 16 kHz en-us model on 8 kHz fixtures, upsampled to 16 kHz
   (with and without the engine's noise floor) or decoded at 8 kHz with a narrowed filterbank.
   This is the measurement behind the choices in `recognizer.py`; it decodes in-process.
2. The engine as `local_stt` uses it (endpointer + process pool), per voice: WER and the
   real-time factor (decode CPU seconds / audio seconds) of one channel.
3. Capacity: N concurrent calls, two channels each, fed in real time in 100 ms pieces. A load
   is carried when no utterance is skipped and the 95th-percentile lag (emit time minus the
   moment the utterance's audio had arrived, endpointer hangover included) stays under 3 s.

Fixtures are synthetic (espeak-ng, flite through 8 kHz mu-law), so the WER says more about the
front-end choices than about real callers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import codec  # noqa: E402
import recognizer  # noqa: E402
import speech  # noqa: E402
from engine import BYTES_PER_SECOND, Segment  # noqa: E402

SENTENCES = speech.SENTENCES + [
    "i would like to check the status of my account",
    "my phone number is five five five one two three four",
    "can you send me the invoice by email please",
    "the meeting has been moved to friday afternoon",
    "i need to speak with someone about a refund",
]
VOICES = ["espeak", "flite"]
PIECE = 800  # 100 ms of mu-law
PAUSE = b"\xff" * 4000  # 0.5 s of mu-law silence
MAX_P95_LAG = 3.0  # the pending bound alone keeps lag near 2.5 s; beyond, it is skipping


def word_errors(reference: str, hypothesis: str) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row = row, [i]
        for j, h in enumerate(hyp, 1):
            row.append(min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (r != h)))
    return row[-1]


def wer(pairs: list[tuple[str, str]]) -> float:
    return sum(word_errors(r, h) for r, h in pairs) / sum(len(r.split()) for r, _ in pairs)


# --- 1. Front end ------------------------------------------------------------------------------


def feat_params_8k() -> str:
    """The model's feat.params with the filterbank narrowed to what 8 kHz audio can carry."""
    from pocketsphinx import get_model_path

    text = Path(get_model_path("en-us/en-us/feat.params")).read_text().replace("-upperf 6800", "-upperf 3800")
    path = Path(tempfile.mkdtemp()) / "feat.params"
    path.write_text(text)
    return str(path)


def front_end_table() -> None:
    from pocketsphinx import Decoder

    plain_16k = lambda pcm8: codec.resample(pcm8, 8000, 16000)  # noqa: E731
    variants = {
        "16 kHz upsampled + noise floor (used)": (Decoder(loglevel="FATAL"), recognizer._to_model_input),
        "16 kHz upsampled": (Decoder(loglevel="FATAL"), plain_16k),
        "8 kHz, nfft 256, upperf 3800": (
            Decoder(loglevel="FATAL", samprate=8000, nfft=256, featparams=feat_params_8k()),
            lambda pcm8: pcm8,
        ),
    }
    print("\n1. Front end (whole sentence per utterance, in-process)")
    print(f"{'variant':40s} " + " ".join(f"{v + ' WER':>11s}" for v in VOICES))
    for name, (decoder, prepare) in variants.items():
        cells = []
        for voice in VOICES:
            pairs = []
            for sentence in SENTENCES:
                audio = prepare(codec.ulaw_to_pcm16(speech.speak(sentence, voice)))
                decoder.start_utt()
                decoder.process_raw(audio.tobytes(), False, True)
                decoder.end_utt()
                hyp = decoder.hyp()
                pairs.append((sentence, hyp.hypstr if hyp else ""))
            cells.append(f"{wer(pairs):11.1%}")
        print(f"{name:40s} " + " ".join(cells))


# --- 2. The engine -----------------------------------------------------------------------------


async def transcribe(audio: bytes) -> str:
    segments: list[Segment] = []
    engine = recognizer.engine_factory(0, segments.append)
    for i in range(0, len(audio), PIECE):
        engine.feed(audio[i : i + PIECE])
    await engine.finalize()
    await engine.aclose()
    return " ".join(s.transcript for s in segments if s.transcript)


async def engine_table() -> None:
    print("\n2. Engine (endpointer + process pool), one channel at a time")
    print(f"{'voice':8s} {'WER':>7s} {'RTF':>7s} {'audio s':>8s}")
    for voice in VOICES:
        before = recognizer.RecognizerStats(**vars(recognizer.stats))
        pairs = [(s, await transcribe(PAUSE + speech.speak(s, voice) + PAUSE)) for s in SENTENCES]
        cpu = recognizer.stats.decode_cpu_seconds - before.decode_cpu_seconds
        audio = recognizer.stats.audio_seconds_decoded - before.audio_seconds_decoded
        print(f"{voice:8s} {wer(pairs):7.1%} {cpu / audio:7.3f} {audio:8.1f}")


# --- 3. Capacity -------------------------------------------------------------------------------


@dataclass
class LoadResult:
    calls: int
    lags: list[float]
    skipped: int
    utterances: int

    @property
    def p95_lag(self) -> float:
        return float(np.percentile(self.lags, 95)) if self.lags else float("nan")

    @property
    def carried(self) -> bool:
        return self.skipped == 0 and self.p95_lag <= MAX_P95_LAG


def channel_audio(seed: int, seconds: float) -> bytes:
    """Sentences in random order with 1 s pauses: roughly 70% speech, a busy talker."""
    rng = np.random.default_rng(seed)
    parts = [b"\xff" * int(rng.integers(0, BYTES_PER_SECOND))]
    while sum(map(len, parts)) < seconds * BYTES_PER_SECOND:
        sentence = SENTENCES[int(rng.integers(len(SENTENCES)))]
        parts += [speech.speak(sentence, VOICES[int(rng.integers(2))]), b"\xff" * BYTES_PER_SECOND]
    return b"".join(parts)[: int(seconds * BYTES_PER_SECOND)]


async def run_load(calls: int, seconds: float) -> LoadResult:
    """Feed `calls` x 2 channels in real time; record each segment's lag behind its audio."""
    skipped_before = recognizer.stats.skipped_utterances
    lags: list[float] = []
    utterances = 0
    started = time.monotonic()

    def on_segment(segment: Segment) -> None:
        nonlocal utterances
        utterances += 1
        lags.append(time.monotonic() - (started + segment.start + segment.duration))

    engines = [recognizer.engine_factory(c % 2, on_segment) for c in range(2 * calls)]
    audio = [channel_audio(seed, seconds) for seed in range(2 * calls)]
    for i in range(0, int(seconds * BYTES_PER_SECOND), PIECE):
        await asyncio.sleep(max(0.0, started + i / BYTES_PER_SECOND - time.monotonic()))
        for engine, channel in zip(engines, audio):
            engine.feed(channel[i : i + PIECE])
    await asyncio.gather(*(e.finalize() for e in engines))
    await asyncio.gather(*(e.aclose() for e in engines))
    return LoadResult(calls, lags, recognizer.stats.skipped_utterances - skipped_before, utterances)


async def capacity_table(call_counts: list[int], seconds: float) -> None:
    print(f"\n3. Capacity: concurrent calls x 2 channels, real time, {seconds:.0f} s each, {recognizer.WORKERS} workers")
    print(f"{'calls':>5s} {'utts':>5s} {'skipped':>8s} {'p95 lag s':>10s} {'max lag s':>10s}  carried")
    best = 0
    for calls in call_counts:
        result = await run_load(calls, seconds)
        best = calls if result.carried else best
        print(
            f"{calls:5d} {result.utterances:5d} {result.skipped:8d} {result.p95_lag:10.2f} "
            f"{max(result.lags, default=float('nan')):10.2f}  {'yes' if result.carried else 'no'}"
        )
        if not result.carried:
            break
    print(f"carried: {best} concurrent calls (measured)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each capacity run")
    parser.add_argument("--calls", default="2,4,6,8,10,12", help="call counts to try, ascending")
    args = parser.parse_args()
    print(f"pocketsphinx recogniser bench: {os.cpu_count()} CPUs, {len(SENTENCES)} sentences per voice")
    front_end_table()
    await transcribe(PAUSE + speech.speak(SENTENCES[0]) + PAUSE)  # start the pool's workers
    await engine_table()
    await capacity_table([int(n) for n in args.calls.split(",")], args.seconds)
    recognizer.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
