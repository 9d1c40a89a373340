"""What every stage shares: the params option, logging, and turning user errors into exit codes."""

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from pipeline.atomic import NO_ROOM
from pipeline.errors import UserError

ParamsFile = Annotated[Path, typer.Option("--params", help="The params file (validated whole on every start).")]
Dataset = Annotated[str, typer.Option(help="Dataset name: a key of `datasets` in params.yaml.")]
Method = Annotated[str, typer.Option(help="simclr or barlow_twins.")]
Variant = Annotated[str, typer.Option(help="A name under `pretrain.<dataset>.<method>.variants` in params.yaml.")]
Seed = Annotated[int, typer.Option(help="The cell's seed (model, shuffling, augmentation, linear classifier).")]
Data = Annotated[Path, typer.Option(help="Folder with train.beton and test.beton.")]
Metadata = Annotated[Path, typer.Option(help="The dataset's metadata JSON from `convert`.")]
PARAMS_FILE = Path("params.yaml")  # DVC's default params file
INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
_debug = False  # the app's `--debug` (see `set_debug`)


def set_debug(on: bool) -> None:
    """Called by the app's callback at every start: with `--debug`, user errors show their traceback."""
    global _debug
    _debug = on


def stage(fn: Callable) -> Callable:
    """Configure logging, run `fn`, and report a `UserError`, or an OSError about a path (a bad path option,
    a full disk), as one line and its exit code (with the app's `--debug`, as a traceback). Ctrl-C exits 130
    after `fn`'s cleanup has run."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if sys.stderr.isatty():
            handler: logging.Handler = RichHandler(show_path=False)
        else:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _debug:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # a path the OS refused (no such file, not a folder, no room...): name it
            if _debug or not (e.filename or e.errno in NO_ROOM):
                raise
            reason = e.strerror or os.strerror(e.errno or 0)
            typer.echo(f"error: {e.filename}: {reason}" if e.filename else f"error: a write failed: {reason}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if _debug:
                raise
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(INTERRUPTED) from None

    return run
