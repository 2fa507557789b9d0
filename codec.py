"""G.711 mu-law and sample-rate conversion, in bulk with numpy.

Python 3.13 removed `audioop`, so the conversions the simulator (WAV -> 8 kHz mu-law) and the
embedded recogniser (mu-law -> PCM16 at the model's rate) need live here. Both directions are
table lookups: bit-exact with the old `audioop.ulaw2lin` / `audioop.lin2ulaw`
(see protocols.md section F), with no per-sample Python loop.

The proxy itself never decodes audio: Twilio's mu-law goes to Deepgram as it came.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _build_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _build_encode_table() -> np.ndarray:
    """CPython's audioop `st_linear2ulaw`, evaluated once for every int16 value."""
    sample = np.arange(-32768, 32768, dtype=np.int32) >> 2
    negative = sample < 0
    magnitude = np.where(negative, -sample, sample)
    magnitude = np.minimum(magnitude, 8159) + 33
    segment_ends = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    segment = np.searchsorted(segment_ends, magnitude, side="left")
    code = (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    mask = np.where(negative, 0x7F, 0xFF)
    return (code ^ mask).astype(np.uint8)


_DECODE = _build_decode_table()
_ENCODE = _build_encode_table()


def ulaw_to_pcm16(mulaw: bytes) -> np.ndarray:
    """mu-law bytes -> int16 samples."""
    return _DECODE[np.frombuffer(mulaw, dtype=np.uint8)]


def pcm16_to_ulaw(samples: np.ndarray) -> bytes:
    """int16 samples -> mu-law bytes."""
    index = samples.astype(np.int32) + 32768
    return _ENCODE[index].tobytes()


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample int16 mono audio; low-pass first when going down so speech does not alias.

    A windowed-sinc FIR at the new Nyquist frequency followed by linear interpolation: plenty
    for telephone speech, and all of it vectorised.
    """
    if rate_in == rate_out or len(samples) == 0:
        return samples.astype(np.int16, copy=False)
    x = samples.astype(np.float64)
    if rate_out < rate_in:
        cutoff = 0.5 * rate_out / rate_in * 0.9  # fraction of the input sample rate
        taps = 63
        n = np.arange(taps) - (taps - 1) / 2
        kernel = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(taps)
        kernel /= kernel.sum()
        x = np.convolve(x, kernel, mode="same")
    count = int(round(len(x) * rate_out / rate_in))
    positions = np.arange(count) * (rate_in / rate_out)
    y = np.interp(positions, np.arange(len(x)), x)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


@dataclass
class Wav:
    """Decoded WAV audio: one int16 array per channel (mu-law WAVs are decoded too)."""

    rate: int
    channels: list[np.ndarray]


WAVE_FORMAT_PCM = 1
WAVE_FORMAT_MULAW = 7


def read_wav(data: bytes) -> Wav:
    """Read a PCM16 or mu-law WAV file (any rate, any channel count).

    The stdlib `wave` module reads only PCM, so the RIFF chunks are walked here; that is the
    whole of the format we need.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos = 12
    fmt = None
    body = None
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        chunk = data[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            fmt = chunk
        elif chunk_id == b"data":
            body = chunk
        pos += 8 + size + (size & 1)
    if fmt is None or body is None:
        raise ValueError("WAV file lacks a fmt or data chunk")
    tag = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    rate = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: real tag in the sub-format
        tag = int.from_bytes(fmt[24:26], "little")
    if tag == WAVE_FORMAT_PCM and bits == 16:
        samples = np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.int16)
    elif tag == WAVE_FORMAT_MULAW and bits == 8:
        samples = ulaw_to_pcm16(body)
    else:
        raise ValueError(f"unsupported WAV encoding (format tag {tag}, {bits} bits); use PCM16 or mu-law")
    usable = len(samples) // channels * channels
    frames = samples[:usable].reshape(-1, channels)
    return Wav(rate=rate, channels=[frames[:, c].copy() for c in range(channels)])


def wav_to_mulaw_8k(data: bytes) -> list[bytes]:
    """A WAV file as 8 kHz mu-law, one bytes object per channel."""
    wav = read_wav(data)
    return [pcm16_to_ulaw(resample(ch, wav.rate, 8000)) for ch in wav.channels]
