"""The `pretrain` stage: one cell of the matrix, resumable; under torchrun, data-parallel."""

import json
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from pipeline.atomic import atomic_file
from pipeline.params import load_params
from stages.common import PARAMS_FILE, Data, Dataset, Metadata, Method, ParamsFile, Seed, Variant


def pretrain_command(
        dataset: Dataset, method: Method, variant: Variant, seed: Seed, data: Data, metadata: Metadata,
        out: Annotated[Path, typer.Option(help="Run folder: checkpoint.pt, log.csv (resumed if present).")],
        metrics: Annotated[Path, typer.Option(help="Metrics JSON written at the end.")],
        params_file: ParamsFile = PARAMS_FILE) -> None:
    """Pretrain a ResNet-18 with SimCLR or Barlow Twins (+ the variant's projector modifications)."""
    from pipeline.loaders import check_betons
    from pipeline.metrics import read_metadata
    from pipeline.pretrain import make_run, pretrain
    from pipeline.runtime import init_device, is_rank0
    params = load_params(params_file)
    meta = read_metadata(metadata)
    check_betons(data, meta.num_classes, metadata)
    run = make_run(params, dataset, method, variant, seed, meta.model_dump())
    result = pretrain(run, data, out, init_device(), _code_version())
    if is_rank0():
        with atomic_file(metrics) as staging:
            staging.write_text(json.dumps({"dataset": dataset, "method": method, "variant": variant, "seed": seed}
                                          | result, indent=2) + "\n")


def _code_version() -> str:
    result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"
