"""Schemas of the metrics files the stages write, and reading them back for the report and the audit."""

import json
from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from pipeline.errors import UserError
from pipeline.params import DatasetName, MethodName, Strict


class CellMetrics(Strict):
    dataset: DatasetName
    method: MethodName
    variant: str
    seed: int = Field(ge=0)

    @property
    def cell(self) -> tuple[str, str, str, int]:
        return self.dataset, self.method, self.variant, self.seed


class PretrainMetrics(CellMetrics):
    """`pretrain`: the last epoch's averages (PAPER.md 3.3 quantities) and online accuracy."""

    epoch: int
    epochs: int
    ssl_loss: float
    mi_z1_z2: float
    mi_z1_r: float
    lower_bound: float
    upper_bound: float
    entropy_z1: float
    online_train_acc: float = Field(ge=0, le=1)
    online_test_acc: float = Field(ge=0, le=1)
    lr: float


class LinearEvalMetrics(CellMetrics):
    pretrained: bool  # False: the untrained encoder, a reference level
    protocol: str
    epochs: int
    top1: float = Field(ge=0, le=1)
    top5: float = Field(ge=0, le=1)
    knn_top1: float = Field(ge=0, le=1)
    n_train: int
    n_test: int


class SplitCounts(Strict):
    count: int
    per_class: list[int]


class DatasetMetrics(Strict):
    """`convert`: what went into the .beton files."""

    dataset: DatasetName
    classes: list[str]
    num_classes: int
    storage: dict[str, int | str]
    sources_sha256: dict[str, str]
    train: SplitCounts
    test: SplitCounts
    image_shape: list[int] | None
    mean: list[float] | None
    std: list[float] | None

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetMetrics":
        if self.num_classes != len(self.classes):
            raise ValueError(f"num_classes is {self.num_classes} but {len(self.classes)} classes are listed")
        return self


def read(path: Path, schema: type[Strict]) -> Strict:
    """The JSON file at `path` validated by `schema`; a one-line UserError naming the file otherwise."""
    try:
        return schema.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}): truncated or corrupt") from None
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors()]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{path}: not a valid {schema.__name__} file: {problems[0]}{more}") from None


def read_metadata(path: Path) -> DatasetMetrics:
    """A dataset's metadata JSON, written by `convert` and read by the stages that train on the dataset."""
    try:
        return read(path, DatasetMetrics)
    except UserError as e:
        raise UserError(f"{e}; run convert again (it writes this file)") from None


def collect(directory: Path, schema: type[CellMetrics], cells: list[tuple]) -> dict[tuple, CellMetrics]:
    """The metrics of exactly `cells`, from the JSON files in `directory` (others are ignored)."""
    found = {m.cell: m for m in (read(p, schema) for p in sorted(directory.glob("*.json")))}
    if missing := [c for c in cells if c not in found]:
        raise UserError(f"{directory}: no metrics for {len(missing)} cell(s), e.g. {'-'.join(map(str, missing[0]))}")
    return {c: found[c] for c in cells}
