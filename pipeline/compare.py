"""Does a report agree with a reference report (a rerun elsewhere, or the committed demo)? Per row, statistically.

A row is (metric, dataset, method, variant) with the mean, standard deviation and number of seeds of its values.
Two reports agree on a row when their means differ by at most the allowed difference

    allowed = max(floor, t(1 − α / (2R), ν) · √(s₁²/n₁ + s₂²/n₂))

the half-width of Welch's two-sided interval on the difference of the means, ν the Welch–Satterthwaite degrees of
freedom, at the level α / R for R compared rows (Bonferroni): when both reports are draws of the same seeds'
noise, a rerun fails on any row with probability at most α. Floating-point results differ across machines
(kernels, vector width, threads) and training is chaotic, so a seed on another machine is another draw of that
noise: the seeds' own spread is the yardstick. `floor` (points) stands in where the spread is zero or unknown
(a row of one seed, or identical values).
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


def allowed_difference(a: Row, b: Row, quantile: float, floor: float) -> float:
    """Half-width of Welch's interval on a.mean − b.mean at `quantile` (e.g. 0.975 for 95%), at least `floor`."""
    if a.std is None or b.std is None:
        return floor
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    if va + vb == 0:
        return floor
    dof = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    return max(floor, float(student_t.ppf(quantile, dof)) * math.sqrt(va + vb))


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
    quantile = 1 - alpha / (2 * max(len(shared), 1))
    return missing, [
        Agreement(key, ours[key], theirs[key], allowed_difference(ours[key], theirs[key], quantile, floor))
        for key in shared
    ]
