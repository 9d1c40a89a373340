"""The paper's figures from the cells' metrics (docs/method.md §8).

Fig. 3 (`bounds`): each cell's final lower and upper bounds against its top-1, with Pearson's r and Spearman's ρ
over all cells and per projector family (pipeline.stats: intervals from a bootstrap of the variants, seeds kept
together). Fig. 4 (c)-(e) (`ablations`): top-1 against λ, L and k/d, mean ± std over seeds, beside the baseline and
the untrained encoder, with the best point and whether the curve rises then falls.
"""

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.metrics import Cell, LinearEvalMetrics, PretrainMetrics
from pipeline.params import BASELINE_HEADS, UNTRAINED, Params, VariantParams
from pipeline.plots import ablation_curves, bounds_scatter
from pipeline.stats import Coefficient, Gain, Summary, correlations, paired_gain, summarize

BOUNDS = {"lower_bound": "lower bound I(Z1;R) − I(Z1;Z2)", "upper_bound": "upper bound H(Z1) − I(Z1;Z2)"}
ACCURACIES = {"top1": "top-1, the paper's protocol", "probe_top1": "frozen probe top-1", "knn_top1": "kNN top-1"}
KNOBS = {"mi_weight": "λ (mi_weight)", "levels": "L (levels)", "sae_sparsity": "k / d (sae_topk / sae_latent_dim)"}
MIN_VARIANTS = 3  # a family's coefficients need this many variants (a bootstrap of fewer says nothing)


@dataclass(frozen=True)
class Figure:
    name: str  # a key of `figures`: bounds (Fig. 3) or ablations (Fig. 4)
    dataset: str
    method: str
    seeds: tuple[int, ...]
    variants: dict[str, VariantParams]  # every variant it plots (ablations: and the baseline, its level)

    def cells(self) -> list[Cell]:
        return [(self.dataset, self.method, v, s) for v, s in itertools.product(self.variants, self.seeds)]


def figures_of(params: Params) -> list[Figure]:
    """The figures that have points. Fig. 3 plots the table's variants of its setting, its points, and Fig. 4's
    when both figures share dataset, method and seeds; Fig. 4 the baseline and the variants that switch on one
    knob alone: the table's and its points."""
    figures, experiment, ablations = [], params.experiment, params.figures.ablations
    for name, spec in params.figures:
        if not spec.points:
            continue
        defined = getattr(getattr(params.pretrain, spec.dataset), spec.method).variants
        names = [*experiment.variants, *spec.points]
        same_setting = (ablations.dataset, ablations.method, ablations.seeds) == (spec.dataset, spec.method, spec.seeds)
        if name == "bounds" and same_setting:
            names += ablations.points
        if name == "ablations":
            names = [n for n in names if n == "baseline" or defined[n].ablated()]
        figures.append(Figure(name, spec.dataset, spec.method, tuple(spec.seeds), {n: defined[n] for n in names}))
    return figures


def family(knobs: VariantParams, method: str) -> str:
    """A projector's family for Fig. 3: its head's kind (docs/method.md 3.5-3.6), quantized or not."""
    layers = BASELINE_HEADS[method][0] if knobs.projector_layers is None else knobs.projector_layers
    head = (
        "none" if layers == 0 else "sparse autoencoder" if knobs.sae_latent_dim else "linear" if layers == 1 else "MLP"
    )
    return head + (", quantized" if knobs.levels else "")


def bounds_figure(
    figure: Figure, pretrained: dict[Cell, PretrainMetrics], evaluated: dict[Cell, LinearEvalMetrics]
) -> dict:
    """Fig. 3's points (a cell each) and coefficients: every bound × accuracy, over all cells and per family
    with at least MIN_VARIANTS variants."""
    points: list[dict[str, Any]] = [
        {"variant": c[2], "family": family(figure.variants[c[2]], figure.method), "seed": c[3]}
        | {bound: getattr(pretrained[c], bound) for bound in BOUNDS}
        | {accuracy: 100 * getattr(evaluated[c], accuracy) for accuracy in ACCURACIES}
        for c in figure.cells()
    ]
    rows = []
    for bound, accuracy, group in itertools.product(
        BOUNDS, ACCURACIES, ["all", *sorted({p["family"] for p in points})]
    ):
        chosen = [p for p in points if group in ("all", p["family"])]
        variants = len({p["variant"] for p in chosen})
        if variants < MIN_VARIANTS and group != "all":
            continue
        pearson, spearman = correlations(
            [p[accuracy] for p in chosen], [p[bound] for p in chosen], [p["variant"] for p in chosen]
        )
        rows.append(
            {"bound": bound, "accuracy": accuracy, "family": group, "variants": variants, "cells": len(chosen)}
            | {f"pearson{end}": getattr(pearson, field) for end, field in _ENDS}
            | {f"spearman{end}": getattr(spearman, field) for end, field in _ENDS}
            | {"pearson_reading": pearson.reading(), "spearman_reading": spearman.reading()}
        )
    return _setting(figure) | {"points": points, "correlations": rows}


