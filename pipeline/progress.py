"""Progress of long work: a rich bar on a terminal, a few log lines otherwise."""

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                           TaskProgressColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn)

log = logging.getLogger(__name__)


@contextmanager
def progress(description: str, total: float | None, unit: str = "items") -> Iterator[Callable[..., None]]:
    """Yield `advance(n, status="")`; `status` is a live text (loss, throughput) shown beside the bar.
    With `unit="bytes"` the bar shows sizes and transfer speed."""
    if sys.stderr.isatty():
        counts = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
        columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *counts, TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}"))
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(description, total=total, status="")
            yield lambda n, status="": bar.update(task, advance=n, status=status)
        return
    yield _LogLines(description, total, unit)


class _LogLines:
    """One line per 10% of `total` (or per 30 s when the total is unknown): readable in CI logs."""

    def __init__(self, description: str, total: float | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done, self.next_report, self.last_time = 0.0, 0.1, time.monotonic()
        log.info("%s: started", description)

    def __call__(self, n: float, status: str = "") -> None:
        self.done += n
        if self.total:
            if self.done / self.total >= self.next_report - 1e-9:
                log.info("%s: %d%% (%d/%d %s) %s", self.description, 100 * self.done / self.total,
                         self.done, self.total, self.unit, status)
                self.next_report = int(10 * self.done / self.total + 1) / 10
        elif time.monotonic() - self.last_time > 30:
            self.last_time = time.monotonic()
            log.info("%s: %d %s", self.description, self.done, self.unit)
