"""The `pretrain` stage: one cell of the matrix, resumable; under torchrun, data-parallel."""

import subprocess
from pathlib import Path
from typing import Annotated

import typer

from pipeline.atomic import atomic_file
from pipeline.metrics import read_metadata
from pipeline.params import load_params
from stages.common import PARAMS_FILE, Data, Dataset, Metadata, Method, ParamsFile, Seed, Variant


def pretrain_command(
        dataset: Dataset, method: Method, variant: Variant, seed: Seed, data: Data, metadata: Metadata,
        out: Annotated[Path, typer.Option(help="Run folder: checkpoint.pt, log.csv (resumed if present).")],
        metrics: Annotated[Path, typer.Option(help="Metrics JSON written at the end.")],
        params_file: ParamsFile = PARAMS_FILE) -> None:
    """Pretrain a ResNet-18 with SimCLR or Barlow Twins (+ the variant's projector modifications)."""
    from pipeline.loaders import check_betons
    from pipeline.pretrain import pretrain
    from pipeline.run import make_run
    from pipeline.runtime import init_device, is_rank0
    params = load_params(params_file)
    meta = read_metadata(metadata)
    check_betons(data, meta.num_classes, metadata)
    device = init_device()
    run = make_run(params, dataset, method, variant, seed, meta, device)
    result = pretrain(run, params.training, data, out, device, _code_version())
    if is_rank0():
        with atomic_file(metrics) as staging:
            staging.write_text(result.model_dump_json(indent=2) + "\n")


def _code_version() -> str:
    result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"
