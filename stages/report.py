"""The `report` stage, and the `audit` and `compare` commands."""

import filecmp
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.errors import UserError
from pipeline.metrics import DatasetMetrics, LinearEvalMetrics, PretrainMetrics, read
from pipeline.params import Strict, load_params
from stages.common import PARAMS_FILE, ParamsFile

if TYPE_CHECKING:
    from pipeline.report import Cell  # imported where it runs: it loads scipy and matplotlib

Folder = Annotated[Path, typer.Option(help="A folder (see dvc.yaml).")]
SCHEMAS: dict[str, type[Strict]] = {
    "datasets": DatasetMetrics,
    "pretrain": PretrainMetrics,
    "linear_eval": LinearEvalMetrics,
    "untrained": LinearEvalMetrics,
}


def run_logs(runs: Path) -> Callable[["Cell"], Path]:
    """Where a cell's log.csv is under `runs`: in its run folder, dvc.yaml's pretrain --out."""
    return lambda cell: runs.joinpath(*cell[:3], f"seed{cell[3]}", "log.csv")


def report(
    pretrain_metrics: Folder,
    linear_metrics: Folder,
    untrained_metrics: Folder,
    runs: Folder,
    out: Folder,
    reference: Annotated[Path, typer.Option(help="The paper's values (references/paper.yaml).")],
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Tables (mean ± std over seeds, the untrained encoder beside them, gains with 95% intervals, the paper's
    values), whether the MI regularizer can act, the figures of `figures`, plots, results.{md,csv,json}."""
    from pipeline.figures import figures_of
    from pipeline.report import write_report

    params = load_params(params_file)
    write_report(
        params.experiment,
        figures_of(params),
        pretrain_metrics,
        linear_metrics,
        untrained_metrics,
        run_logs(runs),
        reference,
        out,
    )


def audit(
    metrics: Annotated[Path, typer.Option(help="The metrics folder.")] = Path("metrics"),
    reports: Annotated[Path, typer.Option(help="The report folder.")] = Path("reports"),
    reference: Annotated[Path, typer.Option(help="The paper's values.")] = Path("references/paper.yaml"),
    runs: Annotated[Path, typer.Option(help="The runs folder.")] = Path("runs"),
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Check that the outputs are what the code and params produce: every metrics file matches its
    schema, dvc.lock matches code and params, and the report regenerates identically."""
    from pipeline.figures import figures_of
    from pipeline.report import write_report

    params = load_params(params_file)
    for kind, schema in SCHEMAS.items():
        for path in sorted((metrics / kind).glob("*.json")):
            read(path, schema)
    dry = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--dry", "--allow-missing"], capture_output=True, text=True
    )
    stale = [line for line in dry.stdout.splitlines() if line.startswith("Running stage")]
    if dry.returncode or stale:
        raise UserError(
            "dvc.lock does not match the code and params; `dvc repro` would run:\n  "
            + "\n  ".join(stale or [dry.stderr.strip()])
        )
    with tempfile.TemporaryDirectory() as tmp:
        regenerated = Path(tmp) / "reports"
        write_report(
            params.experiment,
            figures_of(params),
            metrics / "pretrain",
            metrics / "linear_eval",
            metrics / "untrained",
            run_logs(runs),
            reference,
            regenerated,
        )
        differ = sorted(
            {p.name for p in regenerated.iterdir()} ^ {p.name for p in reports.iterdir()}
            | {
                p.name
                for p in regenerated.iterdir()
                if (reports / p.name).exists() and not filecmp.cmp(p, reports / p.name, shallow=False)
            }
        )
    if differ:
        raise UserError(f"{reports} differs from the report regenerated from the metrics: {', '.join(differ)}")
    typer.echo(f"audit: OK (metrics valid, dvc.lock current, {reports} reproduced)")


def compare(
    report: Annotated[Path, typer.Argument(help="A report folder (results.json).")],
    reference: Annotated[Path, typer.Argument(help="The report to match, e.g. references/demo.")],
    tolerance: Annotated[float, typer.Option(help="Largest allowed difference of a mean, points.")] = 5.0,
) -> None:
    """Check that a report has the reference's rows and means (accuracy %) within the tolerance."""
    from pipeline.report import compare as differences

    if not math.isfinite(tolerance) or tolerance < 0:
        raise UserError(f"--tolerance: found {tolerance}; must be a number of points >= 0")
    problems, largest = differences(_means(report), _means(reference), tolerance)
    if problems:
        raise UserError(f"{report} does not match {reference}:\n  " + "\n  ".join(problems))
    typer.echo(
        f"compare: OK ({report} matches {reference} within {tolerance:g} points; largest difference {largest:.2f})"
    )


def _means(folder: Path) -> dict:
    from pipeline.report import means

    path = folder / "results.json"
    if not path.is_file():
        raise UserError(f"{path} not found: {folder} is not a report folder")
    try:
        return means(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a report's results.json ({type(e).__name__}: {e})") from None
