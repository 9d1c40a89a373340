"""Outputs appear complete or not at all: write under a staging name, rename when done.

A write that finds no room (a full disk, a quota, the file size limit) is a UserError naming the output; the
staging name is removed and the previous output, if any, stays as it was.
"""

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError

NO_ROOM = {  # errno of a write that found no room: what the user can do about it
    errno.ENOSPC: "free space on its disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}


def check_output(out: Path, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder where a file goes (or the
    reverse), or a path below a file."""
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if out.exists():
        if out.is_dir() != folder:
            raise UserError(f"{out}: is a {other}; expected the path of a {kind} to write")
        return
    parent = next(p for p in out.parents if p.exists())  # '.' or '/' at the latest
    if not parent.is_dir():
        raise UserError(f"{out}: cannot be written: {parent} is a file, not a folder")


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; it replaces `out` only if the block succeeds."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    with _removed_on_failure(staging, out, lambda: shutil.rmtree(staging, ignore_errors=True)):
        staging.mkdir(parents=True)
        yield staging
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a staging path beside `out`; it replaces `out` only if the block succeeds."""
    staging = out.with_name(f".{out.name}.partial")
    with _removed_on_failure(staging, out, lambda: staging.unlink(missing_ok=True)):
        out.parent.mkdir(parents=True, exist_ok=True)
        yield staging
    os.replace(staging, out)


@contextmanager
def _removed_on_failure(staging: Path, out: Path, remove: Callable[[], None]) -> Iterator[None]:
    """Call `remove` if the block fails; a write that found no room is then a UserError naming the output."""
    try:
        yield
    except BaseException as e:
        remove()
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            raise UserError(_no_room(e.errno, e.filename, staging, out)) from None
        raise


def _no_room(code: int, filename: str | None, staging: Path, out: Path) -> str:
    """The message: which output (the file in a staging folder, named as it will be), why, what to do."""
    written = Path(filename) if filename else staging
    if written.is_relative_to(staging):
        written = out / written.relative_to(staging)
    kept = f" ({out} is as it was)" if out.exists() else " (nothing written)"
    return f"writing {written} failed: {os.strerror(code).lower()}; {NO_ROOM[code]} and run again{kept}"
