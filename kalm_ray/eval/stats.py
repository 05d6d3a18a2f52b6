"""Statistics of evaluation results: pure functions, no Ray, no files.

- :func:`wilson_interval`: a 95% interval for one success rate (binomial, Wilson score).
  Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to
  zero width at 0% or 100%, which matters with the few dozen episodes per task we run.
- :func:`seed_mean_std`: the spread of a success rate across training seeds.
- :func:`paired_difference`: the effect of a data mix measured on the *same* episode
  specs (paired evaluation), with an adjusted-Wald (Agresti-Min) interval over specs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Args:
        successes: number of successful episodes, ``0 <= successes <= n``.
        n: number of episodes; ``n == 0`` gives the uninformative ``(0.0, 1.0)``.
        z: normal quantile (1.96 for 95%).

    Returns:
        ``(low, high)``, both in ``[0, 1]``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def seed_mean_std(rates: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of per-seed success rates.

    One seed gives std 0.0 (no spread can be measured), not NaN, so tables stay readable.
    """
    if not rates:
        raise ValueError("seed_mean_std needs at least one rate")
    arr = np.asarray(rates, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


@dataclass(frozen=True)
class PairedDiff:
    """Success-rate difference ``b - a`` on the same episode specs.

    Attributes:
        diff: mean over specs of the per-spec difference (a rate difference in [-1, 1]).
        low, high: 95% interval of the difference (adjusted Wald, see :func:`paired_difference`).
        n_specs: episode specs compared (the independent units).
        n_pairs: (spec, seed) pairs behind them.
    """

    diff: float
    low: float
    high: float
    n_specs: int
    n_pairs: int


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = Z95) -> PairedDiff:
    """Paired difference of success between two data mixes, over seeds and episode specs.

    Args:
        a, b: ``(n_seeds, n_specs)`` success indicators (0/1) of the baseline and the
            treatment, row ``k`` of both from training seed ``k``, column ``j`` of both
            from the same episode spec ``j`` (same task, wording and start seed).

    Returns:
        :class:`PairedDiff`. Each spec's difference ``d_j`` is first averaged over seeds, so
        the specs (independent draws of task, wording and start state) are the units and
        ``diff = mean(d_j)``. The interval is Agresti & Min's (2005) adjusted Wald interval
        for paired proportions, generalised to seed-averaged ``d_j``: half a pseudo-spec is
        added to each cell of the 2x2 table (weights 0.5 at ``d = +1`` and ``d = -1``, 1 at
        ``d = 0``), then ``mean* ± z * sqrt((E*[d^2] - mean*^2) / (n + 2))``. With one seed
        it is exactly their interval; unlike the plain normal approximation it does not
        collapse to zero width when every spec has the same outcome under both mixes.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"paired_difference needs equal (seeds, specs) shapes, got {a.shape}, {b.shape}"
        )
    n_seeds, n_specs = a.shape
    if n_specs == 0 or n_seeds == 0:
        return PairedDiff(0.0, -1.0, 1.0, 0, 0)
    d = (b - a).mean(axis=0)
    n_adj = n_specs + 2.0
    mean_adj = float(d.sum()) / n_adj  # the pseudo-specs at +1 and -1 cancel
    second = (float(np.sum(d * d)) + 1.0) / n_adj  # 0.5 * (+1)^2 + 0.5 * (-1)^2 = 1
    se = math.sqrt(max(second - mean_adj**2, 0.0) / n_adj)
    return PairedDiff(
        float(d.mean()),
        max(-1.0, mean_adj - z * se),
        min(1.0, mean_adj + z * se),
        n_specs,
        n_seeds * n_specs,
    )
