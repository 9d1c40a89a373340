"""`--backend local`: the cells on this machine, `cells_per_gpu` at a time on each GPU (or group of
`gpus_per_cell` GPUs), pinned with CUDA_VISIBLE_DEVICES; without GPUs, `cpu_jobs` at a time on the CPU."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live

from pipeline.errors import UserError
from stages.launch.cells import Cell, dvc_command, dvc_env
from stages.launch.monitor import ATTEMPT, CellRun, table
from stages.pretrain import NPROC_VARIABLE

POLL_S = 0.5


@dataclass(frozen=True)
class LocalOptions:
    gpus: list[str]  # CUDA device indices (or UUIDs); empty: the CPU
    gpus_per_cell: int
    cells_per_gpu: int
    cpu_jobs: int

    def slots(self) -> list[str]:
        """One CUDA_VISIBLE_DEVICES value per cell that may run at once ("" for a CPU cell); each GPU's
        first cell before any GPU's second."""
        if not self.gpus:
            if self.gpus_per_cell > 1:
                raise UserError(
                    f"--gpus-per-cell {self.gpus_per_cell}: no GPU found (--gpus, CUDA_VISIBLE_DEVICES, nvidia-smi)"
                )
            return [""] * self.cpu_jobs
        if len(self.gpus) < self.gpus_per_cell:
            raise UserError(
                f"--gpus-per-cell {self.gpus_per_cell}: only {len(self.gpus)} GPU(s): {','.join(self.gpus)}"
            )
        n = self.gpus_per_cell
        groups = [",".join(self.gpus[i : i + n]) for i in range(0, len(self.gpus) - n + 1, n)]
        return groups * self.cells_per_gpu


def find_gpus(requested: str | None) -> list[str]:
    """--gpus if given, else CUDA_VISIBLE_DEVICES if set, else the GPUs nvidia-smi lists."""
    listing = requested if requested is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if listing is None and shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True
        )
        listing = query.stdout if query.returncode == 0 else ""
    return [gpu.strip() for gpu in (listing or "").replace("\n", ",").split(",") if gpu.strip()]


def run_cells(cells: list[Cell], slots: list[str], gpus_per_cell: int, logs: Path) -> list[CellRun]:
    """Run every cell, each free slot (see `LocalOptions.slots`) taking the next queued cell; a failed cell
    does not stop the others."""
    logs.mkdir(parents=True, exist_ok=True)
    runs = [CellRun(cell, logs / f"{cell.key}.log") for cell in cells]
    queue, free, running = deque(runs), list(slots), list[CellRun]()
    with _display(runs) as refresh:
        try:
            while queue or running:
                while queue and free:
                    running.append(_start(queue.popleft(), free.pop(0), gpus_per_cell))
                time.sleep(POLL_S)
                for run in [r for r in running if r.running.poll() is not None]:
                    _finish(run)
                    running.remove(run)
                    free.append(run.devices or "")
                refresh()
        except KeyboardInterrupt:  # stop the running cells (their checkpoints stay: the next launch resumes them)
            for run in running:  # each cell is its own process group: DVC and the stage it runs
                os.killpg(run.running.pid, signal.SIGTERM)
            for run in running:
                run.running.wait()
                _finish(run)
            raise
    return runs


def _start(run: CellRun, devices: str, gpus_per_cell: int) -> CellRun:
    """Start `dvc repro --single-item` of the cell's stages, appending to its log."""
    extra = {"CUDA_VISIBLE_DEVICES": devices, NPROC_VARIABLE: str(gpus_per_cell)}
    with open(run.log, "a") as log:
        log.write(f"{ATTEMPT}{time.time():.6f} CUDA_VISIBLE_DEVICES={devices} (local)\n")
        log.flush()
        run.process = subprocess.Popen(
            dvc_command("--wait-for-lock", "repro", "--single-item", *run.cell.stages),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dvc_env(**extra),
            start_new_session=True,
        )
    run.devices, run.started = devices, time.monotonic()
    _event(f"start  {run.cell.key} on {run.where}: {run.log}")
    return run


def _finish(run: CellRun) -> None:
    run.returncode, run.ended = run.running.returncode, time.monotonic()
    with open(run.log, "a") as log:
        log.write(f"launch: end {time.time():.6f} exit {run.returncode}\n")
    _event(f"{run.state:<6} {run.cell.key} after {run.elapsed()}")


def _event(line: str) -> None:
    """A line per start and end where there is no live table (a log file, CI)."""
    if not Console().is_terminal:
        typer.echo(line)


@contextmanager
def _display(runs: list[CellRun]) -> Iterator:
    """Yield `refresh()`: redraws the live table of cells on a terminal, does nothing elsewhere."""
    console = Console()
    if not console.is_terminal:
        yield lambda: None
        return
    with Live(table(runs), console=console, auto_refresh=False) as live:
        yield lambda: live.update(table(runs), refresh=True)


def finish_pipeline(runs: list[CellRun]) -> None:
    """Summarize; with no failure, `dvc repro` what is left (the report) and audit; else exit 1 naming the logs."""
    failed = [run for run in runs if run.returncode]
    typer.echo(f"cells: {len(runs) - len(failed)} done, {len(failed)} failed")
    if failed:
        typer.echo(
            "failed (the report was not made):\n"
            + "\n".join(f"  {run.cell.key}: exit {run.returncode}, log {run.log}" for run in failed),
            err=True,
        )
        raise typer.Exit(1)
    for command in (dvc_command("--wait-for-lock", "repro"), [sys.executable, "-m", "stages", "audit"]):
        if subprocess.run(command, env=dvc_env()).returncode:
            raise typer.Exit(1)
