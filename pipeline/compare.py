"""Does a report agree with a reference report (a rerun elsewhere, or the committed demo)? Per row, statistically.

A row is (metric, dataset, method, variant) with the mean, standard deviation and number of seeds of its values.
Two reports agree on a row when their means differ by at most the allowed difference

    allowed = max(floor, t(1 − α / (2R), ν) · s · √(1/n₁ + 1/n₂))

the half-width of the two-sample t interval on the difference of the means, at the level α / R for R compared
rows (Bonferroni): when both reports are draws of the same seeds' noise, a rerun fails on some row with probability
at most α. s is the seeds' standard deviation pooled over the rows of the row's group (its metric, dataset and
method, every variant, both reports), ν = Σ(nᵢ − 1) its degrees of freedom: the variants share one source of
noise (the seed's draw of initialization, data order and augmentations, and the machine's rounding, which
training amplifies), and three seeds alone estimate a spread too poorly (ν = 4) for the interval to catch anything.
`floor` (points) stands in where the group has no spread (one seed, or identical values).
"""

import math
from dataclasses import dataclass

from scipy.stats import t as student_t

Key = tuple[str, str, str, str]  # metric, dataset, method, variant


@dataclass(frozen=True)
class Row:
    mean: float
    std: float | None  # None with one seed
    n: int


@dataclass(frozen=True)
class Agreement:
    key: Key
    ours: Row
    theirs: Row
    allowed: float

    @property
    def difference(self) -> float:
        return self.ours.mean - self.theirs.mean

    @property
    def agrees(self) -> bool:
        return abs(self.difference) <= self.allowed


def rows(results: dict) -> dict[Key, Row]:
    """The rows of a report's results.json."""
    return {
        (r["metric"], r["dataset"], r["method"], r["variant"]): Row(
            float(r["mean"]), None if r["std"] is None else float(r["std"]), int(r["n"])
        )
        for r in results["rows"]
    }


def pooled_spread(rows: list[Row]) -> tuple[float, int]:
    """Standard deviation pooled over `rows` (those with a spread), and its degrees of freedom."""
    spread = [r for r in rows if r.std is not None and r.n > 1]
    dof = sum(r.n - 1 for r in spread)
    return (math.sqrt(sum((r.n - 1) * r.std**2 for r in spread if r.std is not None) / dof) if dof else 0.0), dof


def allowed_difference(a: Row, b: Row, spread: tuple[float, int], quantile: float, floor: float) -> float:
    """Half-width of the t interval on a.mean − b.mean at `quantile` (e.g. 0.975 for 95%) with the pooled
    `spread` (std, degrees of freedom), at least `floor`."""
    std, dof = spread
    if dof == 0 or std == 0:
        return floor
    return max(floor, float(student_t.ppf(quantile, dof)) * std * math.sqrt(1 / a.n + 1 / b.n))


def compare(
    ours: dict[Key, Row], theirs: dict[Key, Row], alpha: float, floor: float
) -> tuple[list[str], list[Agreement]]:
    """Rows found in one report only, and every shared row's difference against its allowed difference."""
    missing = [
        f"{' '.join(key)}: only in the {where}"
        for keys, other, where in ((ours, theirs, "report"), (theirs, ours, "reference"))
        for key in keys
        if key not in other
    ]
    shared = [key for key in theirs if key in ours]
    groups = {key[:3] for key in shared}
    spreads = {g: pooled_spread([r[k] for r in (ours, theirs) for k in shared if k[:3] == g]) for g in groups}
    quantile = 1 - alpha / (2 * max(len(shared), 1))
    return missing, [
        Agreement(
            key, ours[key], theirs[key], allowed_difference(ours[key], theirs[key], spreads[key[:3]], quantile, floor)
        )
        for key in shared
    ]
