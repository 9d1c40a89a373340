"""The paper's table from the metrics files: mean ± std over seeds, gains over the baseline with 95%
intervals (pipeline.stats), the paper's reference values beside them, and whether each gain agrees with the paper;
and the figures (pipeline.figures).
"""

import csv
import itertools
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.atomic import atomic_dir
from pipeline.errors import UserError
from pipeline.figures import Figure, draw_figures, figures_markdown, write_figures
from pipeline.metrics import COLUMNS, Cell, EpochLog, LinearEvalMetrics, PretrainMetrics, collect, read_log
from pipeline.params import UNIT_ROUNDOFF, UNTRAINED, ExperimentParams
from pipeline.plots import gains_chart, training_curves
from pipeline.provenance import Machine, Provenance, machines
from pipeline.stats import Gain, Summary, paired_gain, summarize

METRICS = {
    "top1": "Linear evaluation top-1, the paper's protocol",
    "probe_top1": "Fast frozen linear probe top-1",
    "knn_top1": "kNN top-1",
    "online_test_acc": "Online linear top-1 (during pretraining)",
}


def build_tables(
    values: dict[str, dict[Cell, float]], reference: dict, variants: list[str], protocols: Mapping[tuple[str, str], str]
) -> dict:
    """`values[metric][cell]` in percent, the untrained encoder's cells under the variant UNTRAINED -> one row
    per (metric, dataset, method, variant), gains over the baseline paired by seed."""
    rows = []
    for metric, by_cell in values.items():
        for dataset, method in sorted({(d, m) for d, m, _, _ in by_cell}):
            seeds = {
                v: {s: x for (d, m, vv, s), x in by_cell.items() if (d, m, vv) == (dataset, method, v)}
                for v in (UNTRAINED, *variants)
            }
            for variant in (UNTRAINED, *variants):
                if not seeds[variant]:
                    continue
                summary = summarize(list(seeds[variant].values()))
                row = {
                    "metric": metric,
                    "dataset": dataset,
                    "method": method,
                    "variant": variant,
                    "protocol": protocols[dataset, method] if metric == "top1" else None,
                    "mean": summary.mean,
                    "std": summary.std,
                    "n": summary.n,
                }
                if variant not in (UNTRAINED, "baseline") and seeds.get("baseline"):
                    gain = paired_gain(seeds[variant], seeds["baseline"])
                    row |= {
                        "gain": gain.mean,
                        "gain_low": gain.low,
                        "gain_high": gain.high,
                        "agreement": gain.agreement() if metric == "top1" else None,
                    }
                paper = reference.get(dataset, {}).get(method, {}).get(variant, {}) if metric == "top1" else {}
                row |= {"paper_top1": paper.get("top1"), "paper_gain": paper.get("gain")}
                rows.append(row)
    return {"rows": rows}


def regularizer_rows(pretrained: dict[Cell, PretrainMetrics]) -> list[dict]:
    """Per setting and variant with the MI regularizer: whether its gradient can reach the weights.

    It cannot when λ·‖∂I/∂h‖ / ‖∂L_ssl/∂h‖ stays below the training precision's unit roundoff and the
    gradients were summed in that precision (no `mi_grad_fp32`): the variant then reruns its baseline."""
    by_setting: dict[tuple, list[PretrainMetrics]] = {}
    for (dataset, method, variant, _), m in pretrained.items():
        if m.mi_weight > 0:
            by_setting.setdefault((dataset, method, variant), []).append(m)
    rows = []
    for (dataset, method, variant), runs in sorted(by_setting.items()):
        ratio, first = max(m.mi_grad_ratio_max for m in runs), runs[0]
        resolution = UNIT_ROUNDOFF[first.precision]
        separate = first.mi_grad_fp32 and first.precision != "fp32"
        verdict = (
            "kept: its gradient is added in fp32"
            if separate
            else "acts"
            if ratio >= resolution
            else f"ROUNDED AWAY in {first.precision}: this variant reruns its baseline; set mi_grad_fp32: true"
        )
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                "variant": variant,
                "mi_weight": first.mi_weight,
                "precision": first.precision,
                "mi_grad_fp32": first.mi_grad_fp32,
                "ratio_max": ratio,
                "resolution": resolution,
                "verdict": verdict,
            }
        )
    return rows


