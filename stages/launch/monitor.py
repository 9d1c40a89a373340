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


@dataclass
class CellRun:
    """One cell's run on this machine: queued, then running on `devices`, then done or failed."""

    cell: Cell
    log: Path
    devices: str | None = None  # CUDA_VISIBLE_DEVICES while running; "" on CPU
    process: Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    returncode: int | None = None
    last_seen: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> Popen:
        """The cell's process (it has started)."""
        assert self.process is not None, f"{self.cell.key} has not started"
        return self.process

    @property
    def state(self) -> str:
        if self.process is None:
            return "queued"
        if self.returncode is None:
            return "running"
        return "done" if self.returncode == 0 else f"failed ({self.returncode})"

    @property
    def where(self) -> str:
        return "" if self.devices is None else f"GPU {self.devices}" if self.devices else "CPU"

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
