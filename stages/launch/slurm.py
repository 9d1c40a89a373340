"""`--backend slurm`: one `sbatch` array with a task per cell, then a job that runs the rest of the pipeline
(the report, any other stale stage) and the audit once every task has ended and every cell is done."""

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline.errors import UserError
from stages.launch.cells import Cell
from stages.pretrain import NPROC_VARIABLE

WARNING_S = 300  # before its time limit, a task is warned (USR1) and requeues itself
CELLS_JOB, FINAL_JOB = "projector-ib-cells", "projector-ib-report"  # the jobs' names


@dataclass(frozen=True)
class SlurmOptions:
    gpus_per_cell: int
    max_running: int | None  # the array's %K: at most K cells at once
    partition: str | None
    time_limit: str | None
    account: str | None
    extra: tuple[str, ...]  # sbatch flags passed through as given
    exec_prefix: str | None  # what DVC and audit run under on the node (a container), which then has `python`

    def python(self) -> tuple[str, str]:
        """The start of a task's commands, and the line that puts the right `python` first on PATH for DVC's stages."""
        if self.exec_prefix:
            return f"{self.exec_prefix} python", ""
        return shlex.quote(sys.executable), f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"\n'

    def common(self) -> list[str]:
        """The flags both jobs get."""
        given = {"--partition": self.partition, "--time": self.time_limit, "--account": self.account}
        return [f"{flag}={value}" for flag, value in given.items() if value] + list(self.extra)


def check_slurm() -> None:
    """Slurm's commands are here, and no job of an earlier launch in this workspace is still queued (its cells
    would be submitted twice)."""
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise UserError(
            "sbatch not found: --backend slurm submits jobs with Slurm's sbatch (run it where Slurm's "
            "commands are, e.g. a login node), or use --backend local"
        )
    queue = subprocess.run(
        ["squeue", "--noheader", "--me", f"--name={CELLS_JOB},{FINAL_JOB}", "--format=%F %Z"],
        capture_output=True,
        text=True,
    )
    if queue.returncode:
        raise UserError(f"squeue failed: {queue.stderr.strip()}")
    rows = [line.split(" ", 1) for line in queue.stdout.splitlines()]  # array job id, working directory
    if jobs := sorted({job for job, workdir in rows if workdir == str(Path.cwd())}):
        raise UserError(
            f"jobs {', '.join(jobs)} of an earlier launch in {Path.cwd()} are still queued or running: "
            f"wait for them (squeue -j {','.join(jobs)}) or cancel them (scancel), then launch again"
        )


def submit(cells: list[Cell], options: SlurmOptions, logs: Path) -> None:
    """Submit the cells' array (if any cell is stale) and the final job after it; print how to follow them."""
    logs.mkdir(parents=True, exist_ok=True)
    jobs = [_submit_cells(cells, options, logs)] if cells else []
    jobs.append(_submit_final(jobs[0] if jobs else None, cells, options, logs))
    typer.echo(f"follow: squeue -j {','.join(jobs)}  |  tail -f {logs}/<cell>.log  |  cancel: scancel {' '.join(jobs)}")


def _submit_cells(cells: list[Cell], options: SlurmOptions, logs: Path) -> str:
    cap = f"%{options.max_running}" if options.max_running else ""
    job = _sbatch(
        [
            f"--job-name={CELLS_JOB}",
            f"--array=0-{len(cells) - 1}{cap}",
            f"--gres=gpu:{options.gpus_per_cell}",
            "--requeue",
            f"--signal=B:USR1@{WARNING_S}",
            "--open-mode=append",
            f"--output={logs}/slurm-%A.out",
            *options.common(),
        ],
        _write(logs / "cells.sh", cells_script(cells, options, logs)),
    )
    at_once = f", at most {options.max_running} at once" if options.max_running else ""
    typer.echo(
        f"submitted job {job}: {len(cells)} cells, {options.gpus_per_cell} GPU(s) each{at_once}; "
        f"logs: {logs}/<cell>.log"
    )
    return job


