"""The paper's table from the metrics files: mean ± std over seeds, gains over the baseline with 95%
intervals, the paper's reference values beside them, and whether each gain agrees with the paper.

Gains are paired by seed (variant and baseline of one seed share data order and initialization):
gain = mean over seeds of (variant − baseline), interval mean ± t(0.975, n−1) · sd / √n.
"""

import csv
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ruamel.yaml import YAML
from scipy.stats import t as student_t

from pipeline.atomic import atomic_dir
from pipeline.metrics import LinearEvalMetrics, PretrainMetrics, collect
from pipeline.params import ExperimentParams
from pipeline.plots import gains_chart, training_curves

Cell = tuple[str, str, str, int]  # dataset, method, variant, seed
METRICS = {"top1": "linear top-1", "knn_top1": "kNN top-1", "online_test_acc": "online linear top-1"}


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float | None  # None with one seed
    n: int

    def text(self) -> str:
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "") + f" (n={self.n})"


@dataclass(frozen=True)
class Gain:
    mean: float
    low: float | None  # 95% interval; None with one seed
    high: float | None
    n: int

    def agreement(self) -> str:
        """With the paper's claim that every modification improves on its baseline."""
        if self.low is None:
            return "same sign, no spread (n=1)" if self.mean > 0 else "opposite sign, no spread (n=1)"
        if self.low > 0:
            return "agrees"
        return "disagrees" if self.high < 0 else "inconclusive"

    def text(self) -> str:
        interval = f" [{self.low:+.2f}, {self.high:+.2f}]" if self.low is not None else ""
        return f"{self.mean:+.2f}{interval}"


def summarize(values: list[float]) -> Summary:
    return Summary(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None, len(values))


def paired_gain(variant: dict[int, float], baseline: dict[int, float]) -> Gain:
    seeds = sorted(set(variant) & set(baseline))
    differences = np.array([variant[s] - baseline[s] for s in seeds])
    mean = float(differences.mean())
    if len(seeds) < 2:
        return Gain(mean, None, None, len(seeds))
    half = float(student_t.ppf(0.975, len(seeds) - 1) * differences.std(ddof=1) / math.sqrt(len(seeds)))
    return Gain(mean, mean - half, mean + half, len(seeds))


def build_tables(values: dict[str, dict[Cell, float]], reference: dict, variants: list[str]) -> dict:
    """`values[metric][cell]` in percent -> one row per (metric, dataset, method, variant)."""
    rows = []
    for metric, by_cell in values.items():
        settings = sorted({(d, m) for d, m, _, _ in by_cell}, key=lambda s: (s[0], s[1]))
        for dataset, method in settings:
            seeds = {v: {s: x for (d, m, vv, s), x in by_cell.items() if (d, m, vv) == (dataset, method, v)}
                     for v in variants}
            for variant in variants:
                summary = summarize(list(seeds[variant].values()))
                row = {"metric": metric, "dataset": dataset, "method": method, "variant": variant,
                       "mean": summary.mean, "std": summary.std, "n": summary.n}
                if variant != "baseline" and seeds.get("baseline"):
                    gain = paired_gain(seeds[variant], seeds["baseline"])
                    row |= {"gain": gain.mean, "gain_low": gain.low, "gain_high": gain.high,
                            "agreement": gain.agreement() if metric == "top1" else None}
                paper = reference.get(dataset, {}).get(method, {}).get(variant, {}) if metric == "top1" else {}
                row |= {"paper_top1": paper.get("top1"), "paper_gain": paper.get("gain")}
                rows.append(row)
    return {"rows": rows}


