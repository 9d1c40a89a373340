"""A pretrained encoder as a safetensors file: tensors only (no pickle, so loading runs no code), in
torchvision's `resnet18` key layout (without `fc`), with what it needs to be used in the header's metadata.

The header's `sha256` covers the metadata and every tensor, so a damaged or edited file is refused; it does not
authenticate the file (whoever edits it can recompute the sum). docs/usage.md, "Exporting an encoder".
"""

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Json, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.atomic import atomic_file
from pipeline.backbones import ResNet18, resnet18
from pipeline.checkpoint import encoder_weights
from pipeline.errors import UserError

FORMAT = "projector-ib-encoder/1"  # the header's `format`: changes when the layout or the metadata does
DIGEST = "sha256"  # the header key of the sum over the other keys and the tensors


class EncoderMetadata(BaseModel):
    """The header's metadata, every value a string there (numbers and lists as JSON): which cell the encoder
    comes from and how to feed it, `(x / 255 - mean) / std` for uint8 RGB images `x` of `image_size` pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # lax: "0" is read as the int 0

    format: Literal["projector-ib-encoder/1"]
    dataset: str
    method: str
    variant: str
    seed: int
    epoch: int  # pretraining epochs completed
    epochs: int  # pretraining epochs planned
    stem: Literal["cifar", "imagenet"]
    width: int  # ResNet-18 width: 64 is torchvision's, features are 8 * width
    image_size: int  # the side of the training crops, pixels
    mean: Json[tuple[float, float, float]]
    std: Json[tuple[float, float, float]]
    code_version: str  # `git describe` of the code that pretrained it

    def header(self) -> dict[str, str]:
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.model_dump().items()}


def encoder_from_checkpoint(state: dict, source: Path) -> tuple[dict[str, Tensor], EncoderMetadata]:
    """The encoder's tensors and metadata from a pretraining checkpoint (`load_checkpoint`'s dict)."""
    try:
        config = state["config"]
        metadata = EncoderMetadata(
            format=FORMAT,
            dataset=config["dataset"],
            method=config["method"],
            variant=config["variant"]["name"],
            seed=config["seed"],
            epoch=state["epoch"],
            epochs=config["common"]["epochs"],
            stem=config["stem"],
            width=config["common"]["backbone_width"],
            image_size=config["crop_size"],
            mean=json.dumps(config["mean"]),
            std=json.dumps(config["std"]),
            code_version=state["code_version"],
        )
        tensors = {k: v.contiguous() for k, v in encoder_weights(state).items()}  # safetensors stores dense tensors
    except (KeyError, TypeError, AttributeError, ValidationError) as e:
        raise UserError(
            f"{source}: not a pretraining checkpoint of this pipeline ({_reason(e)}); pass the checkpoint.pt a "
            "pretraining run wrote"
        ) from None
    rebuild(tensors, metadata, source)
    return tensors, metadata


def save_encoder(tensors: dict[str, Tensor], metadata: EncoderMetadata, path: Path) -> None:
    """Write `path` (complete or not at all), the header's metadata summed with the tensors."""
    header = metadata.header()
    with atomic_file(path) as staging:
        save_file(tensors, staging, metadata=header | {DIGEST: _digest(tensors, header)})


def load_encoder(path: Path) -> tuple[ResNet18, EncoderMetadata]:
    """The encoder in `path`, in eval mode, and its metadata; a file that is not an intact export is refused
    (UserError, one line)."""
    try:
        with safe_open(path, framework="pt") as f:
            header, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a safetensors file ({_reason(e)})") from None
    if missing := [k for k in [*EncoderMetadata.model_fields, DIGEST] if k not in header]:
        raise UserError(
            f"{path}: not an encoder written by `python -m stages export` (no {', '.join(missing)} in its metadata)"
        )
    if header.pop(DIGEST) != _digest(tensors, header):
        raise UserError(f"{path}: changed after export ({DIGEST} of its metadata and tensors differs); export it again")
    try:
        metadata = EncoderMetadata.model_validate(header)
    except ValidationError as e:
        raise UserError(f"{path}: its metadata does not describe an encoder ({_reason(e)})") from None
    return rebuild(tensors, metadata, path).eval(), metadata


def rebuild(tensors: dict[str, Tensor], metadata: EncoderMetadata, source: Path) -> ResNet18:
    """The ResNet-18 `metadata` describes with `tensors` loaded; refused unless names, shapes and dtypes match."""
    backbone = resnet18(metadata.stem, metadata.width)
    if problems := _mismatches(tensors, backbone.state_dict()):
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise UserError(
            f"{source}: its tensors do not make the width-{metadata.width} ResNet-18 with the {metadata.stem} stem "
            f"its metadata describes ({problems[0]}{more})"
        )
    backbone.load_state_dict(tensors)
    return backbone


def _mismatches(tensors: dict[str, Tensor], expected: dict[str, Tensor]) -> list[str]:
    """What differs from the `expected` state dict, in the model's order: missing, reshaped or retyped tensors,
    then unexpected ones."""
    problems = []
    for k, e in expected.items():
        if (t := tensors.get(k)) is None:
            problems.append(f"{k} missing")
        elif (t.shape, t.dtype) != (e.shape, e.dtype):
            problems.append(f"{k} is {t.dtype} {list(t.shape)}, expected {e.dtype} {list(e.shape)}")
    return problems + [f"{k} unexpected" for k in tensors if k not in expected]


def _digest(tensors: dict[str, Tensor], header: dict[str, str]) -> str:
    """SHA-256 of the header's metadata and of each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _reason(e: Exception) -> str:
    """The first line of an error: a missing key, a field that does not validate, the reader's complaint."""
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    if isinstance(e, KeyError):
        return f"no {e.args[0]!r}"
    return (str(e).splitlines() or [type(e).__name__])[0]
