"""Progress of long work: a rich bar on a terminal, a few log lines otherwise."""

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

log = logging.getLogger(__name__)


@contextmanager
def progress(description: str, total: float | None, unit: str = "items") -> Iterator[Callable[..., None]]:
    """Yield `advance(n, status="")`; `status` is a live text (loss, throughput) shown beside the bar.
    With `unit="bytes"` the bar shows sizes and transfer speed."""
    if sys.stderr.isatty():
        counts = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            *counts,
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(description, total=total, status="")
            yield lambda n, status="": bar.update(task, advance=n, status=status)
        return
    yield _LogLines(description, total, unit)


class _LogLines:
    """Log lines for logs that are files: at each tenth of `total`, at most one per 15 s, and the end."""

    def __init__(self, description: str, total: float | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done, self.last_time = 0.0, time.monotonic()

    def __call__(self, n: float, status: str = "") -> None:
        before, self.done = self.done, self.done + n
        finished = self.total is not None and self.done >= self.total
        tenth_crossed = self.total and int(10 * self.done / self.total) > int(10 * before / self.total)
        if finished or ((tenth_crossed or not self.total) and time.monotonic() - self.last_time >= 15):
            self.last_time = time.monotonic()
            share = f"{100 * self.done / self.total:.0f}% " if self.total else ""
            log.info("%s: %s(%d %s) %s", self.description, share, self.done, self.unit, status)
