"""`python -m stages launch`: the matrix's stale cells spread over a Slurm cluster or this machine's GPUs,
each cell `dvc repro --single-item pretrain@CELL linear-eval@CELL`, so DVC records every output; then the
rest of the pipeline (the report) and the audit."""

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import UserError
from stages.launch.cells import read_plan, run_data_stages, stale_stages
from stages.launch.local import LocalOptions, find_gpus, finish_pipeline, run_cells
from stages.launch.slurm import SlurmOptions, check_slurm, submit

LOGS = Path("logs/launch")  # one log per cell: <cell>.log (git-ignored)


class Backend(StrEnum):
    slurm = "slurm"
    local = "local"


def launch(
    backend: Annotated[
        Backend, typer.Option(help="slurm: an sbatch array, a task per cell; local: this machine's GPUs (or its CPU).")
    ],
    gpus_per_cell: Annotated[
        int, typer.Option(min=1, help="GPUs per cell; above 1 the cell's pretraining runs under torchrun (DDP).")
    ] = 1,
    max_running: Annotated[
        int | None, typer.Option(min=1, help="slurm: at most this many cells at once (the array's %K).")
    ] = None,
    partition: Annotated[str | None, typer.Option(help="slurm: the partition.")] = None,
    time_limit: Annotated[
        str | None,
        typer.Option(
            "--time", help="slurm: time limit of a task, e.g. 1-00:00:00 (a cell cut short resumes when requeued)."
        ),
    ] = None,
    account: Annotated[str | None, typer.Option(help="slurm: the account to charge.")] = None,
    sbatch_arg: Annotated[
        list[str] | None,
        typer.Option(help="slurm: an sbatch flag passed as given, e.g. --sbatch-arg=--qos=high (repeatable)."),
    ] = None,
    exec_prefix: Annotated[
        str | None,
        typer.Option(
            help="slurm: a command the tasks' DVC and audit run under, "
            "e.g. a container: 'apptainer exec --nv image.sif' "
            "(its `python` is used)."
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="local: the GPUs to use, by index or UUID, e.g. 0,1,2,3, or cpu: the CPU (default: "
            "CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists, else the CPU). GPUs that do not exist are "
            "refused, unless PROJECTOR_IB_DEVICE=cpu runs the cells on the CPU on purpose."
        ),
    ] = None,
    cells_per_gpu: Annotated[
        int | None, typer.Option(min=1, help="local: cells sharing a GPU at once (default 1).")
    ] = None,
    cpu_jobs: Annotated[
        int | None,
        typer.Option(min=1, help="local, no GPU: cells at once on the CPU, each on its share of the CPUs (default 1)."),
    ] = None,
) -> None:
    """Run the cells that are not up to date: the data stages first, here, then the cells (an sbatch array,
    or on this machine), then the report and the audit. Logs: logs/launch/<cell>.log."""
    slurm_only = {
        "--max-running": max_running,
        "--partition": partition,
        "--time": time_limit,
        "--account": account,
        "--sbatch-arg": sbatch_arg,
        "--exec-prefix": exec_prefix,
    }
    local_only = {"--gpus": gpus, "--cells-per-gpu": cells_per_gpu, "--cpu-jobs": cpu_jobs}
    if misplaced := [
        flag for flag, value in (local_only if backend is Backend.slurm else slurm_only).items() if value is not None
    ]:
        raise UserError(f"{', '.join(misplaced)}: not an option of --backend {backend.value}")
    if backend is Backend.slurm:
        check_slurm()
        options = SlurmOptions(
            gpus_per_cell, max_running, partition, time_limit, account, tuple(sbatch_arg or ()), exec_prefix
        )
    else:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        slots = LocalOptions(find_gpus(gpus), gpus_per_cell, cells_per_gpu or 1, cpu_jobs or 1, cpus).slots()
    plan = read_plan()
    run_data_stages(plan)
    stale = stale_stages()
    if not stale:
        typer.echo("everything is up to date (dvc status): nothing to run")
        return
    cells = [cell for cell in plan.cells if stale & set(cell.stages)]
    typer.echo(f"{len(cells)} of {len(plan.cells)} cells to run: {' '.join(cell.key for cell in cells)}")
    if backend is Backend.slurm:
        submit(cells, options, LOGS)
    else:
        finish_pipeline(run_cells(cells, slots, gpus_per_cell, LOGS))
