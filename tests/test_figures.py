"""The figures' statistics and data against independent computations: scipy's coefficients, a loop-by-loop
cluster bootstrap, paired gains by hand; and which cells each figure plots."""

import numpy as np
import pytest
import scipy.stats

from pipeline.figures import Figure, ablations_figure, bounds_figure, curve_shape, family, figures_of
from pipeline.metrics import LinearEvalMetrics, PretrainMetrics
from pipeline.params import VariantParams
from pipeline.stats import BOOTSTRAP_SEED, RESAMPLES, correlations


def test_figures_of_the_committed_params_plot_the_tables_variants_and_their_points(params):
    bounds, ablations = figures_of(params)
    table = ["baseline", "mi_reg", "discrete", "sae"]
    assert list(bounds.variants) == table + params.figures.bounds.points + params.figures.ablations.points
    assert list(ablations.variants) == table + params.figures.ablations.points  # each table variant: one knob alone
    assert (bounds.dataset, bounds.method, bounds.seeds) == ("cifar10", "simclr", (5, 6, 7))
    assert len(bounds.cells()) == 3 * (4 + 4 + 12)


@pytest.mark.parametrize(
    "knobs, method, expected",
    [
        ({}, "simclr", "MLP"),
        ({"projector_layers": 0}, "barlow_twins", "none"),
        ({"projector_layers": 1, "levels": 3}, "simclr", "linear, quantized"),
        ({"sae_latent_dim": 8, "sae_topk": 2}, "barlow_twins", "sparse autoencoder"),
        ({"mi_weight": 1e-3, "mi_grad_fp32": True, "projector_batch_norm": True}, "simclr", "MLP"),
    ],
)
def test_projector_families(knobs, method, expected):
    assert family(VariantParams(**knobs), method) == expected


