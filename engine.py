"""The contract between the Deepgram-compatible server (`local_stt.py`) and a recogniser.

A recogniser transcribes one channel of one connection. The server feeds it that channel's
8 kHz mu-law bytes as they arrive, and the recogniser hands back `Segment`s through the `emit`
callback whenever it has them, in time order. The server turns each segment into a Deepgram
`Results` message, so every engine looks the same to the proxy and to subscribers.

Times are seconds from the start of the audio received on this connection (as Deepgram does):
the recogniser counts bytes, 8000 per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

BYTES_PER_SECOND = 8000  # 8 kHz mu-law, one byte per sample


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    confidence: float = 1.0
    punctuated_word: str | None = None


@dataclass(frozen=True)
class Segment:
    """One stretch of a channel's audio and what was said in it."""

    start: float
    duration: float
    transcript: str
    words: list[Word] = field(default_factory=list)
    confidence: float = 1.0
    is_final: bool = True
    speech_final: bool = False
    from_finalize: bool = False


Emit = Callable[[Segment], None]


class Engine(Protocol):
    """One channel's recogniser. `emit` is called on the event loop, in time order."""

    def feed(self, mulaw: bytes) -> None:
        """Take more audio. Must return quickly: heavy work goes off the event loop."""

    async def finalize(self) -> None:
        """Emit final segments for all audio fed so far, then return (Deepgram `Finalize`)."""

    async def aclose(self) -> None:
        """Release resources; no emit after this returns."""


class EngineFactory(Protocol):
    def __call__(self, channel: int, emit: Emit, *, interim_results: bool) -> Engine: ...