def markdown(tables: dict, variants: list[str], claim: str) -> str:
    lines = [
        "# Results",
        "",
        f"The paper's claim: {claim}",
        "",
        "Every table has the untrained encoder (the initial weights of each seed's pretraining, through the "
        "same evaluation) as the reference level: a variant below it has learned nothing.",
        "",
    ]
    for metric, title in METRICS.items():
        rows = [r for r in tables["rows"] if r["metric"] == metric]
        if not rows:
            continue
        columns = [v for v in (UNTRAINED, *variants) if any(r["variant"] == v for r in rows)]
        protocol = metric == "top1"
        lines += [
            f"## {title} (%), mean ± std over seeds",
            "",
            "| dataset | method | " + ("protocol | " if protocol else "") + " | ".join(columns) + " |",
            "|---|---|" + ("---|" if protocol else "") + "---|" * len(columns),
        ]
        for dataset, method in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
            cells = {r["variant"]: r for r in rows if (r["dataset"], r["method"]) == (dataset, method)}
            first = f"{cells[columns[-1]]['protocol']} | " if protocol else ""
            lines.append(
                f"| {dataset} | {method} | {first}" + " | ".join(_cell_text(cells.get(v)) for v in columns) + " |"
            )
        lines.append("")
    lines += [
        "## Gains in the paper's linear top-1 over the baseline (points), 95% interval paired by seed",
        "",
        "| dataset | method | variant | gain | paper's gain | agreement with the paper |",
        "|---|---|---|---|---|---|",
    ]
    for r in tables["rows"]:
        if r["metric"] == "top1" and "gain" in r:
            gain = Gain(r["gain"], r["gain_low"], r["gain_high"], r["n"])
            paper = f"{r['paper_gain']:+.2f}" if r["paper_gain"] is not None else "not available"
            lines.append(
                f"| {r['dataset']} | {r['method']} | {r['variant']} | {gain.text()} | {paper} | {r['agreement']} |"
            )
    if tables["regularizer"]:
        lines += [
            "",
            "## Can the MI regularizer act? Its gradient against the SSL gradient at h",
            "",
            "| dataset | method | variant | λ | precision | largest ratio | unit roundoff | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['dataset']} | {r['method']} | {r['variant']} | {r['mi_weight']:g} | {r['precision']} | "
            f"{r['ratio_max']:.2e} | {r['resolution']:.1e} | {r['verdict']} |"
            for r in tables["regularizer"]
        ]
    lines += ["", "## Machines the cells ran on (pretraining and evaluations)", ""]
    lines += [f"- {Machine(**m['machine']).text()}: {m['records']} stage runs" for m in tables["machines"]]
    return "\n".join(lines) + "\n"


def _cell_text(row: dict | None) -> str:
    if row is None:
        return "—"
    text = Summary(row["mean"], row["std"], row["n"]).text()
    if row.get("paper_top1") is not None:
        text += f"; paper {row['paper_top1']:.2f}"
    return text


