"""``kalm compare RUN_DIR RUN_DIR ...``: the KALM effect over independent runs of an experiment.

One run's paired interval (``eval/results.json``) covers its policy seeds, tasks and
episodes, but not the draw of its real data and its grounded LLM, which every imagined row
depends on: two groundings of one config gave the LLM as a policy 62% and 22%
(docs/results.md). Runs of one config under different master seeds (``seed:``) redraw
everything, so the spread of their paired differences is the whole experiment's variance.
This reads each run's ``eval/results.json`` and ``eval/config.yaml`` (files only, no Ray)
and writes, per algorithm and level, every run's difference, their mean and a t interval
over runs (:func:`kalm_ray.eval.stats.replicate_interval`), with the random policy's and
the grounded LLM's rates beside them, then what each run's imagination rests on (its LLM as
a policy from ``model/grounding_metrics.json``; accepted, kept and replay agreement per level
from ``data/imagined/filter_report.json``, where present). Runs whose configs differ beyond
``name``, ``run_dir`` and ``seed`` are compared all the same, and the differing keys are
listed.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from kalm_ray import artifacts
from kalm_ray.artifacts import RunDir
from kalm_ray.errors import InputError
from kalm_ray.eval.results import BASELINE, LLM_ALGO, RANDOM_ALGO, RANDOM_DATA, TREATMENT
from kalm_ray.eval.stats import replicate_interval

_NOT_COMPARED = ("name", "run_dir", "seed")
"""Config keys that may differ between replicates of one experiment."""


@dataclass(frozen=True)
class Run:
    uri: str
    results: Mapping[str, Any]
    config: Mapping[str, Any] | None  # eval/config.yaml; None in runs that lack it
    grounding: Mapping[str, Any] | None = None  # model/grounding_metrics.json
    imagined: Mapping[str, Any] | None = None  # data/imagined/filter_report.json


def load_run(uri: str) -> Run:
    run = RunDir(uri, gcs_retry_s=artifacts.READ_ONLY_GCS_RETRY_S)
    run.require_run()
    if not run.exists("eval", "results.json"):
        raise InputError(
            f"{run.uri_of('eval', 'results.json')} not found; run `{run.command('evaluate')}` "
            "for that run first"
        )
    config = None
    if run.exists("eval", "config.yaml"):
        config = yaml.safe_load(run.read_bytes("eval", "config.yaml").decode())
    optional = {
        key: run.read_json(*parts) if run.exists(*parts) else None
        for key, parts in (
            ("grounding", ("model", "grounding_metrics.json")),
            ("imagined", ("data", "imagined", "filter_report.json")),
        )
    }
    return Run(run.uri, run.read_json("eval", "results.json"), config, **optional)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(
    configs: Sequence[Mapping[str, Any] | None], defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """Dotted config keys whose values are not the same in every run (``name``, ``run_dir``
    and ``seed`` aside); runs without a config are skipped. A key that a run's config lacks
    counts as ``defaults``' value (flat, dotted): a run written before the key existed ran
    its default, which never changes (``_Section._hashed_when_set``)."""
    flat = [_flat(c) for c in configs if c is not None]
    keys = sorted(set().union(*flat)) if flat else []
    fill = defaults or {}
    return [
        k
        for k in keys
        if k.split(".")[0] not in _NOT_COMPARED
        and len({repr(f.get(k, fill.get(k, "<unset>"))) for f in flat}) > 1
    ]


def config_defaults(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The current code's default of every key, flat, for a config like ``config`` (its env
    and algorithms, which other defaults depend on); empty when it cannot be built."""
    from kalm_ray.config import parse_config
    from kalm_ray.errors import ConfigError

    if not config:
        return {}
    like = {"name": "defaults", "env": config.get("env") or {}}
    if isinstance(config.get("train"), Mapping) and "algos" in config["train"]:
        like["train"] = {"algos": config["train"]["algos"]}
    try:
        return _flat(parse_config(like).model_dump(mode="json"))
    except ConfigError:
        return {}