_ENDS = (("", "value"), ("_low", "low"), ("_high", "high"))


def ablations_figure(figure: Figure, evaluated: dict[Cell, LinearEvalMetrics]) -> dict:
    """Fig. 4's curves, one per knob and accuracy: each point's mean ± std over seeds, the baseline's and the
    untrained encoder's levels, the best point and the curve's shape (`curve_shape`)."""

    def by_seed(variant: str, metric: str) -> dict[int, float]:
        return {s: 100 * getattr(evaluated[figure.dataset, figure.method, variant, s], metric) for s in figure.seeds}

    curves = []
    for knob, metric in itertools.product(KNOBS, ACCURACIES):
        members = sorted((k[1], v) for v, knobs in figure.variants.items() if (k := knobs.ablated()) and k[0] == knob)
        if not members:
            continue
        values = {v: by_seed(v, metric) for _, v in members}
        points = [{"variant": v, "value": x} | _summary(list(values[v].values())) for x, v in members]
        levels = {level: _summary(list(by_seed(level, metric).values())) for level in ("baseline", UNTRAINED)}
        curves.append({"knob": knob, "metric": metric, "points": points} | levels | curve_shape(members, values))
    return _setting(figure) | {"curves": curves}


def curve_shape(members: list[tuple[float, str]], values: dict[str, dict[int, float]]) -> dict:
    """The best point (highest mean) and whether the curve rises then falls: the best value lies strictly between
    the lowest and the highest, and beats both ends (gains paired by seed, 95% Student t intervals). The best
    point is picked on the same seeds, so its gains lean optimistic."""
    means = [float(np.mean(list(values[v].values()))) for _, v in members]
    best = int(np.argmax(means))
    shape: dict = {"best": members[best][1], "best_value": members[best][0]}
    shape |= {"gain_over_low_end": None, "gain_over_high_end": None}
    if len(members) < 3:
        return shape | _reading("too few values", f"too few values for a shape ({len(members)}; 3 needed)")
    if best in (0, len(members) - 1):
        end = "lowest" if best == 0 else "highest"
        return shape | _reading(f"best at the {end} value", f"no rise then fall: the best is the {end} value")
    gains = [paired_gain(values[members[best][1]], values[members[end][1]]) for end in (0, -1)]
    shape |= {"gain_over_low_end": _gain(gains[0]), "gain_over_high_end": _gain(gains[1])}
    if any(g.low is None for g in gains):
        return shape | _reading("peak inside, one seed", "peaks inside the range (one seed: no interval)")
    if all(g.low is not None and g.low > 0 for g in gains):
        return shape | _reading("rises then falls", "rises then falls (the best beats both ends)")
    return shape | _reading(
        "peak inside, within noise",
        "peaks inside the range, but not clearly above both ends (an interval spans zero)",
    )


def _reading(shape: str, reading: str) -> dict:
    """`shape`: a few words for the plot; `reading`: the sentence for results.md."""
    return {"shape": shape, "reading": reading}


def _gain(gain: Gain) -> dict:
    return {"mean": gain.mean, "low": gain.low, "high": gain.high, "n": gain.n}


def _summary(values: list[float]) -> dict:
    summary = summarize(values)
    return {"mean": summary.mean, "std": summary.std, "n": summary.n}


def _setting(figure: Figure) -> dict:
    return {"dataset": figure.dataset, "method": figure.method, "seeds": list(figure.seeds)}


def draw_figures(
    figures: list[Figure], pretrained: dict[Cell, PretrainMetrics], evaluated: dict[Cell, LinearEvalMetrics]
) -> dict:
    """Each figure's data, by name (results.json's `figures`)."""
    return {
        f.name: bounds_figure(f, pretrained, evaluated) if f.name == "bounds" else ablations_figure(f, evaluated)
        for f in figures
    }


POINT_COLUMNS = ["variant", "family", "seed", *BOUNDS, *ACCURACIES]  # fig3-bounds.csv
CURVE_COLUMNS = ["variant", "value", "log10_value", *(f"{a}_{k}" for a in ACCURACIES for k in ("mean", "std")), "n"]