def markdown(tables: dict, variants: list[str], claim: str) -> str:
    lines = ["# Results", "", f"The paper's claim: {claim}", ""]
    for metric, title in METRICS.items():
        rows = [r for r in tables["rows"] if r["metric"] == metric]
        if not rows:
            continue
        lines += [f"## {title} (%), mean ± std over seeds", "",
                  "| dataset | method | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
        for dataset, method in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
            cells = {r["variant"]: r for r in rows if (r["dataset"], r["method"]) == (dataset, method)}
            lines.append(f"| {dataset} | {method} | " + " | ".join(_cell_text(cells[v]) for v in variants) + " |")
        lines.append("")
    lines += ["## Gains in linear top-1 over the baseline (points), 95% interval paired by seed", "",
              "| dataset | method | variant | gain | paper's gain | agreement with the paper |", "|---|---|---|---|---|---|"]
    for r in tables["rows"]:
        if r["metric"] == "top1" and "gain" in r:
            gain = Gain(r["gain"], r["gain_low"], r["gain_high"], r["n"])
            paper = f"{r['paper_gain']:+.2f}" if r["paper_gain"] is not None else "not available"
            lines.append(f"| {r['dataset']} | {r['method']} | {r['variant']} | {gain.text()} | {paper} | "
                         f"{r['agreement']} |")
    return "\n".join(lines) + "\n"


def _cell_text(row: dict) -> str:
    text = Summary(row["mean"], row["std"], row["n"]).text()
    if row.get("paper_top1") is not None:
        text += f"; paper {row['paper_top1']:.2f}"
    return text


def write_report(experiment: ExperimentParams, pretrain_metrics: Path, linear_metrics: Path, runs: Path,
                 reference: Path, out: Path) -> None:
    """`out/`: results.md, results.csv, results.json, curves-<dataset>-<method>.png, gains.png.

    Run folders follow dvc.yaml's layout `runs/<dataset>/<method>/<variant>/seed<seed>/log.csv`.
    """
    cells = list(itertools.product(experiment.datasets, experiment.methods, experiment.variants, experiment.seeds))
    pretrained = collect(pretrain_metrics, PretrainMetrics, cells)
    evaluated = collect(linear_metrics, LinearEvalMetrics, cells)
    values = {"top1": {c: 100 * evaluated[c].top1 for c in cells},
              "knn_top1": {c: 100 * evaluated[c].knn_top1 for c in cells},
              "online_test_acc": {c: 100 * pretrained[c].online_test_acc for c in cells}}
    paper = YAML(typ="safe", pure=True).load(reference.read_text())
    tables = build_tables(values, paper["cells"], experiment.variants)
    with atomic_dir(out) as staging:
        (staging / "results.json").write_text(json.dumps({"claim": paper["claim"]} | tables, indent=2) + "\n")
        with open(staging / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(tables["rows"])
        (staging / "results.md").write_text(markdown(tables, experiment.variants, paper["claim"]))
        for dataset, method in itertools.product(experiment.datasets, experiment.methods):
            histories = {v: _mean_history([runs / dataset / method / v / f"seed{s}" / "log.csv" for s in experiment.seeds])
                         for v in experiment.variants}
            training_curves(histories, f"{dataset}, {method}", staging / f"curves-{dataset}-{method}.png")
        gains_chart(tables["rows"], staging / "gains.png")


CSV_COLUMNS = ["metric", "dataset", "method", "variant", "mean", "std", "n", "gain", "gain_low", "gain_high",
               "agreement", "paper_top1", "paper_gain"]


def _mean_history(paths: list[Path]) -> list[dict]:
    """Per-epoch rows of log.csv files, averaged over the files (seeds)."""
    runs = [list(csv.DictReader(path.open())) for path in paths]
    return [{key: float(np.mean([float(run[i][key]) for run in runs])) for key in runs[0][i]}
            for i in range(min(len(run) for run in runs))]


def compare(report: dict, reference: dict, tolerance: float) -> tuple[list[str], float]:
    """How `report` (a results.json) departs from `reference`: rows missing either way and means more
    than `tolerance` points apart; and the largest difference of a mean."""
    def rows(results: dict) -> dict[tuple, float]:
        return {(r["metric"], r["dataset"], r["method"], r["variant"]): r["mean"] for r in results["rows"]}
    ours, theirs = rows(report), rows(reference)
    differences = {key: abs(ours[key] - mean) for key, mean in theirs.items() if key in ours}
    problems = [f"{' '.join(key)}: only in the {where}" for keys, other, where in
                ((ours, theirs, "report"), (theirs, ours, "reference")) for key in keys if key not in other]
    problems += [f"{' '.join(key)}: {ours[key]:.2f} against {theirs[key]:.2f} (tolerance {tolerance:g})"
                 for key, difference in differences.items() if difference > tolerance]
    return problems, max(differences.values(), default=0.0)
