"""The worker side: one utterance of 8 kHz audio in, words with timings out.

Runs inside the recogniser's pool processes (`pool.py`), one `Decoder` per process, loaded once
at start-up. It speaks to CTranslate2's Whisper directly (encode, generate, align) rather than
through faster-whisper, because faster-whisper imports PyAV, whose wheels bundle FFmpeg with the
GPL libx264/libx265: the server and its image ship no GPL code. What faster-whisper adds on top
of CTranslate2 for our case is small and is here: the log-mel front end, the prompt, the
no-speech rule and the grouping of aligned tokens into words.

Choices, measured with `bench/recognizer_bench.py`:

- 8 kHz is resampled to Whisper's 16 kHz with libsamplerate (`samplerate`, BSD-2/MIT), in
  float32: nothing is clipped or rescaled on the way, the level stays exactly what came in.
- The utterance is padded with digital silence to at least `MIN_WINDOW_SECONDS` before the
  log-mel. Whisper is trained on 30 s windows; decoding only the utterance makes it repeat
  itself, 30 s costs 3x the CPU, 10 s keeps the accuracy of 30 s on the fixtures.
- Finals use beam search (5), interims greedy decoding (15 % cheaper): an interim is replaced
  within a second. Both get word timings from the alignment heads (13 % of a decode).
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import dataclass
from pathlib import Path

import ctranslate2
import numpy as np
import samplerate
import tokenizers

INPUT_RATE = 8000  # Twilio's mu-law, decoded to PCM16 by the engine
MODEL_RATE = 16000  # Whisper's input
N_FFT = 400  # 25 ms analysis window at 16 kHz
HOP = 160  # 10 ms between frames: 100 mel frames per second
TOKENS_PER_SECOND = 50  # the encoder's time resolution (2 mel frames per position)
MIN_WINDOW_SECONDS = 10.0
MAX_WINDOW_SECONDS = 30.0  # Whisper's context; utterances are cut well before this
TAIL_SECONDS = 1.0  # silence always after the audio, so the last word is seen to end
FINAL_BEAM = 5
NO_SPEECH_THRESHOLD = 0.6  # faster-whisper's rule: likely silence and a poor decode -> nothing
LOGPROB_THRESHOLD = -1.0
PUNCTUATION = string.punctuation + "“”‘’¿"
OPENING_PUNCTUATION = "\"'“¿([{"


@dataclass(frozen=True)
class DecodedWord:
    """A recognised word, times in seconds from the start of its utterance."""

    word: str  # lower case, no surrounding punctuation (Deepgram's `word`)
    punctuated: str  # as Whisper wrote it (Deepgram's `punctuated_word`)
    start: float
    end: float
    confidence: float


@dataclass(frozen=True)
class Decoded:
    """What a worker sends back for one utterance."""

    words: list[DecodedWord]
    cpu_seconds: float


def to_model_input(pcm8: np.ndarray) -> np.ndarray:
    """8 kHz int16 -> 16 kHz float32 in [-1, 1] with libsamplerate's band-limited sinc filter."""
    audio = pcm8.astype(np.float32) / 32768.0
    if len(audio) == 0:
        return audio
    return samplerate.resample(audio, MODEL_RATE / INPUT_RATE, "sinc_medium").astype(np.float32, copy=False)


