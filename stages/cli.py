"""The one command-line app: `python -m stages COMMAND --help`."""

from typing import Annotated

import typer

from pipeline.params import load_params
from stages.bench import bench
from stages.common import PARAMS_FILE, ParamsFile, set_debug, stage
from stages.data import convert, prepare
from stages.launch import launch
from stages.linear_eval import linear_eval_command
from stages.pretrain import pretrain_command
from stages.report import audit, compare, report

app = typer.Typer(
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


for command in (check_params, prepare, convert, bench, report, audit, compare, launch):
    app.command()(stage(command))
app.command("pretrain")(stage(pretrain_command))
app.command("linear-eval")(stage(linear_eval_command))
