"""The report's figures: training curves per setting (the paper's Fig. 2/5) and gains with intervals."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (
    ("mi_z1_z2", "I(Z1;Z2)"),
    ("lower_bound", "lower bound I(Z1;R) − I(Z1;Z2)"),
    ("upper_bound", "upper bound H(Z1) − I(Z1;Z2)"),
    ("ssl_loss", "SSL loss"),
    ("online_test_acc", "online test accuracy"),
    ("mi_grad_ratio", "‖λ∂I/∂h‖ / ‖∂L/∂h‖"),
)  # log.csv columns


def training_curves(histories: dict[str, list[dict]], title: str, path: Path) -> None:
    """`histories[variant]`: per-epoch rows (averaged over seeds) -> one panel per quantity."""
    figure, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2), constrained_layout=True)
    for axis, (key, label) in zip(axes, CURVES):
        for variant, rows in histories.items():
            axis.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=variant)
        if key == "mi_grad_ratio" and any(r[key] > 0 for rows in histories.values() for r in rows):
            axis.set_yscale("log")
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    _save(figure, path)


def gains_chart(rows: list[dict], path: Path) -> None:
    """Linear top-1 gain over the baseline per setting and variant, with 95% intervals where n > 1."""
    gains = [r for r in rows if r["metric"] == "top1" and "gain" in r]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(gains) + 2), 3.5), constrained_layout=True)
    positions = range(len(gains))
    errors = [
        [r["gain"] - r["gain_low"] if r["gain_low"] is not None else 0 for r in gains],
        [r["gain_high"] - r["gain"] if r["gain_high"] is not None else 0 for r in gains],
    ]
    axis.bar(positions, [r["gain"] for r in gains], yerr=errors, capsize=3, color="tab:blue")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(list(positions), [f"{r['dataset']}\n{r['method']}\n{r['variant']}" for r in gains], fontsize=7)
    axis.set_ylabel("gain in linear top-1 (points)")
    _save(figure, path)


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: identical bytes on reruns
    plt.close(figure)
