"""What a running cell is doing, read from the tail of its log, and the live table of every cell."""

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from rich.table import Table

from stages.launch.cells import Cell

ATTEMPT = "launch: start "  # `launch`, as an attempt at the cell starts
STAGE = re.compile(r"Running stage '([^']+)'")  # DVC, as a stage starts
EPOCH = re.compile(r"epoch (\d+)/(\d+)")  # pretraining's progress and epoch lines
RATE = re.compile(r"([\d.]+) images/s|images_per_s ([\d.]+)")
TAIL_BYTES = 16_384


@dataclass(frozen=True)
class Slot:
    """Where a cell runs: its GPUs (CUDA_VISIBLE_DEVICES; "" for the CPU) and the CPUs its processes may use."""

    devices: str
    cpus: tuple[int, ...]

    def __str__(self) -> str:
        cpus = f"CPU{'s' if len(self.cpus) > 1 else ''} {_ranges(self.cpus)}"
        return f"GPU {self.devices}, {cpus}" if self.devices else cpus


def _ranges(cpus: tuple[int, ...]) -> str:
    """0,1,2,3,6 as 0-3,6 (taskset's list form)."""
    spans: list[list[int]] = []
    for cpu in cpus:
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


@dataclass
class CellRun:
    """One cell's run on this machine: queued, then running in `slot`, then done, failed or interrupted."""

    cell: Cell
    log: Path
    slot: Slot | None = None  # while running and after
    process: Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    returncode: int | None = None
    interrupted: bool = False  # stopped by the launch's Ctrl-C
    last_seen: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> Popen:
        """The cell's process (it has started)."""
        assert self.process is not None, f"{self.cell.key} has not started"
        return self.process

    @property
    def placed(self) -> Slot:
        """The cell's slot (it has started)."""
        assert self.slot is not None, f"{self.cell.key} has not started"
        return self.slot

    @property
    def state(self) -> str:
        if self.process is None:
            return "queued"
        if self.returncode is None:
            return "running"
        if self.returncode == 0:
            return "done"
        return "interrupted" if self.interrupted else f"failed ({self.returncode})"

    @property
    def where(self) -> str:
        return "" if self.slot is None else str(self.slot)

    def elapsed(self) -> str:
        if not self.started:
            return ""
        seconds = int((self.ended or time.monotonic()) - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}"


def read_progress(log: Path) -> dict[str, str]:
    """The stage running and, for pretraining, its epoch and images/s, from the last lines of `log`."""
    if not log.exists():
        return {}
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - TAIL_BYTES))
        text = f.read().decode(errors="replace")
    text = text[max(text.rfind(ATTEMPT), 0) :]  # this attempt (the log keeps earlier launches' too)
    stages = STAGE.findall(text)
    if stages:
        text = text[text.rfind(f"Running stage '{stages[-1]}'") :]  # what the current stage printed
    progress = {"stage": stages[-1].split("@")[0] if stages else ""}
    if epochs := EPOCH.findall(text):
        progress["epoch"] = "/".join(epochs[-1])
    if rates := RATE.findall(text):
        progress["images/s"] = f"{float(next(r for r in rates[-1] if r)):,.0f}"
    return progress


def table(runs: list[CellRun]) -> Table:
    grid = Table("cell", "state", "on", "stage", "epoch", "images/s", "time", title="cells")
    for run in runs:
        if run.state == "running":
            run.last_seen = read_progress(run.log)
        seen = run.last_seen
        grid.add_row(
            run.cell.key,
            run.state,
            run.where,
            seen.get("stage", ""),
            seen.get("epoch", ""),
            seen.get("images/s", ""),
            run.elapsed(),
        )
    return grid
