"""Speech fixtures made at test time from text, so the repository carries no audio.

`speak()` runs a Debian text-to-speech program and returns 8 kHz mu-law, the format Twilio
sends. Results are cached per process. When the program is missing, the test is skipped on a
developer's machine but fails under CI (CI=true), so a broken install can't hide as a skip.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

import codec

# (program, voice) pairs: two different synthesisers give two really different voices.
VOICES = {
    "espeak": ("espeak-ng", "en-us"),
    "flite": ("flite", "slt"),
}

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "please call me back tomorrow morning about my order",
    "thank you for calling how can i help you today",
]


def require_program(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        message = f"{program} is not installed (Debian package); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@functools.cache
def speak(text: str, voice: str = "espeak") -> bytes:
    """`text` spoken by `voice` as 8 kHz mu-law bytes."""
    program, name = VOICES[voice]
    require_program(program)
    if program == "espeak-ng":
        wav = subprocess.run(
            ["espeak-ng", "-v", name, "-s", "150", "--stdout", text], check=True, capture_output=True
        ).stdout
    else:
        wav = subprocess.run(
            ["flite", "-voice", name, "-t", text, "-o", "/dev/stdout"], check=True, capture_output=True
        ).stdout
    return codec.wav_to_mulaw_8k(wav)[0]
