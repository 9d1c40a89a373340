"""Outputs appear complete or not at all: write under a staging name, rename when done."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; it replaces `out` only if the block succeeds."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a staging path beside `out`; it replaces `out` only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, out)
