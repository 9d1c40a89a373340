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

from pipeline.atomic import check_output
from pipeline.errors import UserError
from pipeline.metrics import DatasetMetrics, LinearEvalMetrics, PretrainMetrics, read
from pipeline.params import Strict, load_params
from stages.common import PARAMS_FILE, ParamsFile

if TYPE_CHECKING:
    from pipeline.report import Cell  # imported where it runs: it loads scipy and matplotlib

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
    pretrain_metrics: Annotated[
        Path, typer.Option(help="Folder of pretrain's metrics JSON files, one per cell (final losses, bounds, ratio).")
    ],
    linear_metrics: Annotated[
        Path, typer.Option(help="Folder of linear-eval's metrics JSON files of the pretrained cells (accuracies).")
    ],
    untrained_metrics: Annotated[
        Path,
        typer.Option(
            help="Folder of linear-eval's metrics JSON files of the untrained encoders, one per setting and seed."
        ),
    ],
    provenance: Annotated[
        Path,
        typer.Option(help="Folder of the stages' provenance JSON files (machine, software), listed in the report."),
    ],
    runs: Annotated[
        Path,
        typer.Option(
            help="Folder of the run folders: each cell's <dataset>/<method>/<variant>/seed<s>/log.csv, the curves."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Report folder to write (replaced whole): results.md, .csv, .json and the figures.")
    ],
    reference: Annotated[Path, typer.Option(help="The paper's values (references/paper.yaml).")],
    summary: Annotated[Path, typer.Option(help="JSON of the report's means, stds and gains: DVC's metrics view.")],
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Tables (mean ± std over seeds, the untrained encoder beside them, gains with 95% intervals, the paper's
    values), whether the MI regularizer can act, the figures of `figures`, plots, results.{md,csv,json}."""
    from pipeline.atomic import atomic_file
    from pipeline.figures import figures_of
    from pipeline.report import summary as summarize
    from pipeline.report import write_report

    params = load_params(params_file)
    check_output(out, folder=True)
    check_output(summary)
    tables = write_report(
        params.experiment,
        figures_of(params),
        pretrain_metrics,
        linear_metrics,
        untrained_metrics,
        provenance,
        run_logs(runs),
        reference,
        out,
    )
    with atomic_file(summary) as staging:
        staging.write_text(json.dumps(summarize(tables), indent=2) + "\n")


def audit(
    metrics: Annotated[
        Path, typer.Option(help="Folder of every stage's metrics: datasets/, pretrain/, linear_eval/, untrained/.")
    ] = Path("metrics"),
    provenance: Annotated[
        Path, typer.Option(help="Folder of the stages' provenance JSON files, which the report lists.")
    ] = Path("provenance"),
    reports: Annotated[Path, typer.Option(help="The report folder to check, as `report` wrote it.")] = Path("reports"),
    reference: Annotated[Path, typer.Option(help="The paper's values (YAML) the report used.")] = Path(
        "references/paper.yaml"
    ),
    runs: Annotated[
        Path, typer.Option(help="Folder of the run folders, whose log.csv files the report's curves come from.")
    ] = Path("runs"),
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
            provenance,
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
    reference: Annotated[Path, typer.Argument(help="The report to agree with, e.g. references/demo.")],
    alpha: Annotated[
        float, typer.Option(help="Chance that a rerun with nothing wrong fails on some row (all rows together).")
    ] = 0.05,
    floor: Annotated[float, typer.Option(help="Smallest allowed difference of a mean, points.")] = 1.0,
) -> None:
    """Check that a report agrees with a reference report on every row (mean over seeds) within the seeds' noise:
    the t interval on the difference of the means, the spread pooled over the variants, at level alpha over all
    rows (pipeline/compare.py)."""
    from pipeline.compare import compare as agreements

    if not 0 < alpha < 1:
        raise UserError(f"--alpha: found {alpha}; must be a probability between 0 and 1")
    if not math.isfinite(floor) or floor < 0:
        raise UserError(f"--floor: found {floor}; must be a number of points >= 0")
    ours, theirs = (_results(folder) for folder in (report, reference))
    missing, compared = agreements(ours[0], theirs[0], alpha, floor)
    if ours[1] != theirs[1]:
        for folder, (_, listed) in ((report, ours), (reference, theirs)):
            typer.echo(f"machines of {folder}:\n  " + "\n  ".join(listed))
    typer.echo("row: report against reference, mean ± std (seeds): difference, allowed difference")
    for a in compared:
        verdict = "" if a.agrees else "  DEPARTS"
        typer.echo(
            f"  {' '.join(a.key)}: {_row_text(a.ours)} against {_row_text(a.theirs)}: "
            f"{a.difference:+.2f}, allowed {a.allowed:.2f}{verdict}"
        )
    departs = [
        f"{' '.join(a.key)}: differs by {a.difference:+.2f}, allowed {a.allowed:.2f}" for a in compared if not a.agrees
    ]
    if missing or departs:
        raise UserError(f"{report} does not agree with {reference}:\n  " + "\n  ".join(missing + departs))
    typer.echo(f"compare: OK ({report} agrees with {reference} on all {len(compared)} rows, alpha {alpha:g})")


def _row_text(row) -> str:
    return f"{row.mean:.2f}" + (f" ± {row.std:.2f}" if row.std is not None else "") + f" (n={row.n})"


def _results(folder: Path) -> tuple[dict, list[str]]:
    """A report's rows (`pipeline.compare.rows`) and the machines it lists."""
    from pipeline.compare import rows
    from pipeline.provenance import Machine

    path = folder / "results.json"
    if not path.is_file():
        raise UserError(f"{path} not found: {folder} is not a report folder")
    try:
        results = json.loads(path.read_text())
        machines = [f"{Machine(**m['machine']).text()}: {m['records']} stage runs" for m in results.get("machines", [])]
        return rows(results), machines or ["not recorded"]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a report's results.json ({type(e).__name__}: {e})") from None
