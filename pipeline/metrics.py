"""Schemas of the metrics files the stages write, and reading them back for the report and the audit."""

import csv
import json
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError, model_validator

from pipeline.atomic import atomic_file
from pipeline.errors import UserError
from pipeline.params import DatasetName, MethodName, Strict

S = TypeVar("S", bound=Strict)
C = TypeVar("C", bound="CellMetrics")
Cell = tuple[str, str, str, int]  # dataset, method, variant, seed


class CellMetrics(Strict):
    dataset: DatasetName
    method: MethodName
    variant: str
    seed: int = Field(ge=0)

    @property
    def cell(self) -> Cell:
        return self.dataset, self.method, self.variant, self.seed


class EpochValues(Strict):
    """Per-epoch averages of the docs/method.md 3.3 quantities and the online accuracies: what compares runs."""

    epoch: int = Field(ge=1)
    ssl_loss: float
    mi_z1_z2: float = Field(description="I(Z1;Z2), matrix Rényi mutual information of features and projections.")
    mi_z1_r_estimate: float = Field(
        description="SimCLR: the InfoNCE bound log(2·batch − 1) − L(h_a, h_b) on I(Z1;R); "
        "Barlow Twins: −L(h_a, h_b), the reference's proxy."
    )
    entropy_z1: float = Field(description="H(Z1), matrix Rényi entropy of the features.")
    online_train_acc: float = Field(ge=0, le=1)
    lower_bound: float = Field(description="mi_z1_r_estimate − I(Z1;Z2) (the paper drops I(R;Y)).")
    upper_bound: float = Field(description="H(Z1) − I(Z1;Z2) (the paper drops I(Y;Z2)).")
    mi_grad_ratio: float = Field(ge=0, description="‖λ·∂I(Z1;Z2)/∂h‖ / ‖∂L_ssl/∂h‖ on the epoch's first batch.")
    online_test_acc: float = Field(ge=0, le=1)


class EpochLog(EpochValues):
    """One row of a run's log.csv: the epoch's values, and training facts (the learning rate, the speed)."""

    lr: float
    images_per_s: float


COLUMNS = tuple(EpochLog.model_fields)  # log.csv's columns; plots and dvc.yaml's plot keys name some of them


class PretrainMetrics(EpochValues, CellMetrics):
    """`pretrain`: the last epoch's values, and what decides whether the regularizer could act. A DVC metric:
    no speed or machine here (those are in the stage's `pipeline.provenance` record)."""

    epochs: int
    precision: str
    mi_weight: float
    mi_grad_fp32: bool
    mi_grad_ratio_max: float


class LinearEvalMetrics(CellMetrics):
    """`linear-eval`: the paper's protocol (top1, top5) and the extra columns (probe_top1, knn_top1)."""

    pretrained: bool  # False: the untrained encoder, the reference level
    protocol: str
    epochs: int
    top1: float = Field(ge=0, le=1)
    top5: float = Field(ge=0, le=1)
    probe_top1: float = Field(ge=0, le=1, description="Fast frozen linear probe on features of plain images.")
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


def read(path: Path, schema: type[S]) -> S:
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


def write(path: Path, result: Strict) -> None:
    """`result` as indented JSON at `path`, complete or not at all."""
    with atomic_file(path) as staging:
        staging.write_text(result.model_dump_json(indent=2) + "\n")


def read_metadata(path: Path) -> DatasetMetrics:
    """A dataset's metadata JSON, written by `convert` and read by the stages that train on the dataset."""
    try:
        return read(path, DatasetMetrics)
    except UserError as e:
        raise UserError(f"{e}; run convert again (it writes this file)") from None


def collect(directory: Path, schema: type[C], cells: list[tuple]) -> dict[tuple, C]:
    """The metrics of exactly `cells`, from the JSON files in `directory` (others are ignored)."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such folder (the metrics of {len(cells)} cell(s) are read from it)")
    found = {m.cell: m for m in (read(p, schema) for p in sorted(directory.glob("*.json")))}
    if missing := [c for c in cells if c not in found]:
        raise UserError(f"{directory}: no metrics for {len(missing)} cell(s), e.g. {'-'.join(map(str, missing[0]))}")
    return {c: found[c] for c in cells}


def write_log(path: Path, history: list[EpochLog]) -> None:
    lines = [",".join(COLUMNS)] + [",".join(f"{getattr(row, c):.6g}" for c in COLUMNS) for row in history]
    path.write_text("\n".join(lines) + "\n")


def read_log(path: Path) -> list[EpochLog]:
    """A run's log.csv, validated: every row complete and finite."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError("no epochs")
        return [
            EpochLog.model_validate({key: float(value) if key != "epoch" else int(value) for key, value in row.items()})
            for row in rows
        ]
    except ValidationError as e:
        error = e.errors()[0]
        raise UserError(f"{path}: not a valid training log ({error['loc'][0]}: {error['msg']})") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a valid training log ({e})") from None