def _submit_final(after: str | None, cells: list[Cell], options: SlurmOptions, logs: Path) -> str:
    # `afterany`, not `afterok`: the job checks the cells itself, says which are not done, and never waits forever
    # on a dependency Slurm deems failed (a requeued task's killed attempt can count as a failure)
    dependency = [f"--dependency=afterany:{after}"] if after else []
    # one GPU: what is left after the cells is light (the report, cheap evaluations)
    job = _sbatch(
        [
            f"--job-name={FINAL_JOB}",
            *dependency,
            "--gres=gpu:1",
            "--open-mode=append",
            f"--output={logs}/report.log",
            *options.common(),
        ],
        _write(logs / "report.sh", final_script(cells, options, logs)),
    )
    when = f" once every task of job {after} has ended (it stops there if a cell is not done)" if after else ""
    typer.echo(f"submitted job {job}: dvc repro, then audit{when}; log: {logs}/report.log")
    return job


def cells_script(cells: list[Cell], options: SlurmOptions, logs: Path) -> str:
    """The array's batch script: task i runs `dvc repro --single-item` of cell i's stages, appending to the
    cell's log (a requeued task appends its next attempt); a line at start and at end says when and on which
    GPUs. Slurm's warning before the time limit (USR1) makes the task requeue itself (again every 10 s while Slurm
    answers "try again later"): the next attempt resumes from the cell's checkpoint."""
    keys = " ".join(shlex.quote(cell.key) for cell in cells)
    stages = " ".join(shlex.quote(" ".join(cell.stages)) for cell in cells)
    python, path = options.python()
    return f"""#!/bin/bash
# Written by `python -m stages launch --backend slurm`: task i of the array runs cell i.
cells=({keys})
stages=({stages})
cell=${{cells[$SLURM_ARRAY_TASK_ID]}}
task=${{SLURM_ARRAY_JOB_ID}}_$SLURM_ARRAY_TASK_ID
exec >>{shlex.quote(str(logs))}/"$cell.log" 2>&1
{path}export {NPROC_VARIABLE}={options.gpus_per_cell}
requeue() {{
  echo "launch: time limit near: requeue $task"
  until scontrol requeue "$task"; do sleep 10; done
  wait
}}
trap requeue USR1
echo "launch: start $(date +%s.%N) CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-}} task $task \\
restart ${{SLURM_RESTART_COUNT:-0}} on $(hostname)"
{python} -m dvc --wait-for-lock repro --single-item ${{stages[$SLURM_ARRAY_TASK_ID]}} &
wait $!  # in the background, so that the trap runs as soon as USR1 comes
status=$?
echo "launch: end $(date +%s.%N) exit $status"
exit $status
"""


def final_script(cells: list[Cell], options: SlurmOptions, logs: Path) -> str:
    """What is left of the pipeline, then the audit; after a cells' array, only if every cell's stages are up to
    date (a failed or cancelled task's are not: they are listed, and the job exits 1 before running them here)."""
    python, path = options.python()
    stages = " ".join(shlex.quote(stage) for cell in cells for stage in cell.stages)
    check = (
        f"""if ! {python} -m dvc --wait-for-lock status --quiet {stages}; then
  echo "launch: not every cell is done (a task failed or was cancelled: see {logs}/<cell>.log); not done:"
  {python} -m dvc status {stages}
  echo "launch: fix the cause, then launch again"
  exit 1
fi
"""
        if cells
        else ""
    )
    return f"""#!/bin/bash
# Written by `python -m stages launch --backend slurm`: what is left of the pipeline, then the audit.
set -e
{path}echo "launch: start $(date +%s.%N) job $SLURM_JOB_ID on $(hostname)"
{check}{python} -m dvc --wait-for-lock repro
{python} -m stages audit
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _sbatch(args: list[str], script: Path) -> str:
    """Submit `script` (Slurm keeps its own copy); return the job id."""
    command = ["sbatch", "--parsable", f"--chdir={Path.cwd()}", *args, str(script)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"sbatch refused the job ({shlex.join(command)}):\n{result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