def write_report(
    experiment: ExperimentParams,
    figures: list[Figure],
    pretrain_metrics: Path,
    linear_metrics: Path,
    untrained_metrics: Path,
    provenance: Path,
    run_log: Callable[[Cell], Path],
    reference: Path,
    out: Path,
) -> dict:
    """`out/`: results.md, results.csv, results.json, curves.csv (the table's cells' log.csv files, for DVC's
    plots), curves-<dataset>-<method>.png, gains.png, and each figure's files (pipeline.figures.write_figures).
    Returns the tables (results.json's content, without the figures).

    `provenance/{pretrain,linear_eval,untrained}/` hold the stages' `Provenance` records (the machines).

    `run_log(cell)` is the path of a cell's log.csv (the caller knows the run layout)."""
    paper = read_paper_values(reference)
    settings = list(itertools.product(experiment.datasets, experiment.methods))
    cells = [(d, m, v, s) for (d, m), v, s in itertools.product(settings, experiment.variants, experiment.seeds)]
    untrained = [(d, m, UNTRAINED, s) for (d, m), s in itertools.product(settings, experiment.seeds)]
    every = list(dict.fromkeys(cells + [c for figure in figures for c in figure.cells()]))  # figures: table's too
    pretrained = collect(pretrain_metrics, PretrainMetrics, every)
    evaluated = collect(linear_metrics, LinearEvalMetrics, every) | collect(
        untrained_metrics, LinearEvalMetrics, untrained
    )
    values: dict[str, dict[Cell, float]] = {
        metric: {c: 100 * getattr(evaluated[c], metric) for c in cells + untrained}
        for metric in ("top1", "probe_top1", "knn_top1")
    }
    values["online_test_acc"] = {c: 100 * pretrained[c].online_test_acc for c in cells}
    protocols: dict[tuple[str, str], str] = {(d, m): evaluated[d, m, v, s].protocol for d, m, v, s in cells}
    tables = build_tables(values, paper["cells"], experiment.variants, protocols)
    tables["regularizer"] = regularizer_rows(pretrained)
    drawn = draw_figures(figures, pretrained, evaluated)
    records = [
        record
        for kind, kind_cells in (("pretrain", every), ("linear_eval", every), ("untrained", untrained))
        for record in collect(provenance / kind, Provenance, kind_cells).values()
    ]
    tables["machines"] = machines(records)
    logs: dict[Cell, list[EpochLog]] = {cell: read_log(run_log(cell)) for cell in cells}
    histories = {(d, m, v): [logs[d, m, v, s] for s in experiment.seeds] for d, m, v, _ in cells}
    with atomic_dir(out) as staging:
        results = {"claim": paper["claim"]} | tables | ({"figures": drawn} if drawn else {})
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        with open(staging / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(tables["rows"])
        text = markdown(tables, experiment.variants, paper["claim"])
        (staging / "results.md").write_text(text + ("\n" + figures_markdown(drawn) if drawn else ""))
        _write_curves(logs, staging / "curves.csv")
        for dataset, method in settings:
            training_curves(
                {v: histories[dataset, method, v] for v in experiment.variants},
                f"{dataset}, {method}",
                staging / f"curves-{dataset}-{method}.png",
            )
        gains_chart(tables["rows"], staging / "gains.png")
        write_figures(drawn, staging)
    return tables


def summary(tables: dict) -> dict:
    """The report as DVC shows metrics: `metric.dataset.method.variant` -> mean (and std, gain), numbers only."""
    nested: dict = {}
    for row in tables["rows"]:
        values = {key: row[key] for key in ("mean", "std", "gain") if row.get(key) is not None}
        nested.setdefault(row["metric"], {}).setdefault(row["dataset"], {}).setdefault(row["method"], {})[
            row["variant"]
        ] = values
    return nested


def read_paper_values(path: Path) -> dict:
    """The paper's values for the report (references/paper.yaml: a `claim` and its `cells`); a UserError
    naming the file if it is missing or not such a file."""
    try:
        paper = YAML(typ="safe", pure=True).load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; the paper's values are references/paper.yaml") from None
    except (OSError, UnicodeDecodeError, YAMLError) as e:
        raise UserError(f"{path}: not readable as the paper's values ({' '.join(str(e).split())})") from None
    if not (isinstance(paper, dict) and isinstance(paper.get("claim"), str) and isinstance(paper.get("cells"), dict)):
        raise UserError(f"{path}: not the paper's values (a `claim` and `cells`, as references/paper.yaml holds)")
    return paper


CSV_COLUMNS = [
    "metric",
    "dataset",
    "method",
    "variant",
    "protocol",
    "mean",
    "std",
    "n",
    "gain",
    "gain_low",
    "gain_high",
    "agreement",
    "paper_top1",
    "paper_gain",
]


def _write_curves(logs: dict[Cell, list[EpochLog]], path: Path) -> None:
    """Every cell's log in one long table (a row per cell and epoch): dvc.yaml's plots draw a line per cell."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", *COLUMNS])
        for (dataset, method, variant, seed), log in logs.items():
            cell = f"{dataset}-{method}-{variant}-seed{seed}"
            writer.writerows([cell, *(f"{getattr(row, c):.6g}" for c in COLUMNS)] for row in log)
