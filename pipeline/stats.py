"""The statistics of the report: means ± std over seeds, gains paired by seed with Student t intervals, and
correlations with cluster-bootstrap intervals.

Gains are paired by seed (variant and baseline of one seed share data order and initialization):
gain = mean over seeds of (variant − baseline), interval mean ± t(0.975, n−1) · sd / √n.
"""

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from scipy.stats import t as student_t


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
        return "disagrees" if self.high is not None and self.high < 0 else "inconclusive"

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


RESAMPLES = 2000  # cluster-bootstrap draws: the interval ends move by about 0.01 from one draw of them to another
BOOTSTRAP_SEED = 0  # fixed, so that the report regenerates byte for byte


@dataclass(frozen=True)
class Coefficient:
    value: float | None  # None where x or y is constant
    low: float | None  # 95% interval; None with fewer than 3 groups
    high: float | None

    def reading(self) -> str:
        """What the interval says: a sign, or no evidence either way."""
        if self.value is None:
            return "undefined (constant values)"
        if self.low is None or self.high is None:
            return "no interval (fewer than 3 variants)"
        return "positive" if self.low > 0 else "negative" if self.high < 0 else "no evidence of correlation"

    def text(self) -> str:
        if self.value is None:
            return "—"
        return f"{self.value:+.2f}" + (f" [{self.low:+.2f}, {self.high:+.2f}]" if self.low is not None else "")


def correlations(x: list[float], y: list[float], groups: list[str]) -> tuple[Coefficient, Coefficient]:
    """Pearson's r and Spearman's ρ of the points (x, y), each with a 95% percentile interval of a cluster
    bootstrap: RESAMPLES draws of as many groups (variants) as there are, with replacement, each drawn group
    bringing all its points (its seeds together). A draw whose x or y is constant has no coefficient and is
    left out. Every group must have as many points (one per seed)."""
    names = list(dict.fromkeys(groups))
    members = [[i for i, g in enumerate(groups) if g == name] for name in names]
    assert len({len(m) for m in members}) == 1, f"groups of unequal sizes: {[len(m) for m in members]}"
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(names), (RESAMPLES, len(names)))
    cells = np.asarray(members)[draws].reshape(RESAMPLES, -1)  # (RESAMPLES, points)
    ranked = (rankdata(xs[cells], axis=1), rankdata(ys[cells], axis=1))
    resampled = {"pearson": (xs[cells], ys[cells]), "spearman": ranked}
    whole = {"pearson": (xs[None], ys[None]), "spearman": (rankdata(xs)[None], rankdata(ys)[None])}
    pearson, spearman = (_coefficient(_rowwise_r(*whole[k])[0], _rowwise_r(*resampled[k]), len(names)) for k in whole)
    return pearson, spearman


def _coefficient(value: float, resampled: np.ndarray, groups: int) -> Coefficient:
    if np.isnan(value):
        return Coefficient(None, None, None)
    defined = resampled[~np.isnan(resampled)]
    if groups < 3 or len(defined) == 0:
        return Coefficient(float(value), None, None)
    low, high = np.percentile(defined, [2.5, 97.5])
    return Coefficient(float(value), float(low), float(high))


def _rowwise_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair of (rows, n) arrays, in float64; NaN where a row is constant."""
    constant = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))
