"""The `pretrain` stage: one cell of the matrix, resumable; under torchrun, data-parallel."""

import json
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from pipeline.atomic import atomic_file
from pipeline.params import load_params
from stages.common import PARAMS_FILE, Dataset, ParamsFile


def pretrain_command(
        dataset: Dataset,
        method: Annotated[str, typer.Option(help="simclr or barlow_twins.")],
        variant: Annotated[str, typer.Option(help="A name defined under `variants` in params.yaml.")],
        seed: Annotated[int, typer.Option(help="Seeds the model, shuffling and augmentation.")],
        data: Annotated[Path, typer.Option(help="Folder with train.beton and test.beton.")],
        metadata: Annotated[Path, typer.Option(help="The dataset's metadata JSON from `convert`.")],
        out: Annotated[Path, typer.Option(help="Run folder: checkpoint.pt, log.csv (resumed if present).")],
        metrics: Annotated[Path, typer.Option(help="Metrics JSON written at the end.")],
        params_file: ParamsFile = PARAMS_FILE) -> None:
    """Pretrain a ResNet-18 with SimCLR or Barlow Twins (+ the variant's projector modifications)."""
    from pipeline.pretrain import make_run, pretrain
    from pipeline.runtime import init_device, is_rank0
    params = load_params(params_file)
    run = make_run(params, dataset, method, variant, seed, json.loads(metadata.read_text()))
    result = pretrain(run, data, out, init_device(), _code_version())
    if is_rank0():
        with atomic_file(metrics) as staging:
            staging.write_text(json.dumps({"dataset": dataset, "method": method, "variant": variant, "seed": seed}
                                          | result, indent=2) + "\n")


def _code_version() -> str:
    result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"
