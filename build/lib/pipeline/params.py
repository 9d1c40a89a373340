"""The schema of `params.yaml`: every knob, its range and its meaning.

Values live only in `params.yaml`: no field has a default here, so DVC (which reads the file, not this
schema) sees every value a stage uses. The whole file is validated whenever any stage starts.
"""

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.errors import ParamsError

DatasetName = Literal["cifar10", "cifar100", "imagenet100", "synthetic", "folder"]
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Url = Annotated[str, Field(pattern=r"^https?://\S+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ArchiveParams(Strict):
    """An official binary archive (CIFAR): where it lives and what its bytes must hash to."""

    url: Url = Field(description="Archive URL; a mirror or a local server works the same.")
    md5: Md5 = Field(description="MD5 of the whole archive, checked before anything is extracted.")
    member_md5: dict[str, Md5] = Field(
        description="MD5 of extracted members by file name ({} checks none)."
    )


class ImageTreeParams(Strict):
    """Images on the user's disk in class folders: `root/train/<class>/*`, `root/val/<class>/*`."""

    root: str | None = Field(description="The tree's root folder (null: not configured).")
    jpeg_quality: int = Field(ge=1, le=100, description="JPEG quality in the .beton.")
    max_resolution: int = Field(ge=8, le=4096, description="Longest side stored, in pixels.")


class FolderParams(ImageTreeParams):
    write_mode: Literal["raw", "jpg"] = Field(description="raw pixels (small images) or JPEG.")


class SyntheticParams(Strict):
    """The embedded dataset: 32x32 shapes and textures drawn from a seed (no network)."""

    seed: int = Field(ge=0)
    num_classes: int = Field(ge=2, le=20)
    train_per_class: int = Field(ge=1, le=100_000)
    test_per_class: int = Field(ge=1, le=100_000)


class DatasetsParams(Strict):
    cifar10: ArchiveParams
    cifar100: ArchiveParams
    imagenet100: ImageTreeParams
    synthetic: SyntheticParams
    folder: FolderParams


class DownloadParams(Strict):
    retries: int = Field(ge=0, le=100, description="Attempts after the first, resuming each time.")
    timeout_s: float = Field(gt=0, le=3600, description="Socket timeout per read, seconds.")


class ExperimentParams(Strict):
    """Which cells `dvc repro` builds (the DVC foreach/matrix lists)."""

    datasets: list[DatasetName] = Field(min_length=1)

    @field_validator("datasets")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("each dataset may appear once")
        return names


class Params(Strict):
    experiment: ExperimentParams
    download: DownloadParams
    datasets: DatasetsParams


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read `path` with ruamel (YAML 1.2, as DVC does) and validate the whole file."""
    path = Path(path)
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ParamsError(f"{path}: {len(lines)} problem(s)\n  " + "\n  ".join(lines)) from None


def _describe(err: dict) -> str:
    """One line per problem: key path, what was found, what is allowed."""
    loc = err["loc"]
    key = ".".join(str(part) for part in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        return f"{key}: unknown key{_did_you_mean(str(loc[-1]), known)}; allowed: {', '.join(known)}"
    if err["type"] == "missing":
        return f"{key}: missing"
    hint = ""
    if err["type"] == "literal_error" and isinstance(err["input"], str):
        hint = _did_you_mean(err["input"], re.findall(r"'([^']*)'", err["ctx"]["expected"]))
    return f"{key}: found {err['input']!r}; {err['msg']}{hint}"


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