def mel_filters(n_mels: int, rate: int = MODEL_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale triangular mel filters, area-normalised: the filter bank Whisper was trained
    with (librosa's `filters.mel(sr=16000, n_fft=400, n_mels=80)`), shape (n_mels, n_fft/2 + 1)."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:  # linear below 1 kHz, logarithmic above
        linear = hz / (200.0 / 3)
        return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27), linear)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (mel - 15.0)), mel * (200.0 / 3))

    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(np.array(rate / 2)), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / rate)
    rising = (bins[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / np.diff(edges)[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


def log_mel(audio: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Whisper's log-mel spectrogram of 16 kHz audio: (n_mels, len(audio) / HOP) float32."""
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    mel = filters @ power[:-1].T  # Whisper drops the last frame
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


class Decoder:
    """A Whisper model in CTranslate2 format (`model.bin`, `config.json`, `tokenizer.json`)."""

    def __init__(self, model_dir: str | Path, *, compute_type: str = "int8", threads: int = 1) -> None:
        model_dir = Path(model_dir)
        self.model = ctranslate2.models.Whisper(
            str(model_dir), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
        )
        self.tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.filters = mel_filters(self.model.n_mels)
        special = self.tokenizer.token_to_id
        self.eot = special("<|endoftext|>")
        self.sot_sequence = [special("<|startoftranscript|>")]
        if self.model.is_multilingual:  # e.g. small rather than small.en: say English, transcribe
            self.sot_sequence += [special("<|en|>"), special("<|transcribe|>")]
        self.no_timestamps = special("<|notimestamps|>")
        preprocessor = model_dir / "preprocessor_config.json"
        if preprocessor.exists() and json.loads(preprocessor.read_text()).get("feature_size", 80) != self.model.n_mels:
            raise ValueError(f"{preprocessor} disagrees with the model about the number of mel bins")

    def decode(self, pcm8: bytes, *, final: bool) -> Decoded:
        """Recognise one utterance of 8 kHz PCM16: beam search for a final, greedy for an interim."""
        started = time.process_time()
        audio = to_model_input(np.frombuffer(pcm8, dtype=np.int16))
        seconds = len(audio) / MODEL_RATE
        window = min(MAX_WINDOW_SECONDS, max(MIN_WINDOW_SECONDS, seconds + TAIL_SECONDS))
        audio = np.pad(audio, (0, max(0, round(window * MODEL_RATE) - len(audio))))
        features = log_mel(audio, self.filters)[None]
        speech_frames = round(seconds * MODEL_RATE / HOP)  # alignment stays inside the audio
        encoded = self.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)))
        result = self.model.generate(
            encoded,
            [self.sot_sequence + [self.no_timestamps]],
            beam_size=FINAL_BEAM if final else 1,
            return_scores=True,
            return_no_speech_prob=True,
            max_length=round(20 + 10 * seconds),  # ~3 tokens per second of speech: stops any loop
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < self.eot]
        silent = result.no_speech_prob > NO_SPEECH_THRESHOLD and result.scores[0] < LOGPROB_THRESHOLD
        words = [] if silent or not tokens else self._words(encoded, tokens, speech_frames)
        return Decoded(words=words, cpu_seconds=time.process_time() - started)

    def _words(self, encoded: ctranslate2.StorageView, tokens: list[int], frames: int) -> list[DecodedWord]:
        """Group tokens into words and place them with the model's alignment heads."""
        alignment = self.model.align(encoded, self.sot_sequence, [tokens], frames)[0]
        text_index = np.array([pair[0] for pair in alignment.alignments])
        time_index = np.array([pair[1] for pair in alignment.alignments])
        jumps = np.pad(np.diff(text_index), (1, 0), constant_values=1).astype(bool)
        starts = time_index[jumps] / TOKENS_PER_SECOND  # where each token begins, then the end
        words = []
        first = 0
        for text, count in self._word_groups(tokens):
            last = first + count
            punctuated = text.strip()
            word = punctuated.strip(PUNCTUATION).lower()
            if word:  # a lone "-" or "..." is not a word
                start, end = float(starts[min(first, len(starts) - 1)]), float(starts[min(last, len(starts) - 1)])
                confidence = float(np.mean(alignment.text_token_probs[first:last]))
                words.append(DecodedWord(word, punctuated, start, max(start, end), confidence))
            first = last
        return words

    def _word_groups(self, tokens: list[int]) -> list[tuple[str, int]]:
        """(text, number of tokens) per word: a token starting with a space starts a word,
        closing punctuation joins the word before it, opening punctuation the word after it."""
        pieces: list[tuple[str, int]] = []
        pending: list[int] = []
        for token in tokens:  # a character may span tokens: decode until it is whole
            pending.append(token)
            text = self.tokenizer.decode(pending)
            if "\ufffd" not in text:
                pieces.append((text, len(pending)))
                pending = []
        if pending:
            pieces.append((self.tokenizer.decode(pending), len(pending)))
        groups: list[tuple[str, int]] = []
        opening = ("", 0)  # opening punctuation waiting for its word
        for text, count in pieces:
            stripped = text.strip()
            punctuation = bool(stripped) and all(c in PUNCTUATION for c in stripped)
            if punctuation and text.startswith(" ") and stripped[-1] in OPENING_PUNCTUATION:
                opening = (opening[0] + text, opening[1] + count)
            elif groups and not opening[1] and (punctuation or not text.startswith(" ")):
                groups[-1] = (groups[-1][0] + text, groups[-1][1] + count)
            else:
                groups.append((opening[0] + text, opening[1] + count))
                opening = ("", 0)
        if opening[1]:
            groups.append(opening)
        return groups
