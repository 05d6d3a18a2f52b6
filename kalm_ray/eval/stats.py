"""Statistics of evaluation results: pure functions, no Ray, no files.

- :func:`wilson_interval`: a 95% interval for one success rate (binomial, Wilson score).
  Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to
  zero width at 0% or 100%, which matters with the few dozen episodes per task we run.
- :func:`seed_mean_std`: the spread of a success rate across training seeds.
- :func:`seed_task_interval`: a 95% interval for one policy's success rate over several
  training seeds and several tasks, with seeds and tasks as random effects.
- :func:`paired_difference`: the effect of a data mix measured on the *same* episode
  specs (paired evaluation), with the same seed-and-task random-effects interval.
- :func:`replicate_interval`: an estimate over independent runs of the whole pipeline
  (``kalm compare``), the runs as the only units.

Why random effects: a training seed is one draw of the policy, and the episodes of one
task share its difficulty, so neither episodes nor specs are independent units. Treating
them as such (the adjusted-Wald interval :func:`paired_difference` used before) covered a
pure seed-noise difference of 3 vs 3 seeds in only ~80% of simulated replicates
(``tests/test_eval_stats.py``). The variance model, for ``x[s, j]`` = the success rate of
seed ``s`` on task ``j`` (mean over that task's specs)::

    x[s, j] = mu + seed[s] + task[j] + e[s, j]
    Var(mean) = s2_seed / S + s2_task / J + s2_e / (S * J)
              ~ var_j(mean_s x[s, j]) / J + max(0, MS_rows - MS_res) / (S * J)

with ``MS_rows``, ``MS_res`` the two-way ANOVA mean squares (the seed component clamped
at 0) and a Student t quantile at Satterthwaite's degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""

_TINY_VAR = 1e-14
"""Below this the estimated variance is zero (every cell equal), so a fallback is used."""


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


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a)
    log_front -= math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f


def _t_upper(t: float, dof: float) -> float:
    """``P(T > t)`` for ``t >= 0``: Student t with ``dof`` (normal when ``dof = inf``)."""
    if math.isinf(dof):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    return 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))


def t_quantile(q: float, dof: float) -> float:
    """Student t quantile ``t`` with ``P(T <= t) = q`` for ``0.5 <= q < 1``, real ``dof > 0``.

    Pure Python (bisection on the CDF, ~1e-12 accurate) so the package needs no scipy;
    ``dof = inf`` gives the normal quantile.
    """
    if not 0.5 <= q < 1.0 or not dof > 0:
        raise ValueError(f"need 0.5 <= q < 1 and dof > 0, got q={q}, dof={dof}")
    lo, hi = 0.0, 1.0
    while _t_upper(hi, dof) > 1.0 - q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_upper(mid, dof) > 1.0 - q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def replicate_interval(values: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """``(mean, low, high)``: a t interval over independent replicates of a whole experiment.

    Each value is one run's estimate (e.g. its paired difference), so the spread between
    runs holds every source of variance a run has (data, grounding, imagination, policy
    seeds, episodes) without modelling any of them; the price is ``len(values) - 1``
    degrees of freedom (t = 4.30 for three runs). Needs two values at least.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        raise ValueError(f"replicate_interval needs two values at least, got {v.size}")
    mean = float(v.mean())
    q = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    half = t_quantile(q, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def _task_means(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``(S, N)`` per-spec values -> ``(S, J)`` per-task means, tasks in first-seen order."""
    _, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # relabel tasks by first appearance
    inv = order[inv.ravel()]
    count = np.bincount(inv)
    return np.stack([np.bincount(inv, weights=row) / count for row in x])


_Term = tuple[float, float, float]
"""``(coefficient, mean square, degrees of freedom)``: one term of a variance estimate."""


def _seed_terms(m: np.ndarray) -> list[_Term]:
    """Terms of ``s2_seed / S`` for an ``(S, J)`` matrix, ``s2_seed = (MS_rows - MS_res) / J``.

    Empty when one seed (not estimable) or when ``MS_rows <= MS_res`` (clamped at 0). With one
    task the seed and residual variance cannot be told apart: ``var(x[:, 0]) / S``.
    """
    n_seeds, n_tasks = m.shape
    if n_seeds < 2:
        return []
    if n_tasks == 1:
        return [(1.0 / n_seeds, float(np.var(m[:, 0], ddof=1)), n_seeds - 1.0)]
    rows, cols, grand = m.mean(axis=1), m.mean(axis=0), float(m.mean())
    ms_rows = n_tasks * float(np.sum((rows - grand) ** 2)) / (n_seeds - 1)
    resid = m - rows[:, None] - cols[None, :] + grand
    df_res = (n_seeds - 1.0) * (n_tasks - 1.0)
    ms_res = float(np.sum(resid**2)) / df_res
    if ms_rows <= ms_res:
        return []
    k = 1.0 / (n_seeds * n_tasks)
    return [(k, ms_rows, n_seeds - 1.0), (-k, ms_res, df_res)]


def _task_terms(col: np.ndarray) -> list[_Term]:
    """Terms of ``s2_task / J + s2_e / (S J)`` from the ``(J,)`` seed-averaged task means.

    ``var(col) / J`` estimates both at once (``E[MS_cols] / (S J)``), so nothing is clamped.
    """
    n_tasks = col.size
    if n_tasks < 2:
        return []
    return [(1.0 / n_tasks, float(np.var(col, ddof=1)), n_tasks - 1.0)]


def _satterthwaite(terms: list[_Term]) -> tuple[float, float]:
    """``V = sum c_k MS_k`` and its Satterthwaite dof ``V^2 / sum (c_k MS_k)^2 / df_k`` (>= 1)."""
    var = sum(c * ms for c, ms, _ in terms)
    den = sum((c * ms) ** 2 / df for c, ms, df in terms)
    dof = var * var / den if den > 0 else math.inf
    return var, max(1.0, dof)


def _method(n_seeds: int, n_tasks: int) -> str:
    if n_seeds >= 2 and n_tasks >= 2:
        return "seed-task"
    return "tasks-only" if n_tasks >= 2 else "seeds-only"


def _check_groups(groups: np.ndarray | None, n_specs: int) -> np.ndarray:
    if groups is None:
        return np.arange(n_specs)
    groups = np.asarray(groups)
    if groups.shape != (n_specs,):
        raise ValueError(f"groups needs one task id per spec ({n_specs},), got {groups.shape}")
    return groups


@dataclass(frozen=True)
class SeedTaskInterval:
    """A success rate over seeds and tasks with its random-effects interval.

    Attributes:
        mean: mean over every (seed, spec) episode, in [0, 1].
        low, high: 95% interval, within [0, 1].
        dof: Satterthwaite degrees of freedom of the t quantile (``inf`` for a fallback).
        method: ``seed-task`` (both random effects), ``tasks-only`` (one seed: seed
            variance not estimable), ``seeds-only`` (one task), or ``wilson`` (no
            variance to estimate: Wilson over the pooled episodes).
        n_seeds, n_tasks: rows and task groups behind it.
    """

    mean: float
    low: float
    high: float
    dof: float
    method: str
    n_seeds: int
    n_tasks: int


def seed_task_interval(
    x: np.ndarray, groups: np.ndarray | None = None, *, z: float = Z95
) -> SeedTaskInterval:
    """Interval of one policy's success rate with training seeds and tasks as random effects.

    Args:
        x: ``(n_seeds, n_specs)`` success indicators (0/1), row ``k`` from training seed ``k``.
        groups: ``(n_specs,)`` task id of each spec; None = every spec its own task.
        z: normal quantile fixing the level (1.96 for 95%); the interval uses the t
            quantile of the same level.

    Returns:
        :class:`SeedTaskInterval`. With ``X`` the ``(S, J)`` per-(seed, task) rates,
        ``Var = var_j(mean_s X) / J + max(0, MS_rows - MS_res) / (S J)`` (the module's
        model: task + residual, plus the seed term). Tasks are weighted equally in the
        variance; the interval is centred on the episode mean, the same as the task mean
        when every task has the same number of specs (as ``build_episode_specs`` makes).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"seed_task_interval needs (seeds, specs), got shape {x.shape}")
    n_seeds, n_specs = x.shape
    if n_seeds == 0 or n_specs == 0:
        return SeedTaskInterval(0.0, 0.0, 1.0, math.inf, "wilson", n_seeds, 0)
    m = _task_means(x, _check_groups(groups, n_specs))
    n_tasks = m.shape[1]
    mean = float(x.mean())
    var, dof = _satterthwaite(_task_terms(m.mean(axis=0)) + _seed_terms(m))
    if var <= _TINY_VAR:
        lo, hi = wilson_interval(int(round(x.sum())), x.size, z=z)
        return SeedTaskInterval(mean, lo, hi, math.inf, "wilson", n_seeds, n_tasks)
    half = t_quantile(0.5 * (1.0 + math.erf(z / math.sqrt(2.0))), dof) * math.sqrt(var)
    return SeedTaskInterval(
        mean,
        max(0.0, mean - half),
        min(1.0, mean + half),
        dof,
        _method(n_seeds, n_tasks),
        n_seeds,
        n_tasks,
    )


@dataclass(frozen=True)
class PairedDiff:
    """Success-rate difference ``b - a`` on the same episode specs.

    Attributes:
        diff: mean over specs of the per-spec difference (a rate difference in [-1, 1]).
        low, high: 95% interval of the difference (see :func:`paired_difference`).
        n_specs: episode specs compared.
        n_pairs: (spec, seed) pairs behind them.
        method: ``seed-task``, ``tasks-only`` (one seed), ``seeds-only`` (one task) or
            ``adjusted-wald`` (no variance to estimate; specs as the units).
        dof: Satterthwaite degrees of freedom of the t quantile (``inf`` for adjusted Wald).
        n_seeds, n_tasks: training seeds per mix and task groups.
    """

    diff: float
    low: float
    high: float
    n_specs: int
    n_pairs: int
    method: str = "adjusted-wald"
    dof: float = math.inf
    n_seeds: int = 0
    n_tasks: int = 0


def adjusted_wald(d: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """Agresti & Min's (2005) adjusted Wald interval over seed-averaged spec differences ``d``.

    Specs are the independent units: seeds and tasks are ignored. This was the paired
    interval before :func:`paired_difference` took them into account; it stays as that
    function's fallback when there is no variance to estimate. ``d``: ``(n_specs,)`` in
    [-1, 1]. Half a pseudo-spec is added to each discordant cell of the 2x2 table (weights 0.5 at
    ``d = +1`` and ``d = -1``, 1 at ``d = 0``), then ``mean* ± z sqrt((E*[d^2] - mean*^2) /
    (n + 2))``; it does not collapse to zero width when every spec agrees.
    """
    n_adj = d.size + 2.0
    mean_adj = float(d.sum()) / n_adj  # the pseudo-specs at +1 and -1 cancel
    second = (float(np.sum(d * d)) + 1.0) / n_adj  # 0.5 * (+1)^2 + 0.5 * (-1)^2 = 1
    se = math.sqrt(max(second - mean_adj**2, 0.0) / n_adj)
    return max(-1.0, mean_adj - z * se), min(1.0, mean_adj + z * se)


def paired_difference(
    a: np.ndarray, b: np.ndarray, groups: np.ndarray | None = None, *, z: float = Z95
) -> PairedDiff:
    """Paired difference of success between two data mixes, over seeds, tasks and specs.

    Args:
        a, b: ``(n_seeds, n_specs)`` success indicators (0/1) of the baseline and the
            treatment; column ``j`` of both from the same episode spec ``j`` (same task,
            wording and start seed).
        groups: ``(n_specs,)`` task id of each spec (specs of one task are correlated);
            None = every spec its own task.
        z: normal quantile fixing the level (1.96 for 95%).

    Returns:
        :class:`PairedDiff`, ``diff = mean(b) - mean(a)``. With ``A``, ``B`` the ``(S, J)``
        per-(seed, task) rates, ``D_j = mean_s B[s, j] - mean_s A[s, j]``::

            Var = var_j(D_j) / J + sum over A, B of max(0, MS_rows - MS_res) / (S J)

        The first term is the task (task x mix) plus residual variance, with the episode
        pairing kept: whatever a spec does to both mixes cancels in ``D_j``. The second is
        each mix's seed variance from its own two-way ANOVA: the mixes are trained
        separately, so seed ``k`` of ``a`` is not paired with seed ``k`` of ``b`` (this
        doubles the seed dof, ``2 (S - 1)``, over an ANOVA of ``B - A``, and is
        conservative if same-numbered seeds are positively correlated). t quantile at
        Satterthwaite's dof; one seed leaves the task term (``J - 1`` dof, seed variance
        not measurable), one task the seed terms (Welch); a zero variance falls back to
        the adjusted Wald interval over specs (:func:`adjusted_wald`). Tasks weigh
        equally in the variance (exact when every task has the same number of specs).
        Clipped to [-1, 1].
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"paired_difference needs equal (seeds, specs) shapes, got {a.shape}, {b.shape}"
        )
    n_seeds, n_specs = a.shape
    if n_specs == 0 or n_seeds == 0:
        return PairedDiff(0.0, -1.0, 1.0, 0, 0, n_seeds=n_seeds)
    groups = _check_groups(groups, n_specs)
    ma, mb = _task_means(a, groups), _task_means(b, groups)
    n_tasks = ma.shape[1]
    diff = float((b - a).mean())
    terms = _task_terms(mb.mean(axis=0) - ma.mean(axis=0)) + _seed_terms(ma) + _seed_terms(mb)
    var, dof = _satterthwaite(terms)
    if var <= _TINY_VAR:
        lo, hi = adjusted_wald((b - a).mean(axis=0), z)
        return PairedDiff(
            diff, lo, hi, n_specs, n_seeds * n_specs, "adjusted-wald", math.inf, n_seeds, n_tasks
        )
    half = t_quantile(0.5 * (1.0 + math.erf(z / math.sqrt(2.0))), dof) * math.sqrt(var)
    return PairedDiff(
        diff,
        max(-1.0, diff - half),
        min(1.0, diff + half),
        n_specs,
        n_seeds * n_specs,
        _method(n_seeds, n_tasks),
        dof,
        n_seeds,
        n_tasks,
    )
