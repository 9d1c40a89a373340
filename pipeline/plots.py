"""The report's figures, sized to be read at 100% on a laptop screen (at most about 1400 px wide): training curves
per setting (the paper's Fig. 2/5), gains with intervals, and the paper's Fig. 3 and Fig. 4 (c)-(e)."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.metrics import EpochLog  # noqa: E402

CURVES = (
    ("mi_z1_z2", "I(Z1;Z2)", "nats"),
    ("lower_bound", "lower bound I(Z1;R) − I(Z1;Z2)", "nats"),
    ("upper_bound", "upper bound H(Z1) − I(Z1;Z2)", "nats"),
    ("ssl_loss", "SSL loss", "loss"),
    ("online_test_acc", "online linear top-1 (test split)", "%"),
    ("mi_grad_ratio", "MI gradient ratio ‖λ∂I/∂h‖ / ‖∂L/∂h‖", "ratio (log scale)"),
)  # log.csv columns, panel titles, y labels
PERCENT = {"online_test_acc"}  # fractions in log.csv, shown in %
plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "figure.titlesize": 12})


def training_curves(runs: dict[str, Sequence[Sequence[EpochLog]]], title: str, path: Path) -> None:
    """`runs[variant]`: each seed's log -> a panel per quantity: the mean over seeds, and a band of ± 1 std."""
    seeds = min(len(logs) for logs in runs.values())
    figure, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for axis, (key, label, unit) in zip(axes.flat, CURVES):
        for variant, logs in runs.items():
            epochs = min(len(log) for log in logs)
            values = np.array([[getattr(row, key) for row in log[:epochs]] for log in logs])
            values *= 100 if key in PERCENT else 1
            mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(logs) > 1 else None
            x = np.arange(1, epochs + 1)
            (line,) = axis.plot(x, mean, label=variant)
            if std is not None:
                axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        if key == "mi_grad_ratio" and any(getattr(r, key) > 0 for logs in runs.values() for log in logs for r in log):
            axis.set_yscale("log")
        axis.set(title=label, xlabel="epoch", ylabel=unit)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes.flat[0].legend(title="variant")
    band = "; band: ± 1 std over seeds" if seeds > 1 else " (one seed: no band)"
    figure.suptitle(f"Training curves, {title}: mean over {seeds} seed{'s' if seeds > 1 else ''}{band}")
    _save(figure, path)


def gains_chart(rows: list[dict], path: Path) -> None:
    """Linear top-1 gain over the baseline per setting and variant, with 95% intervals where n > 1."""
    gains = [r for r in rows if r["metric"] == "top1" and "gain" in r]
    figure, axis = plt.subplots(figsize=(min(14.0, max(7.0, 0.9 * len(gains) + 2)), 4.5), constrained_layout=True)
    positions = range(len(gains))
    errors = [
        [r["gain"] - r["gain_low"] if r["gain_low"] is not None else 0 for r in gains],
        [r["gain_high"] - r["gain"] if r["gain_high"] is not None else 0 for r in gains],
    ]
    axis.bar(positions, [r["gain"] for r in gains], width=0.6, color="tab:blue")
    axis.errorbar(positions, [r["gain"] for r in gains], yerr=errors, fmt="none", ecolor="black", capsize=4)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(list(positions), [f"{r['dataset']}\n{r['method']}\n{r['variant']}" for r in gains], fontsize=8)
    axis.set_ylabel("gain in top-1 (points)")
    axis.set_title(
        "Gain of each variant over its baseline, linear top-1 (the paper's protocol)\n"
        "bars: mean over seeds; whiskers: 95% interval of the gain, paired by seed (Student t)"
    )
    axis.grid(axis="y", alpha=0.3)
    _save(figure, path)


