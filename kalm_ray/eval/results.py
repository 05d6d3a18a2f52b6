"""From per-episode outcomes to ``results.json`` and the headline table (no Ray, no files).

Layout of ``results.json`` (rates are fractions in [0, 1]; ``ci95`` = Wilson 95%):

- ``policies[name]``: ``algo``, ``data``, ``seed``, ``all`` and ``levels[level]`` stats,
  each level with ``tasks[task]`` stats. Stats = ``episodes, successes, success_rate,
  ci95, mean_length``.
- ``groups["<algo>/<data>"]``: across seeds, per level: ``mean``/``std`` of the per-seed
  rates, ``seeds``, ``pooled`` stats over every seed's episodes, and ``ci95_seeds`` (with
  ``ci95_seeds_method``): the 95% interval with seeds and tasks as random effects
  (:func:`kalm_ray.eval.stats.seed_task_interval`; absent in runs before it).
- ``paired[algo][level]``: ``real+imagined`` minus ``real`` on the same episode specs
  (:func:`kalm_ray.eval.stats.paired_difference`, tasks from ``spec.task``); ``ci95`` with
  its ``ci_method``, ``dof``, ``n_seeds`` and ``n_tasks`` (the last four absent in older
  runs, whose ``ci95`` treated specs as independent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kalm_ray.envs.suite import LEVELS
from kalm_ray.eval.episodes import EpisodeResult, EpisodeSpec
from kalm_ray.eval.stats import (
    paired_difference,
    seed_mean_std,
    seed_task_interval,
    wilson_interval,
)

MIN_SEEDS = 3
"""Training seeds per mix below which a paired comparison is flagged as not a result."""
BASELINE = "real"
TREATMENT = "real+imagined"
CI_METHOD = (
    "Per policy: Wilson score 95% interval over episodes. Across seeds: mean ± sample std of "
    "per-seed rates. Paired difference (real+imagined − real, same algorithm, same episode "
    "specs): 95% t interval with training seeds and tasks as random effects (variance = "
    "s²_task/J + s²_e/(S·J) from the per-task differences, plus each mix's s²_seed/S from its "
    "own seed × task ANOVA; Satterthwaite dof), so seed-to-seed noise and the correlation of "
    "one task's episodes widen it; adjusted Wald over specs only if no variance can be "
    "estimated. The per-level bars of report.md use the same interval for one mix's rate."
)


@dataclass(frozen=True)
class PolicyId:
    """Who a policy is: ``name`` is its folder under ``policy/``."""

    name: str
    algo: str
    data: str
    seed: int


def outcome_stats(success: np.ndarray, length: np.ndarray | None = None) -> dict[str, Any]:
    """Stats of a set of episodes: ``success`` (n,) bool, ``length`` (n,) env steps (optional)."""
    n, k = int(success.size), int(np.sum(success))
    lo, hi = wilson_interval(k, n)
    out: dict[str, Any] = {
        "episodes": n,
        "successes": k,
        "success_rate": k / n if n else 0.0,
        "ci95": [lo, hi],
    }
    if length is not None:
        out["mean_length"] = float(np.mean(length)) if n else 0.0
    return out


def _levels(specs: Sequence[EpisodeSpec]) -> list[str]:
    present = {s.level for s in specs}
    return [lv for lv in LEVELS if lv in present]


def build_results(
    specs: Sequence[EpisodeSpec],
    outcomes: Mapping[str, Sequence[EpisodeResult]],
    policies: Sequence[PolicyId],
    *,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``results.json`` document; ``outcomes[name]``: one result per spec, in spec order."""
    level_of = np.array([s.level for s in specs])
    task_of = np.array([s.task for s in specs])
    levels = _levels(specs)
    succ: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {**meta, "levels": levels, "ci_method": CI_METHOD, "policies": {}}
    for p in policies:
        res = outcomes[p.name]
        s = np.array([r.success for r in res], dtype=bool)
        n = np.array([r.length for r in res], dtype=np.int64)
        succ[p.name] = s
        per_level = {}
        for lv in levels:
            m = level_of == lv
            tasks = {
                t: outcome_stats(s[m & (task_of == t)], n[m & (task_of == t)])
                for t in dict.fromkeys(task_of[m].tolist())
            }
            per_level[lv] = {**outcome_stats(s[m], n[m]), "tasks": tasks}
        out["policies"][p.name] = {
            "algo": p.algo,
            "data": p.data,
            "seed": p.seed,
            "all": outcome_stats(s, n),
            "levels": per_level,
        }

    groups: dict[tuple[str, str], list[PolicyId]] = {}
    for p in sorted(policies, key=lambda q: (q.algo, q.data, q.seed)):
        groups.setdefault((p.algo, p.data), []).append(p)
    out["groups"] = {}
    for (algo, data), members in groups.items():
        g: dict[str, Any] = {
            "algo": algo,
            "data": data,
            "seeds": [p.seed for p in members],
            "levels": {},
        }
        for lv in levels:
            m = level_of == lv
            rates = [float(succ[p.name][m].mean()) for p in members]
            mean, std = seed_mean_std(rates)
            pooled = np.concatenate([succ[p.name][m] for p in members])
            ci = seed_task_interval(np.stack([succ[p.name][m] for p in members]), task_of[m])
            g["levels"][lv] = {
                "mean": mean,
                "std": std,
                "n_seeds": len(members),
                "pooled": outcome_stats(pooled),
                "ci95_seeds": [ci.low, ci.high],
                "ci95_seeds_method": ci.method,
            }
        out["groups"][f"{algo}/{data}"] = g

    out["paired"] = {}
    for algo in sorted({p.algo for p in policies}):
        base = {p.seed: p for p in groups.get((algo, BASELINE), [])}
        treat = {p.seed: p for p in groups.get((algo, TREATMENT), [])}
        seeds = sorted(base.keys() & treat.keys())
        if not seeds:
            continue
        out["paired"][algo] = {}
        for lv in levels:
            m = level_of == lv
            a = np.stack([succ[base[k].name][m] for k in seeds]).astype(np.float64)
            b = np.stack([succ[treat[k].name][m] for k in seeds]).astype(np.float64)
            d = paired_difference(a, b, task_of[m])
            out["paired"][algo][lv] = {
                "baseline": BASELINE,
                "treatment": TREATMENT,
                "seeds": seeds,
                "diff": d.diff,
                "ci95": [d.low, d.high],
                "n_specs": d.n_specs,
                "n_pairs": d.n_pairs,
                "ci_method": d.method,
                "dof": d.dof if np.isfinite(d.dof) else None,
                "n_seeds": d.n_seeds,
                "n_tasks": d.n_tasks,
            }
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