def write_figures(drawn: dict, folder: Path) -> None:
    """Fig. 3: fig3-bounds.csv (a row per cell), fig3-correlations.csv, fig3-bounds.png; Fig. 4: fig4-<knob>.csv (a
    row per point: means and stds of each accuracy; log10_value for DVC's linear plot) and fig4-ablations.png.
    The CSVs that dvc.yaml plots are always written, with their header alone where a figure or knob has no
    points, so that `dvc plots show` draws them empty rather than failing to load them."""
    bounds, ablations = drawn.get("bounds"), drawn.get("ablations")
    _write_csv(folder / "fig3-bounds.csv", bounds["points"] if bounds else [], POINT_COLUMNS)
    if bounds:
        _write_csv(folder / "fig3-correlations.csv", bounds["correlations"], list(bounds["correlations"][0]))
        bounds_scatter(bounds, BOUNDS, ACCURACIES, folder / "fig3-bounds.png")
    for knob in KNOBS:
        curves = [c for c in ablations["curves"] if c["knob"] == knob] if ablations else []
        rows = [
            {"variant": p["variant"], "value": p["value"], "log10_value": math.log10(p["value"])}
            | {f"{c['metric']}_{k}": c["points"][i][k] for c in curves for k in ("mean", "std")}
            | {"n": p["n"]}
            for i, p in enumerate(curves[0]["points"] if curves else [])
        ]
        _write_csv(folder / f"fig4-{knob}.csv", rows, CURVE_COLUMNS)
    if ablations:
        ablation_curves(ablations, KNOBS, ACCURACIES, folder / "fig4-ablations.png")


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def figures_markdown(figures: dict) -> str:
    """The figures' section of results.md: Fig. 3's coefficients and points, Fig. 4's curves and their shapes."""
    lines = []
    if "bounds" in figures:
        lines += _bounds_markdown(figures["bounds"])
    if "ablations" in figures:
        lines += _ablations_markdown(figures["ablations"])
    return "\n".join(lines) + "\n"


def _bounds_markdown(bounds: dict) -> list[str]:
    variants = list(dict.fromkeys(p["variant"] for p in bounds["points"]))
    lines = [
        f"## Fig. 3: final bounds against top-1 ({bounds['dataset']}, {bounds['method']}, seeds "
        f"{', '.join(map(str, bounds['seeds']))})",
        "",
        f"One point per cell: {len(variants)} variants × {len(bounds['seeds'])} seeds, bounds from the last epoch "
        "(nats). Coefficients over the cells; 95% intervals: percentiles of 2,000 bootstrap resamples of the "
        "variants (drawn with replacement, each bringing all its seeds). Families with fewer than "
        f"{MIN_VARIANTS} variants have no row of their own.",
        "",
        "| bound | accuracy | family | variants | cells | Pearson r [95%] | Spearman ρ [95%] | reading (Spearman) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in bounds["correlations"]:
        pearson, spearman = (Coefficient(r[k], r[f"{k}_low"], r[f"{k}_high"]) for k in ("pearson", "spearman"))
        lines.append(
            f"| {r['bound'].replace('_', ' ')} | {ACCURACIES[r['accuracy']]} | {r['family']} | {r['variants']} | "
            f"{r['cells']} | {pearson.text()} | {spearman.text()} | {r['spearman_reading']} |"
        )
    lines += ["", "| variant | family | lower bound | upper bound | " + " | ".join(ACCURACIES.values()) + " |"]
    lines.append("|---|---|---|---|" + "---|" * len(ACCURACIES))
    for variant in variants:
        cells = [p for p in bounds["points"] if p["variant"] == variant]
        means = [summarize([c[key] for c in cells]).text() for key in (*BOUNDS, *ACCURACIES)]
        lines.append(f"| {variant} | {cells[0]['family']} | " + " | ".join(means) + " |")
    return lines + [""]


def _ablations_markdown(ablations: dict) -> list[str]:
    lines = [
        f"## Fig. 4 (c)-(e): top-1 against λ, L and k/d ({ablations['dataset']}, {ablations['method']}, seeds "
        f"{', '.join(map(str, ablations['seeds']))})",
        "",
        "Mean ± std over seeds (%). The best point's gains over the curve's ends are paired by seed (95% Student t "
        "intervals); it is picked on the same seeds, so they lean optimistic.",
    ]
    for knob, label in KNOBS.items():
        curves = {c["metric"]: c for c in ablations["curves"] if c["knob"] == knob}
        if not curves:
            continue
        first = next(iter(curves.values()))
        lines += ["", f"### {label}", "", "| value | variant | " + " | ".join(ACCURACIES.values()) + " |"]
        lines.append("|---|---|" + "---|" * len(ACCURACIES))
        for i, point in enumerate(first["points"]):
            row = [_text(curves[m]["points"][i]) for m in ACCURACIES]
            lines.append(f"| {point['value']:g} | {point['variant']} | " + " | ".join(row) + " |")
        for level in ("baseline", UNTRAINED):
            lines.append(f"| — | {level} | " + " | ".join(_text(curves[m][level]) for m in ACCURACIES) + " |")
        lines.append("")
        for metric, curve in curves.items():
            gains = [curve[f"gain_over_{end}_end"] for end in ("low", "high")]
            over = ", ".join(
                f"{Gain(g['mean'], g['low'], g['high'], g['n']).text()} over the {end} end"
                for g, end in zip(gains, ("low", "high"))
                if g
            )
            lines.append(
                f"- {ACCURACIES[metric]}: best at {curve['best_value']:g} ({curve['best']}); {curve['reading']}"
                + (f"; gain {over}" if over else "")
            )
    return lines + [""]


def _text(summary: dict) -> str:
    return Summary(summary["mean"], summary["std"], summary["n"]).text()
