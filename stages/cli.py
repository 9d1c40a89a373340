"""The one command-line app: `python -m stages COMMAND --help`."""

import inspect
from collections.abc import Callable
from typing import Annotated

import typer
from typer._click.core import Context  # the type Typer's commands take (typer.Context derives from it)
from typer.core import TyperCommand, TyperGroup, TyperOption

from pipeline.params import load_params
from stages.bench import bench
from stages.common import PARAMS_FILE, ParamsFile, set_debug, stage
from stages.data import convert, prepare
from stages.export import export
from stages.launch import launch
from stages.linear_eval import linear_eval_command
from stages.pretrain import pretrain_command
from stages.report import audit, compare, report


def _without_flag_types(params: list) -> list:
    """Typer 0.29's rich help prints a type after every flag (`--help <bool>`, as if it took a value; its plain
    help does not): a flag's empty metavar is printed instead."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
    return params


class Group(TyperGroup):
    def get_params(self, ctx: Context) -> list:
        return _without_flag_types(super().get_params(ctx))


class Command(TyperCommand):
    def get_params(self, ctx: Context) -> list:
        return _without_flag_types(super().get_params(ctx))


app = typer.Typer(
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Reproduce 'Projection Head is Secretly an Information Bottleneck'. Stages run from dvc.yaml.",
)


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show a traceback for input errors too (put it before the command).")
    ] = False,
) -> None:
    """Options for every command."""
    set_debug(debug)


def check_params(params_file: ParamsFile = PARAMS_FILE) -> None:
    """Validate the whole params file; exit 2 naming every problem. Warn of datasets in `experiment` that
    cannot be prepared as configured (an image tree whose root is not set)."""
    from pipeline.datasets import unpreparable

    params = load_params(params_file)
    typer.echo(f"{params_file}: OK ({', '.join(params.experiment.datasets)})")
    for problem in unpreparable(params):
        typer.echo(f"warning: {problem}", err=True)


def add_command(function: Callable, name: str | None = None) -> None:
    """`function` as a command, listed in the app's help by its docstring's first paragraph on one line (Typer's
    rich help keeps the docstring's line breaks there)."""
    summary = " ".join(inspect.cleandoc(function.__doc__ or "").split("\n\n")[0].split())
    app.command(name, cls=Command, short_help=summary)(stage(function))


for command in (check_params, prepare, convert, bench, report, audit, compare, launch, export):
    add_command(command)
add_command(pretrain_command, "pretrain")
add_command(linear_eval_command, "linear-eval")
