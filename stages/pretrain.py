"""The `pretrain` stage: one cell of the matrix, resumable; under torchrun, data-parallel."""

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.atomic import check_output
from pipeline.errors import UserError
from pipeline.metrics import read_metadata
from pipeline.params import load_params
from stages.common import PARAMS_FILE, Data, Dataset, Metadata, Method, ParamsFile, Seed, Variant

# Processes (one per GPU) for this cell, set by `launch`: above 1, the stage re-executes itself under torchrun,
# so dvc.yaml's `cmd` (and with it the stage's hash in dvc.lock) is the same on one GPU or several.
NPROC_VARIABLE = "PROJECTOR_IB_NPROC"


def pretrain_command(
    dataset: Dataset,
    method: Method,
    variant: Variant,
    seed: Seed,
    data: Data,
    metadata: Metadata,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint.pt, log.csv (resumed if present).")],
    metrics: Annotated[
        Path, typer.Option(help="JSON file written at the end: the last epoch's losses, bounds and accuracy.")
    ],
    params_file: ParamsFile = PARAMS_FILE,
    provenance: Annotated[
        Path | None, typer.Option(help="JSON written at the end: the machine, software and speed (dvc.yaml: always).")
    ] = None,
) -> None:
    """Pretrain a ResNet-18 with SimCLR or Barlow Twins (+ the variant's projector modifications)."""
    _torchrun_if_asked()
    from pipeline.loaders import check_betons
    from pipeline.metrics import CellMetrics, read_log, write
    from pipeline.pretrain import pretrain
    from pipeline.provenance import Provenance, code_version, machine
    from pipeline.run import cell_variant, make_run
    from pipeline.runtime import is_rank0, on_device

    params = load_params(params_file)
    cell_variant(params, dataset, method, variant)  # a wrong name first, then the files
    check_output(out, folder=True)
    check_output(metrics)
    if provenance:
        check_output(provenance)
    meta = read_metadata(metadata)
    check_betons(data, meta.num_classes, metadata)
    with on_device(params.training.torch_threads) as device:
        machine(device)  # before training: oneDNN names its ISA on its first use
        run = make_run(params, dataset, method, variant, seed, meta, device)
        result = pretrain(run, params.training, data, out, device, code_version())
        if is_rank0():
            write(metrics, result)
            if provenance:
                cell = result.model_dump(include=set(CellMetrics.model_fields))
                speed = read_log(out / "log.csv")[-1].images_per_s
                write(provenance, Provenance(**cell, machine=machine(device), images_per_s=speed))


def _torchrun_if_asked() -> None:
    """Replace this process by `torchrun` running the same command, when PROJECTOR_IB_NPROC asks for several
    processes and this is not already one of torchrun's (which set WORLD_SIZE); first, stop if CUDA cannot be
    used (unless PROJECTOR_IB_DEVICE=cpu: then the processes run on the CPU, with gloo)."""
    value = os.environ.get(NPROC_VARIABLE, "1")
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{NPROC_VARIABLE}={value!r}: expected a number of processes (1 or more)")
    if int(value) > 1 and "WORLD_SIZE" not in os.environ:
        from pipeline.runtime import choose_device

        choose_device(int(value))  # no GPU to use: say why once, here, rather than in every process
        # one node: rendezvous on the loopback address (a container's hostname may not resolve)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--local-addr=127.0.0.1",
                f"--nproc-per-node={value}",
                "-m",
                "stages",
                *sys.argv[1:],
            ],
        )
