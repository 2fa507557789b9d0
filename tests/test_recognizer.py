"""The pocketsphinx recogniser against the `engine.Engine` contract.

Speech comes from `speech.speak` (espeak-ng / flite at test time). Most tests use the real
process pool; the ordering test swaps it for futures the test completes by hand, so the
out-of-order case happens every time instead of by luck.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future

import pytest

import recognizer
from throttle import Throttle
import speech
from engine import BYTES_PER_SECOND, Segment

SILENCE = b"\xff"  # mu-law zero
PIECE = 800  # 100 ms of 8 kHz mu-law, as Twilio-sized chunks arrive
VAD_FRAME = 240  # the endpointer's 30 ms frame, in mu-law bytes
# These two decode reliably: each test asserts a few of their content words, not an accuracy.
ESPEAK_SENTENCE = speech.SENTENCES[1]  # "please call me back tomorrow morning about my order"
FLITE_SENTENCE = speech.SENTENCES[2]  # "thank you for calling how can i help you today"


@pytest.fixture(scope="module", autouse=True)
def pool():
    yield
    recognizer.shutdown()


@pytest.fixture(autouse=True)
def fresh_stats(monkeypatch):
    """Counters and the overload log start from zero in every test (they are process-wide)."""
    monkeypatch.setattr(recognizer, "stats", recognizer.RecognizerStats())
    monkeypatch.setattr(recognizer, "_overload_throttle", Throttle(3600))


def silence(seconds: float) -> bytes:
    return SILENCE * int(seconds * BYTES_PER_SECOND)


def with_pauses(*utterances: bytes, pause: float = 1.0) -> bytes:
    """Utterances with `pause` seconds of silence before, between and after them."""
    return silence(pause) + b"".join(u + silence(pause) for u in utterances)


def feed(engine: recognizer.PocketsphinxEngine, audio: bytes) -> None:
    for i in range(0, len(audio), PIECE):
        engine.feed(audio[i : i + PIECE])


def words_of(segments: list[Segment]) -> list[str]:
    return " ".join(s.transcript for s in segments).split()


async def transcribe(audio: bytes, **settings) -> list[Segment]:
    segments: list[Segment] = []
    engine = recognizer.PocketsphinxEngine(0, segments.append, config=recognizer.RecognizerSettings(**settings))
    feed(engine, audio)
    await engine.finalize()
    await engine.aclose()
    return segments


def assert_timeline(segments: list[Segment], audio_seconds: float) -> None:
    """Final, in time order, inside the audio, not overlapping; words inside their segment."""
    end = 0.0
    for s in segments:
        assert s.is_final
        assert s.start >= end - 1e-6, f"{s} overlaps the previous segment ending at {end}"
        end = s.start + s.duration
        assert end <= audio_seconds + 1e-6
        for w in s.words:
            assert s.start - 1e-6 <= w.start < w.end <= end + 1e-6, w
            assert 0.0 <= w.confidence <= 1.0


async def test_clear_sentence_is_recognised():
    audio = with_pauses(speech.speak(ESPEAK_SENTENCE, "espeak"), pause=0.5)
    segments = await transcribe(audio)
    assert {"back", "morning", "order"} <= set(words_of(segments)), segments
    assert_timeline(segments, len(audio) / BYTES_PER_SECOND)
    assert segments[-1].speech_final


async def test_transcript_has_no_fillers_or_pronunciation_markers():
    segments = await transcribe(with_pauses(speech.speak(FLITE_SENTENCE, "flite")))
    for word in words_of(segments) + [w.word for s in segments for w in s.words]:
        assert word == word.lower() and not any(c in word for c in "<>[]()+"), word


async def test_several_utterances_come_in_time_order_without_overlap():
    utterances = [speech.speak(s, v) for s in speech.SENTENCES for v in ("espeak", "flite")]
    audio = with_pauses(*utterances)
    segments = await transcribe(audio)
    assert_timeline(segments, len(audio) / BYTES_PER_SECOND)
    assert sum(s.speech_final for s in segments) == len(utterances)
    assert recognizer.stats.utterances_decoded == len(segments)


async def test_long_speech_is_cut_into_capped_pieces():
    audio = with_pauses(b"".join(speech.speak(s, "flite") for s in speech.SENTENCES))
    segments = await transcribe(audio, max_utterance_seconds=2.0)
    assert_timeline(segments, len(audio) / BYTES_PER_SECOND)
    assert len(segments) >= 3
    assert all(s.duration <= 2.0 + 0.3 for s in segments)  # + at most one endpointer window
    assert not segments[0].speech_final and segments[-1].speech_final


async def test_silence_yields_no_words():
    segments = await transcribe(silence(5.0))
    assert words_of(segments) == []
    assert recognizer.stats.pending == 0


async def test_finalize_emits_speech_in_progress_before_returning():
    segments: list[Segment] = []
    engine = recognizer.engine_factory(0, segments.append)
    audio = silence(0.5) + speech.speak(ESPEAK_SENTENCE, "espeak")
    audio = audio[: len(audio) // VAD_FRAME * VAD_FRAME]  # ends on a frame boundary: the hard case
    feed(engine, audio)  # no pause after it: still speaking
    assert segments == []
    await engine.finalize()
    assert segments and segments[-1].from_finalize and segments[-1].speech_final
    assert {"morning", "order"} <= set(words_of(segments))
    assert_timeline(segments, len(audio) / BYTES_PER_SECOND)
    assert recognizer.stats.pending == 0

    # The channel goes on after a finalize, with times still counted from its start.
    feed(engine, with_pauses(speech.speak(FLITE_SENTENCE, "flite")))
    await engine.finalize()
    assert segments[-1].start > segments[0].start + segments[0].duration
    assert "today" in words_of(segments[1:])
    await engine.aclose()


async def test_aclose_leaves_no_pending_work_and_emits_nothing_after():
    segments: list[Segment] = []
    engine = recognizer.engine_factory(0, segments.append)
    feed(engine, with_pauses(*(speech.speak(s, "flite") for s in speech.SENTENCES), pause=0.5))
    assert recognizer.stats.pending > 0
    await engine.aclose()
    emitted = len(segments)
    assert recognizer.stats.pending == 0
    engine.feed(speech.speak(ESPEAK_SENTENCE) + silence(1.0))
    await engine.finalize()
    await asyncio.sleep(0.1)  # let any stray callback run: there must be none
    assert len(segments) == emitted


async def test_two_channels_get_their_own_words():
    heard: dict[int, list[Segment]] = {0: [], 1: []}
    engines = [recognizer.engine_factory(c, heard[c].append) for c in (0, 1)]
    audio = [
        with_pauses(speech.speak(ESPEAK_SENTENCE, "espeak")),
        with_pauses(speech.speak(FLITE_SENTENCE, "flite")),
    ]
    for i in range(0, max(map(len, audio)), PIECE):  # interleaved, as a stereo call arrives
        for engine, channel_audio in zip(engines, audio):
            engine.feed(channel_audio[i : i + PIECE])
    await asyncio.gather(*(e.finalize() for e in engines))
    await asyncio.gather(*(e.aclose() for e in engines))
    first, second = set(words_of(heard[0])), set(words_of(heard[1]))
    assert {"morning", "order"} <= first and not {"help", "today"} & first
    assert {"help", "today"} <= second and not {"morning", "order"} & second


async def test_overload_is_logged_counted_and_bounded(caplog):
    settings = recognizer.RecognizerSettings(max_pending_per_worker=1)
    utterances = [speech.speak(s, v) for s in speech.SENTENCES for v in ("espeak", "flite")]
    segments: list[Segment] = []
    engine = recognizer.PocketsphinxEngine(0, segments.append, config=settings)
    with caplog.at_level(logging.WARNING, logger="recognizer"):
        feed(engine, with_pauses(*utterances, pause=0.5))  # far faster than the pool decodes
        await engine.finalize()
    await engine.aclose()

    stats = recognizer.stats
    assert stats.skipped_utterances > 0
    assert stats.peak_pending <= settings.max_pending
    assert stats.utterances_decoded + stats.skipped_utterances == len(utterances)
    warnings = [r for r in caplog.records if "overloaded" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one warning for the whole burst
    # Every utterance still has its place in the timeline; skipped ones are empty.
    assert len(segments) == len(utterances)
    assert sum(1 for s in segments if s.transcript == "" and s.confidence == 0.0) >= stats.skipped_utterances
    assert_timeline(segments, sum(map(len, utterances)) / BYTES_PER_SECOND + 0.5 * (len(utterances) + 1))


async def test_results_are_emitted_in_time_order_when_decodes_finish_out_of_order(monkeypatch):
    futures: list[Future] = []

    def fake_submit(pcm8: bytes) -> Future:
        futures.append(Future())
        return futures[-1]

    monkeypatch.setattr(recognizer, "_submit_to_pool", fake_submit)
    segments: list[Segment] = []
    engine = recognizer.engine_factory(0, segments.append)
    feed(engine, with_pauses(*(speech.speak(s, "flite") for s in speech.SENTENCES)))
    assert len(futures) == 3

    def finish(index: int) -> None:
        word = recognizer.DecodedWord(word=f"w{index}", start=0.1, end=0.2, confidence=0.5)
        futures[index].set_result(recognizer.Decoded(words=[word], cpu_seconds=0.0))

    finish(2)
    finish(1)
    for _ in range(5):  # let the completion callbacks run on the loop
        await asyncio.sleep(0)
    assert segments == []  # the first utterance is still being decoded
    finish(0)
    await engine.finalize()
    assert [s.transcript for s in segments] == ["w0", "w1", "w2"]
    assert recognizer.stats.pending == 0
    await engine.aclose()