RANDOM_ALGO, RANDOM_DATA = "random", "none"
"""How the uniform-random baseline policy is labelled (``kalm_ray.eval.evaluate``)."""
LLM_ALGO = "llm"
"""The LLM-as-policy row (:mod:`kalm_ray.llm.policy`); its data is ``real``."""


def headline_markdown(results: Mapping[str, Any]) -> str:
    """Real vs real+imagined per algorithm and level, with the paired difference and its CI.

    The ``llm`` row (the grounded LLM as a policy) and the ``random`` row (shown in the
    ``real`` column, and beside every row) are the baselines every number is read against.
    """
    random = results["groups"].get(f"{RANDOM_ALGO}/{RANDOM_DATA}")
    groups = {k: g for k, g in results["groups"].items() if g["algo"] != RANDOM_ALGO}
    # The baselines last: the LLM-as-policy (grounded on real data), then the random policy.
    algos = sorted({g["algo"] for g in groups.values()}, key=lambda a: (a == LLM_ALGO, a))
    mixes = [m for m in (BASELINE, TREATMENT) if any(g["data"] == m for g in groups.values())]
    mixes += sorted({g["data"] for g in groups.values()} - set(mixes))
    if random:  # its row shows its rate in the first column (it uses no data)
        algos.append(RANDOM_ALGO)
        groups = {**groups, f"{RANDOM_ALGO}/{mixes[0] if mixes else BASELINE}": random}
    extra = " random policy |" if random else ""
    lines = [
        f"### Success rate on `{results.get('env', '?')}` "
        f"({results.get('n_specs', '?')} episodes per policy, same episodes for every policy)",
        "",
        "| algo | level | "
        + " | ".join(f"{m} (mean ± std, seeds)" for m in mixes)
        + " | Δ paired (pp) | 95% CI (pp) |"
        + extra,
        "|---|---|" + "---|" * len(mixes) + "---|---|" + ("---|" if random else ""),
    ]
    for algo in algos:
        for lv in results["levels"]:
            cells = []
            for m in mixes:
                g = groups.get(f"{algo}/{m}")
                if g is None:
                    cells.append("—")
                    continue
                s = g["levels"][lv]
                cells.append(f"{_pct(s['mean'])} ± {100 * s['std']:.1f} (n={s['n_seeds']})")
            p = results.get("paired", {}).get(algo, {}).get(lv)
            if p is None:
                diff, ci = "—", "—"
            else:
                diff = f"{100 * p['diff']:+.1f}"
                ci = f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}]"
                if p.get("ci_method", "seed-task") != "seed-task":
                    ci += f" ({p['ci_method']})"  # e.g. one seed: seed variance not measured
            row = f"| {algo} | {lv} | " + " | ".join(cells) + f" | {diff} | {ci} |"
            if random:
                row += f" {_pct(random['levels'][lv]['mean'])} |"
            lines.append(row)
    lines += ["", f"_{results.get('ci_method', CI_METHOD)}_", ""]
    few = sorted(
        {
            p["n_seeds"]
            for by_level in results.get("paired", {}).values()
            for p in by_level.values()
            if p.get("n_seeds") is not None and p["n_seeds"] < MIN_SEEDS
        }
    )
    if few:
        lines += [
            f"_**Not a result:** {' or '.join(map(str, few))} training seed(s) per mix, so the "
            "intervals hold little or no seed variance; a comparison needs "
            f"`train.seeds` of {MIN_SEEDS} at least._",
            "",
        ]
    return "\n".join(lines)
