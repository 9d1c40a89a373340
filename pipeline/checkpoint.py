"""Checkpoints: written so that a failed write names its cause; read safely (tensors and plain containers
only, never arbitrary pickled objects)."""

import pickle
import zipfile
from pathlib import Path
from typing import IO, cast

import torch
from torch import Tensor

from pipeline.errors import UserError


def load_checkpoint(path: Path, remedy: str) -> dict:
    """The checkpoint at `path`, loaded with `weights_only=True`: a crafted file cannot run code. An
    unreadable one is an error naming the file and `remedy` (what the user should do about it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        if path.stat().st_size == 0:
            reason = "an empty file"
        elif "Weights only load failed" in str(e):  # torch's advice that follows is to load it unsafely: not given
            reason = "it holds objects other than tensors, and loading them could run code"
        else:
            reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise UserError(f"{path}: not a readable checkpoint ({reason}); {remedy}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a checkpoint of this pipeline (no model weights); {remedy}")
    return state


def encoder_weights(state: dict) -> dict[str, Tensor]:
    """The backbone's tensors in a checkpoint's model weights, named as in `ResNet18` (and torchvision)."""
    return {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}


def save_checkpoint(state: dict, path: Path) -> None:
    """`torch.save(state, path)`, raising the OSError of a failed write (a full disk: ENOSPC). torch catches
    it inside its zip writer and raises "RuntimeError: ... unexpected pos ..." instead, which names neither
    the file nor the cause."""
    with open(path, "wb") as f:
        writer = _Writes(f)
        try:
            torch.save(state, cast(IO[bytes], writer))
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


class _Writes:
    """A file's `write` and `flush` that remember the OSError a write raised."""

    def __init__(self, file: IO[bytes]):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()