def _levels(runs: Sequence[Run]) -> list[str]:
    out: list[str] = []
    for r in runs:
        out += [lv for lv in r.results["levels"] if lv not in out]
    return out


def _rate(results: Mapping[str, Any], group: str, level: str) -> float | None:
    g = results["groups"].get(group)
    if g is None or level not in g["levels"]:
        return None
    return float(g["levels"][level]["mean"])


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def _mean_cell(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    return f"{100 * np.mean(got):.1f}%" if got else "—"


def compare_markdown(runs: Sequence[Run]) -> str:
    """The comparison document (Markdown); see the module docstring."""
    if len(runs) < 2:
        raise InputError(f"kalm compare needs two runs at least, got {len(runs)}")
    envs = {r.results.get("env") for r in runs}
    if len(envs) > 1:
        raise InputError(f"the runs evaluate different envs: {sorted(map(str, envs))}")
    levels = _levels(runs)
    algos = sorted({a for r in runs for a in r.results.get("paired", {})})
    lines = [
        f"# KALM effect over {len(runs)} runs of `{envs.pop()}`",
        "",
        "| run | config | seed | episodes per policy (specs) |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        name = (r.config or {}).get("name", "?")
        digest = str(r.results.get("specs_digest", ""))[:12]
        lines.append(
            f"| {i}: `{r.uri}` | {name} | {r.results.get('seed', '?')} | "
            f"{r.results.get('n_specs', '?')} (`{digest}`) |"
        )
    lines += [
        "",
        "| algo | level | real → real+imagined (mean of runs) | Δ per run (pp) | mean Δ (pp) "
        "| 95% CI over runs (pp) | runs with own CI > 0 / < 0 | random policy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo in algos:
        for lv in levels:
            paired = [r.results.get("paired", {}).get(algo, {}).get(lv) for r in runs]
            cells = []
            for p in paired:
                if p is None:
                    cells.append("—")
                    continue
                lo, hi = p["ci95"]
                cells.append(_pp(p["diff"]) + ("*" if lo > 0 else "†" if hi < 0 else ""))
            diffs = np.array([p["diff"] for p in paired if p is not None])
            if diffs.size >= 2:
                mean, lo, hi = replicate_interval(diffs)
                # A difference of success rates lies in [-1, 1] (so does paired_difference's).
                mean_s, ci = _pp(mean), f"[{_pp(max(lo, -1.0))}, {_pp(min(hi, 1.0))}]"
            else:
                mean_s = _pp(diffs[0]) if diffs.size else "—"
                ci = "— (one run)"
            above = sum(p is not None and p["ci95"][0] > 0 for p in paired)
            below = sum(p is not None and p["ci95"][1] < 0 for p in paired)
            real = _mean_cell([_rate(r.results, f"{algo}/{BASELINE}", lv) for r in runs])
            both = _mean_cell([_rate(r.results, f"{algo}/{TREATMENT}", lv) for r in runs])
            rand = _mean_cell([_rate(r.results, f"{RANDOM_ALGO}/{RANDOM_DATA}", lv) for r in runs])
            lines.append(
                f"| {algo} | {lv} | {real} → {both} | {' / '.join(cells)} | {mean_s} | {ci} "
                f"| {above} / {below} | {rand} |"
            )
    llm = [[_rate(r.results, f"{LLM_ALGO}/{BASELINE}", lv) for lv in levels] for r in runs]
    if any(v is not None for row in llm for v in row):
        lines += [
            "",
            "The grounded LLM as a policy (row `llm`), per run: "
            + "; ".join(
                f"{lv} "
                + " / ".join("—" if row[j] is None else f"{100 * row[j]:.1f}%" for row in llm)
                for j, lv in enumerate(levels)
            )
            + ".",
        ]
    lines += [
        "",
        "_Δ: real+imagined − real on the same episodes of one run (its `paired` entry); `*` "
        "its own 95% interval (seeds and tasks as random effects) lies above 0, `†` below. "
        "Mean and 95% CI over runs: Student t over the runs' Δ (n − 1 dof), each run one "
        "independent draw of data, grounding, imagination, policies and episodes._",
    ]
    lines += _imagination_table(runs)
    notes = _notes(runs)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _imagination_table(runs: Sequence[Run]) -> list[str]:
    """What each run's imagination rests on: its grounded LLM as a policy (the grounding
    metrics, held-out starts) and, per novel level, the share of requests accepted, the
    rollouts kept and the replay check's agreement."""
    if not any(r.grounding or r.imagined for r in runs):
        return []
    out = [
        "",
        "| run | LLM as policy, held-out starts (rephrased) vs random | accepted | kept "
        "| replay agreement |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        g = r.grounding or {}
        llm = (
            f"{100 * g['policy_llm_success']:.0f}% ({100 * g['policy_llm_rephrase_success']:.0f}%)"
            f" vs {100 * g['policy_random_success']:.0f}%"
            if "policy_llm_success" in g and "policy_llm_rephrase_success" in g
            else "—"
        )
        per = (r.imagined or {}).get("per_level", {})
        agree = ((r.imagined or {}).get("replay") or {}).get("per_level", {})
        accepted = " / ".join(f"{lv} {100 * c['accepted_fraction']:.0f}%" for lv, c in per.items())
        kept = " / ".join(f"{lv} {c['kept']}" for lv, c in per.items())
        replay = " / ".join(f"{lv} {_agreement(agree.get(lv))}" for lv in per)
        out.append(f"| {i} | {llm} | {accepted or '—'} | {kept or '—'} | {replay or '—'} |")
    return out


def _agreement(c: Mapping[str, Any] | None) -> str:
    if not c or c.get("agreement") is None:
        return "—"
    return f"{100 * c['agreement']:.0f}%"


def _notes(runs: Sequence[Run]) -> list[str]:
    out = []
    configs = [r.config for r in runs]
    first = next((c for c in configs if c is not None), None)
    diff = config_differences(configs, config_defaults(first))
    if diff:
        shown = ", ".join(f"`{k}`" for k in diff[:12]) + (" ..." if len(diff) > 12 else "")
        out.append(f"**The configs differ beyond the seed** ({len(diff)} keys): {shown}.")
    missing = [i for i, r in enumerate(runs, 1) if r.config is None]
    if missing:
        out.append(f"Runs {missing} have no `eval/config.yaml`; their configs are not compared.")
    seeds: dict[Any, list[int]] = {}
    for i, r in enumerate(runs, 1):
        seeds.setdefault(r.results.get("seed"), []).append(i)
    for seed, idx in seeds.items():
        if len(idx) > 1:
            out.append(
                f"Runs {idx} share seed {seed}: the same data draw and episodes, so they are "
                "replicates only of what else differs between them (code, config)."
            )
    return out


def cli_compare(args: argparse.Namespace) -> int:
    """``kalm compare RUN_DIR RUN_DIR ... [--out FILE]``."""
    # The same run spelt twice (a trailing slash, ./, a relative path) would count as two
    # replicates and narrow the interval.
    where = [RunDir(u).uri_of("") for u in args.run_dirs]
    twice = next((u for u, w in zip(args.run_dirs, where, strict=True) if where.count(w) > 1), None)
    if twice is not None:
        raise InputError(f"{twice}: a run directory is named twice")
    md = compare_markdown([load_run(u) for u in args.run_dirs])
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(md)
        except OSError as e:
            raise InputError(f"--out {args.out}: cannot write it ({e.strerror or e})") from None
        print(f"[kalm] compare: {args.out}")
    else:
        print(md, end="")
    return 0
