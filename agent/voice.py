"""Speaking: text in, 8 kHz mu-law out (what the Twilio side plays as it is).

`FliteVoice` runs flite with its `slt` voice (Debian package `flite`, BSD-style licence) as a
subprocess: nothing to load into the server, no model to download, and re-transcribed it was as
intelligible as the best neural voice on the package index (which is GPL). flite writes a
16 kHz WAV; `codec.wav_to_mulaw_8k` resamples and encodes it, in a worker thread so the event
loop never waits on numpy. At most `concurrency` syntheses run at once (one per core by
default); a reply waits its turn rather than overloading the machine. A synthesis that fails or
overruns `timeout` raises `VoiceError`; the process is killed, never left behind.

`ToneVoice` is the deterministic stand-in: every character becomes 50 ms of a tone whose pitch
depends on the character (`tone_speech`), so a test knows byte for byte what the agent says.

Replies are spoken sentence by sentence (`split_sentences`), so the first sentence can play
while the next is synthesised and an interrupted reply stops at a sentence boundary in the
transcript.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from typing import Protocol

import numpy as np

import codec
from engine import BYTES_PER_SECOND

MAX_TEXT_CHARS = 1000  # per synthesis: a sentence, not a book
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_UNSPEAKABLE = re.compile(r"[\x00-\x1f\x7f]+")


class VoiceError(Exception):
    """Speech could not be produced."""


class Voice(Protocol):
    name: str

    async def synthesize(self, text: str) -> bytes:
        """`text` spoken, as 8 kHz mu-law bytes; `VoiceError` on failure."""


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` with whitespace normalised; joined by spaces they give the text back."""
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def speakable(text: str) -> str:
    """Text safe to hand to a synthesiser: no control characters, bounded length."""
    return " ".join(_UNSPEAKABLE.sub(" ", text).split())[:MAX_TEXT_CHARS]


class FliteVoice:
    """flite as a subprocess, bounded in concurrency and time."""

    def __init__(
        self, program: str = "flite", voice: str = "slt", *, concurrency: int | None = None, timeout: float = 10.0
    ) -> None:
        self.program = program
        self.voice = voice
        self.name = f"flite {voice}"
        self.timeout = timeout
        self._slots = asyncio.Semaphore(concurrency or os.cpu_count() or 1)

    def available(self) -> bool:
        return shutil.which(self.program) is not None

    async def synthesize(self, text: str) -> bytes:
        text = speakable(text)
        if not text:
            return b""
        async with self._slots:
            wav = await self._run(text)
        try:
            return (await asyncio.to_thread(codec.wav_to_mulaw_8k, wav))[0]
        except (ValueError, IndexError) as exc:
            raise VoiceError(f"{self.program} wrote no usable WAV: {exc}") from None

    async def _run(self, text: str) -> bytes:
        try:
            process = await asyncio.create_subprocess_exec(
                self.program, "-voice", self.voice, "-t", text, "-o", "/dev/stdout",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise VoiceError(f"cannot run {self.program}: {exc}") from None
        try:
            async with asyncio.timeout(self.timeout):
                wav, stderr = await process.communicate()
        except TimeoutError:
            raise VoiceError(f"{self.program} took more than {self.timeout:g} s") from None
        finally:
            if process.returncode is None:  # timed out or cancelled (barge-in): leave nothing behind
                process.kill()
                await process.wait()
        if process.returncode != 0:
            reason = stderr.decode(errors="replace").strip()[:200]
            raise VoiceError(f"{self.program} exited with status {process.returncode}: {reason}")
        return wav


TONE_SECONDS_PER_CHAR = 0.05
_TONE_SAMPLES = round(TONE_SECONDS_PER_CHAR * BYTES_PER_SECOND)


def tone_speech(text: str) -> bytes:
    """The deterministic voice: 50 ms per character, a tone per character, silence for spaces."""
    text = speakable(text)
    t = np.arange(_TONE_SAMPLES) / BYTES_PER_SECOND
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if text else np.zeros(0, np.uint32)
    frequencies = 300.0 + (codes % 40) * 25.0  # 300-1275 Hz, inside the telephone band
    samples = 8000.0 * np.sin(2 * np.pi * frequencies[:, None] * t[None, :])
    samples[codes == ord(" ")] = 0.0
    return codec.pcm16_to_ulaw(np.round(samples).astype(np.int16).ravel())


class ToneVoice:
    """`tone_speech` behind the `Voice` interface."""

    name = "deterministic tones"

    async def synthesize(self, text: str) -> bytes:
        return tone_speech(text)
