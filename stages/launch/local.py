"""`--backend local`: the cells on this machine, `cells_per_gpu` at a time on each GPU (or group of
`gpus_per_cell` GPUs), pinned with CUDA_VISIBLE_DEVICES; without GPUs, `cpu_jobs` at a time on the CPU. Each cell
that may run at once gets its own share of the CPUs (its processes are pinned to them), so its loader threads
(`training.loader_workers: -1`) take that share, not every core."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live

from pipeline.errors import UserError
from stages.launch.cells import Cell, dvc_command, dvc_env
from stages.launch.monitor import ATTEMPT, CellRun, Slot, table
from stages.pretrain import NPROC_VARIABLE

POLL_S = 0.5
STOP_S = 60  # after Ctrl-C, how long a cell may take to stop before it is killed
CPU = "cpu"  # `--gpus cpu`: the cells run on the CPU


@dataclass(frozen=True)
class LocalOptions:
    gpus: list[str]  # CUDA device indices (or UUIDs); empty: the CPU
    gpus_per_cell: int
    cells_per_gpu: int
    cpu_jobs: int
    cpus: tuple[int, ...]  # the CPUs the launch may use, shared among the cells that run at once

    def slots(self) -> list[Slot]:
        """One slot per cell that may run at once: its CUDA_VISIBLE_DEVICES ("" for a CPU cell), each GPU's first
        cell before any GPU's second, and its share of `cpus`."""
        if not self.gpus:
            if self.gpus_per_cell > 1:
                raise UserError(
                    f"--gpus-per-cell {self.gpus_per_cell}: no GPU found (--gpus, CUDA_VISIBLE_DEVICES, nvidia-smi)"
                )
            devices = [""] * self.cpu_jobs
        elif len(self.gpus) < self.gpus_per_cell:
            raise UserError(
                f"--gpus-per-cell {self.gpus_per_cell}: only {len(self.gpus)} GPU(s): {','.join(self.gpus)}"
            )
        else:
            n = self.gpus_per_cell
            devices = [",".join(self.gpus[i : i + n]) for i in range(0, len(self.gpus) - n + 1, n)] * self.cells_per_gpu
        return [Slot(gpus, cpus) for gpus, cpus in zip(devices, share_cpus(self.cpus, len(devices)))]


def share_cpus(cpus: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    """`cpus` in n contiguous shares whose sizes differ by at most one (fewer CPUs than shares: one each, in turn)."""
    if len(cpus) < n:
        return [(cpus[i % len(cpus)],) for i in range(n)]
    return [cpus[i * len(cpus) // n : (i + 1) * len(cpus) // n] for i in range(n)]


def find_gpus(requested: str | None) -> list[str]:
    """--gpus if given (`cpu`: none), else CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists; a GPU that
    does not exist here is refused, unless PROJECTOR_IB_DEVICE=cpu says the cells run on the CPU on purpose (the
    GPU ids then only pin the cells, as on a GPU machine)."""
    from pipeline.runtime import DEVICE_VARIABLE  # imports torch: here, not as the CLI starts

    if requested is not None and requested.strip() == CPU:
        return []
    if requested is not None and not requested.strip():
        raise UserError(f"--gpus '': names no GPU; name GPUs (e.g. --gpus 0,1), or write --gpus {CPU} for the CPU")
    listing = requested if requested is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if listing is None:
        return [gpu for gpu in existing_gpus() if gpu.isdigit()]
    gpus = [gpu.strip() for gpu in listing.split(",") if gpu.strip()]
    if os.environ.get(DEVICE_VARIABLE) != CPU and (missing := _missing(gpus)):
        found = ", ".join(gpu for gpu in existing_gpus() if gpu.isdigit()) or "none"
        raise UserError(
            f"{'--gpus' if requested is not None else 'CUDA_VISIBLE_DEVICES'} {','.join(gpus)}: no GPU "
            f"{', '.join(missing)} on this machine (GPUs found: {found}); name GPUs that exist, or write --gpus {CPU} "
            f"for the CPU ({DEVICE_VARIABLE}=cpu: run the cells on the CPU on purpose, pinned as given)"
        )
    return gpus


def existing_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES may name them: indices and UUIDs (MIG devices' too) from
    `nvidia-smi -L`, else the indices torch counts."""
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if listing.returncode == 0:
            return re.findall(r"^GPU (\d+):", listing.stdout, re.M) + re.findall(r"\(UUID: ([^)]+)\)", listing.stdout)
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def _missing(gpus: list[str]) -> list[str]:
    """The GPUs of `gpus` that are not here: an index, or a UUID as CUDA takes it (whole, or its start)."""
    existing = existing_gpus()
    return [gpu for gpu in gpus if not any(e == gpu or (e.startswith(gpu) and not gpu.isdigit()) for e in existing)]


def run_cells(cells: list[Cell], slots: list[Slot], gpus_per_cell: int, logs: Path) -> list[CellRun]:
    """Run every cell, each free slot (see `LocalOptions.slots`) taking the next queued cell; a failed cell
    does not stop the others. Ctrl-C interrupts the running cells (`_interrupt`) and raises on."""
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
                    free.append(run.placed)
                refresh()
        except KeyboardInterrupt:  # also when it came between a cell's start and its place in `running`
            _interrupt([run for run in runs if run.process is not None and run.returncode is None])
            refresh()
            raise
    return runs


def _interrupt(running: list[CellRun]) -> None:
    """Stop the running cells as Ctrl-C stops a command: SIGINT to each cell's process group (DVC and the stage it
    runs); the stage exits, its checkpoint stays (the next launch resumes it), and DVC releases its locks. A cell
    still running after STOP_S, or at a second Ctrl-C, is killed (DVC then finds its lock stale next time)."""
    for run in running:
        run.interrupted = True
        _signal(run, signal.SIGINT)
    deadline = time.monotonic() + STOP_S
    try:
        for run in running:
            with suppress(subprocess.TimeoutExpired):
                run.running.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for run in running:
            if run.running.poll() is None:
                _signal(run, signal.SIGKILL)
            run.running.wait()
            _finish(run)
    if running:
        typer.echo(
            f"interrupted: {' '.join(run.cell.key for run in running)} (a checkpoint stays: launch again to resume)",
            err=True,
        )


def _signal(run: CellRun, signal_number: int) -> None:
    with suppress(ProcessLookupError):  # every process of the cell has ended
        os.killpg(run.running.pid, signal_number)


def _start(run: CellRun, slot: Slot, gpus_per_cell: int) -> CellRun:
    """Start `dvc repro --single-item` of the cell's stages on `slot`'s GPUs and CPUs, appending to its log."""
    extra = {"CUDA_VISIBLE_DEVICES": slot.devices, NPROC_VARIABLE: str(gpus_per_cell)}
    with open(run.log, "a") as log:
        log.write(f"{ATTEMPT}{time.time():.6f} CUDA_VISIBLE_DEVICES={slot.devices} (local, {slot})\n")
        log.flush()
        run.process = subprocess.Popen(
            dvc_command("--wait-for-lock", "repro", "--single-item", *run.cell.stages),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dvc_env(**extra),
            start_new_session=True,
            preexec_fn=lambda: _enter_slot(slot),
        )
    run.slot, run.started = slot, time.monotonic()
    _event(f"start  {run.cell.key} on {run.where}: {run.log}")
    return run


def _enter_slot(slot: Slot) -> None:
    """In the cell's process before it runs DVC: its CPUs, and Ctrl-C's signal heard (a launch started in the
    background ignores it, and its children would too) so that `_interrupt` can stop it."""
    os.sched_setaffinity(0, slot.cpus)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