def test_cluster_bootstrap_matches_a_loop_over_resamples():
    """The vectorized bootstrap against a plain loop: the same draws of whole variants (all their seeds), scipy's
    coefficients on each, numpy's percentiles. Both are float64 on the same numbers: equal to rounding."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=12)
    y = x + rng.normal(size=12)
    groups = [f"v{i // 3}" for i in range(12)]  # 4 variants × 3 seeds
    pearson, spearman = correlations(list(x), list(y), groups)
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, 4, (RESAMPLES, 4))
    samples = [np.concatenate([np.arange(3 * g, 3 * g + 3) for g in draw]) for draw in draws]
    for coefficient, statistic in ((pearson, scipy.stats.pearsonr), (spearman, scipy.stats.spearmanr)):
        values = [statistic(x[s], y[s]).statistic for s in samples if np.ptp(x[s]) and np.ptp(y[s])]
        assert coefficient.value == pytest.approx(statistic(x, y).statistic, abs=1e-12)
        assert [coefficient.low, coefficient.high] == pytest.approx(np.percentile(values, [2.5, 97.5]), abs=1e-12)
    assert pearson.reading() == ("positive" if pearson.low > 0 else "no evidence of correlation")


def test_coefficients_without_spread_or_without_enough_variants():
    flat, _ = correlations([1.0, 2.0, 3.0, 4.0], [5.0] * 4, ["a", "a", "b", "b"])
    assert flat.value is None and flat.reading() == "undefined (constant values)"
    two, _ = correlations([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0], ["a", "a", "b", "b"])
    assert (
        two.value == pytest.approx(0.8) and two.low is None and two.reading() == "no interval (fewer than 3 variants)"
    )


def cell_metrics(variant: str, seed: int, top1: float, lower: float) -> tuple[PretrainMetrics, LinearEvalMetrics]:
    cell = {"dataset": "synthetic", "method": "simclr", "variant": variant, "seed": seed}
    epoch = {"ssl_loss": 1.0, "mi_z1_z2": 0.1, "mi_z1_r_estimate": lower + 0.1, "entropy_z1": 1.0}
    pretrained = PretrainMetrics(
        **cell, **epoch, epoch=1, online_train_acc=0.5, lower_bound=lower, upper_bound=2 * lower, mi_grad_ratio=0.0,
        online_test_acc=0.5, epochs=1, precision="fp32", mi_weight=0.0,
        mi_grad_fp32=False, mi_grad_ratio_max=0.0,
    )  # fmt: skip
    evaluated = LinearEvalMetrics(
        **cell, pretrained=True, protocol="augmented", epochs=1, top1=top1, top5=1.0, probe_top1=top1 / 2,
        knn_top1=top1, n_train=10, n_test=10,
    )  # fmt: skip
    return pretrained, evaluated


def test_bounds_figure_points_and_families_with_enough_variants():
    variants = {
        "baseline": VariantParams(),
        "mlp3": VariantParams(projector_layers=3),
        "wide": VariantParams(projector_hidden_dim=512),
        "linear": VariantParams(projector_layers=1),
    }
    figure = Figure("bounds", "synthetic", "simclr", (0, 1), variants)
    made = {c: cell_metrics(c[2], c[3], 0.1 * (i + 1), float(i)) for i, c in enumerate(figure.cells())}
    drawn = bounds_figure(figure, {c: m[0] for c, m in made.items()}, {c: m[1] for c, m in made.items()})
    assert [p["top1"] for p in drawn["points"]] == pytest.approx([10 * (i + 1) for i in range(8)])
    assert {(r["family"], r["variants"], r["cells"]) for r in drawn["correlations"]} == {("all", 4, 8), ("MLP", 3, 6)}
    everything = next(r for r in drawn["correlations"] if (r["bound"], r["family"]) == ("lower_bound", "all"))
    assert everything["spearman"] == pytest.approx(1.0) and everything["spearman_reading"] == "positive"


def test_ablation_curve_levels_and_shape():
    variants = {"baseline": VariantParams(), **{f"l{v}": VariantParams(levels=v) for v in (3, 10, 30)}}
    figure = Figure("ablations", "synthetic", "simclr", (0, 1, 2), variants)
    top1 = {"baseline": [0.5, 0.52, 0.54], "l3": [0.4, 0.41, 0.45], "l10": [0.6, 0.62, 0.61], "l30": [0.5, 0.5, 0.52]}
    evaluated = {c: cell_metrics(c[2], c[3], top1[c[2]][c[3]], 0.0)[1] for c in figure.cells()}
    evaluated |= {("synthetic", "simclr", "untrained", s): cell_metrics("untrained", s, 0.1, 0.0)[1] for s in (0, 1, 2)}
    curve = next(c for c in ablations_figure(figure, evaluated)["curves"] if c["metric"] == "top1")
    assert [(p["variant"], p["value"]) for p in curve["points"]] == [("l3", 3.0), ("l10", 10.0), ("l30", 30.0)]
    assert curve["points"][1]["mean"] == pytest.approx(61.0) and curve["points"][1]["std"] == pytest.approx(1.0)
    assert curve["baseline"]["mean"] == pytest.approx(52.0) and curve["untrained"]["mean"] == pytest.approx(10.0)
    # best l10; over l3 the differences are 20, 21, 16: mean 19, sd 2.6458, t(0.975, 2) = 4.3026527
    assert curve["best"] == "l10" and curve["gain_over_low_end"]["mean"] == pytest.approx(19.0)
    assert curve["gain_over_low_end"]["low"] == pytest.approx(19.0 - 4.3026527 * 2.6457513 / 3**0.5)
    assert curve["reading"] == "rises then falls (the best beats both ends)"


@pytest.mark.parametrize(
    "values, reading",
    [
        (
            {"a": {0: 1.0, 1: 2.0}, "b": {0: 3.0, 1: 2.5}, "c": {0: 2.9, 1: 2.4}},
            "peaks inside the range, but not clearly",
        ),
        ({"a": {0: 1.0}, "b": {0: 3.0}, "c": {0: 2.0}}, "peaks inside the range (one seed: no interval)"),
        ({"a": {0: 1.0}, "b": {0: 2.0}, "c": {0: 3.0}}, "no rise then fall: the best is the highest value"),
        ({"a": {0: 1.0}, "b": {0: 2.0}}, "too few values for a shape (2; 3 needed)"),
    ],
)
def test_curve_shape_wording_follows_the_data(values, reading):
    members = [(float(i), name) for i, name in enumerate(values)]
    assert curve_shape(members, values)["reading"].startswith(reading)