def bounds_scatter(bounds: dict, labels: dict[str, str], accuracies: dict[str, str], path: Path) -> None:
    """Fig. 3: a panel per bound and accuracy, a point per cell coloured by projector family, the coefficients
    over all cells in the panel's title."""
    families = sorted({p["family"] for p in bounds["points"]})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    figure, axes = plt.subplots(len(labels), len(accuracies), figsize=(14, 8.5), constrained_layout=True, squeeze=False)
    for row, (bound, bound_label) in zip(axes, labels.items()):
        for axis, (accuracy, accuracy_label) in zip(row, accuracies.items()):
            for family in families:
                points = [p for p in bounds["points"] if p["family"] == family]
                axis.scatter([p[accuracy] for p in points], [p[bound] for p in points], color=colours[family], s=22)
            r = next(
                c
                for c in bounds["correlations"]
                if (c["bound"], c["accuracy"], c["family"]) == (bound, accuracy, "all")
            )
            axis.set_title(f"Pearson r {_coefficient(r, 'pearson')}\nSpearman ρ {_coefficient(r, 'spearman')}")
            axis.set(xlabel=f"{accuracy_label} (%)", ylabel=f"{bound_label} (nats)")
            axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[f], label=f) for f in families]
    figure.legend(handles=handles, title="projector family", loc="outside lower center", ncols=len(families))
    variants = len({p["variant"] for p in bounds["points"]})
    figure.suptitle(
        f"Fig. 3: final bounds against top-1, {bounds['dataset']} {bounds['method']}, a point per cell "
        f"({variants} variants × {len(bounds['seeds'])} seeds)\n[95% interval]: bootstrap over the variants, "
        "each with all its seeds"
    )
    _save(figure, path)


def _coefficient(row: dict, name: str) -> str:
    if row[name] is None:
        return "undefined"
    interval = f" [{row[f'{name}_low']:+.2f}, {row[f'{name}_high']:+.2f}]" if row[f"{name}_low"] is not None else ""
    return f"{row[name]:+.2f}{interval}"


def ablation_curves(ablations: dict, knobs: dict[str, str], accuracies: dict[str, str], path: Path) -> None:
    """Fig. 4 (c)-(e): a column per knob, a row per accuracy; mean ± std over seeds against the knob's value
    (log scale), the baseline (± std) and the untrained encoder as levels, the best point starred."""
    present = [k for k in knobs if any(c["knob"] == k for c in ablations["curves"])]
    figure, axes = plt.subplots(
        len(accuracies),
        len(present),
        figsize=(4.6 * len(present), 3.3 * len(accuracies)),
        constrained_layout=True,
        squeeze=False,
    )
    seeds = len(ablations["seeds"])
    for column, knob in enumerate(present):
        for row, (metric, metric_label) in enumerate(accuracies.items()):
            curve = next(c for c in ablations["curves"] if (c["knob"], c["metric"]) == (knob, metric))
            _ablation_panel(axes[row][column], curve, seeds)
            axes[row][column].set(xlabel=knobs[knob], ylabel=f"{metric_label} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    figure.suptitle(
        f"Fig. 4 (c)-(e): top-1 against each knob, {ablations['dataset']} {ablations['method']}, mean ± std over "
        f"{seeds} seed{'s' if seeds > 1 else ''}"
    )
    _save(figure, path)


def _ablation_panel(axis, curve: dict, seeds: int) -> None:
    x = [p["value"] for p in curve["points"]]
    mean = np.array([p["mean"] for p in curve["points"]])
    std = [p["std"] or 0.0 for p in curve["points"]]
    axis.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"mean ± std over {seeds} seeds")
    base, untrained = curve["baseline"], curve["untrained"]
    axis.axhline(base["mean"], color="tab:green", label="baseline (band: ± 1 std)")
    if base["std"]:
        axis.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="tab:green", alpha=0.12)
    axis.axhline(untrained["mean"], color="tab:red", linestyle=":", label="untrained encoder")
    axis.plot([curve["best_value"]], [mean[x.index(curve["best_value"])]], "k*", markersize=12, label="best point")
    axis.set_xscale("log")
    axis.set_title(curve["shape"])
    axis.grid(alpha=0.3)


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: identical bytes on reruns
    plt.close(figure)
