"""``eval/report.md`` and its plots, rebuilt from files alone (``kalm report RUN_DIR``).

Inputs: ``eval/results.json`` (required); optional: each policy's learning-curve CSV,
``data/imagined/filter_report.json``, and the real/imagined transition Parquet files (CLEVR
top-down rollouts). A missing optional input turns its section into one sentence saying
so. Figures are drawn with matplotlib's Agg canvas directly (no pyplot global state, no
display needed) and written through the run dir's filesystem, so remote run dirs work.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np

from kalm_ray import artifacts
from kalm_ray.artifacts import RunDir
from kalm_ray.envs.suite import LEVELS
from kalm_ray.errors import InputError
from kalm_ray.eval.results import BASELINE, TREATMENT, headline_markdown

log = logging.getLogger("kalm_ray")

_MIX_COLORS = {BASELINE: "#7f8c8d", TREATMENT: "#2e86de"}
_BALL_COLORS = ("#de2929", "#2952de", "#29b340", "#8c38bf", "#29ccd9")
_X_COLUMNS = ("iteration", "training_iteration", "iter", "step", "epoch")
_NOT_CURVES = ("updates", "train_s", "time", "timestamp")
"""Bookkeeping columns of a learning-curve CSV that are not worth a panel."""


def cli_report(args: argparse.Namespace) -> int:
    """``kalm report RUN_DIR``: regenerate ``eval/report.md`` and the plots."""
    run = RunDir(args.run_dir, gcs_retry_s=artifacts.READ_ONLY_GCS_RETRY_S)
    run.require_run()
    written = write_report(run)
    print(f"[kalm] report: {run.uri_of('eval', 'report.md')} ({len(written) - 1} plots)")
    return 0


def write_report(run: RunDir, *, eval_dir: str = "eval") -> list[str]:
    """Write ``report.md`` and PNGs into ``eval_dir``; returns the file names written."""
    if not run.exists(eval_dir, "results.json"):
        raise InputError(
            f"{run.uri_of(eval_dir, 'results.json')} not found; "
            f"run `{run.command('evaluate')}` first"
        )
    results = run.read_json(eval_dir, "results.json")
    files: dict[str, bytes] = {}
    md = [
        f"# Evaluation report: `{results.get('env', '?')}`",
        "",
        f"{len(results['policies'])} policies, {results.get('n_specs', '?')} episodes each "
        f"(episode specs `{str(results.get('specs_digest', ''))[:12]}`, same for every policy), "
        f"levels: {', '.join(results['levels'])}.",
        "",
        "## Headline",
        "",
        headline_markdown(results),
    ]

    md += ["## Success by level", ""]
    files["success_by_level.png"] = _png(_success_figure(results))
    md += [
        "![success by level](success_by_level.png)",
        "",
        _bars_caption(results),
        "",
        _policy_table(results),
        "",
    ]

    md += ["## Learning curves", ""]
    curves = _learning_curves(run, list(results["policies"]))
    if curves:
        files["learning_curves.png"] = _png(_curves_figure(curves, results["policies"]))
        md += ["![learning curves](learning_curves.png)", ""]
    else:
        md += ["No learning-curve CSV was found under `policy/*/`.", ""]

    md += ["## Imagined rollouts: filter rejections", ""]
    filt = _filter_levels(run)
    if filt is None:
        md += ["No imagined data: `data/imagined/filter_report.json` is absent.", ""]
    elif not any(c["reasons"] for c in filt.values()):
        md += ["The filter rejected no imagined rollout.", "", _filter_table(filt), ""]
    else:
        files["filter_rejections.png"] = _png(_rejections_figure(filt))
        md += ["![filter rejections](filter_rejections.png)", "", _filter_table(filt), ""]

    md += ["## Imagined rollouts checked against the simulator", ""]
    replay = _replay_section(run)
    if isinstance(replay, str):
        md += [replay, ""]
    else:
        table, pairs = replay
        md += [table, ""]
        if pairs and results.get("env") == "clevr":
            files["imagined_vs_replay.png"] = _png(_topdown_figure(pairs))
            md += [
                "![imagined vs replayed](imagined_vs_replay.png)",
                "",
                "Each row: one accepted imagined rollout (left) and the same actions replayed "
                "from the same start in the simulator (right). A diagnostic only: replays never "
                "create, label or select imagined data.",
                "",
            ]

    md += ["## Imagined vs real rollouts (top-down)", ""]
    if results.get("env") != "clevr":
        md += ["Top-down rollout plots are drawn for CLEVR-Robot only.", ""]
    else:
        pairs = _clevr_rollouts(run)
        if isinstance(pairs, str):
            md += [pairs, ""]
        else:
            files["rollouts_topdown.png"] = _png(_topdown_figure(pairs))
            md += [
                "![top-down rollouts](rollouts_topdown.png)",
                "",
                "Each line is one ball's path (colour = ball: red, blue, green, purple, cyan), "
                "from ○ (start) to × (end). Each row is one task: real episodes first, then "
                "imagined rollouts of the same task (their wording may be a rephrasing).",
                "",
            ]

    for name, data in files.items():
        run.write_bytes(data, eval_dir, name)
    run.write_text("\n".join(md), eval_dir, "report.md")
    return ["report.md", *files]


# ---- tables -------------------------------------------------------------------------------


def _policy_table(results: Mapping[str, Any]) -> str:
    levels = results["levels"]
    rows = [
        "| policy | " + " | ".join(levels) + " | mean length |",
        "|---|" + "---|" * (len(levels) + 1),
    ]
    for name, p in sorted(results["policies"].items()):
        cells = []
        for lv in levels:
            s = p["levels"][lv]
            cells.append(
                f"{100 * s['success_rate']:.1f}% "
                f"[{100 * s['ci95'][0]:.0f}, {100 * s['ci95'][1]:.0f}]"
            )
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {p['all']['mean_length']:.1f} |")
    return "\n".join(rows)


def _bars_caption(results: Mapping[str, Any]) -> str:
    """Which interval the success bars carry (``ci95_seeds`` is absent in older runs)."""
    seeded = all(
        "ci95_seeds" in s for g in results["groups"].values() for s in g["levels"].values()
    )
    ci = (
        "a 95% interval with training seeds and tasks as random effects (as in the headline)"
        if seeded
        else "a Wilson 95% interval"
    )
    return f"Bars: success over every seed's episodes with {ci}; dots: single seeds."


def _filter_table(levels: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(levels)
    reasons = sorted({r for c in levels.values() for r in c["reasons"]})
    rows = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in ("requested", "accepted"):
        rows.append(f"| **{key}** | " + " | ".join(str(levels[lv][key]) for lv in names) + " |")
    for r in reasons:
        rows.append(
            f"| rejected: {r} | "
            + " | ".join(str(levels[lv]["reasons"].get(r, 0)) for lv in names)
            + " |"
        )
    return "\n".join(rows)


# ---- inputs -------------------------------------------------------------------------------


def _read_csv(text: str) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader(io.StringIO(text)))
    cols: dict[str, np.ndarray] = {}
    for key in rows[0].keys() if rows else []:
        try:
            cols[key] = np.array(
                [float(r[key]) if r[key] not in ("", None) else np.nan for r in rows]
            )
        except (TypeError, ValueError):
            continue  # a text column (timestamps, names): not a curve
    return cols


def _learning_curves(run: RunDir, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """policy name -> numeric CSV columns, for policies whose folder holds a ``*.csv``."""
    curves = {}
    for name in names:
        # curve.csv is what kalm_ray.rl writes; any other CSV is taken when it is absent.
        csvs = sorted(
            (f for f in run.list("policy", name) if f.endswith(".csv")),
            key=lambda f: f != "curve.csv",
        )
        if csvs:
            cols = _read_csv(run.read_bytes("policy", name, csvs[0]).decode())
            if cols:
                curves[name] = cols
    return curves


def _filter_levels(run: RunDir) -> dict[str, dict[str, Any]] | None:
    """level -> ``{requested, accepted, reasons: {reason: n}}`` from ``filter_report.json``
    (written by ``kalm_ray.llm.imagine.store``, counts from ``FilterTally``); None when absent."""
    if not run.exists("data", "imagined", "filter_report.json"):
        return None
    report = run.read_json("data", "imagined", "filter_report.json")
    levels = report.get("per_level") or {"all": report}
    order = sorted(levels, key=lambda lv: LEVELS.index(lv) if lv in LEVELS else len(LEVELS))
    return {
        lv: {
            "requested": int(levels[lv].get("requested", 0)),
            "accepted": int(levels[lv].get("accepted", 0)),
            "reasons": {r: int(n) for r, n in (levels[lv].get("reasons") or {}).items() if n},
        }
        for lv in order
    }


def _replay_section(run: RunDir) -> str | tuple[str, list[dict[str, Any]]]:
    """The replay check of ``filter_report.json`` as a table and top-down pairs, or why not."""
    if not run.exists("data", "imagined", "filter_report.json"):
        return "No imagined data: `data/imagined/filter_report.json` is absent."
    rep = run.read_json("data", "imagined", "filter_report.json").get("replay")
    if not isinstance(rep, dict) or not rep.get("available"):
        why = rep.get("why") if isinstance(rep, dict) else "made before the check existed"
        return f"No replay check: {why}."
    lines = [
        "| level | accepted rollouts | imagined success | replayed success | agreement "
        "| mean state error |",
        "|---|---|---|---|---|---|",
    ]
    for lv, c in rep.get("per_level", {}).items():
        agree = "—" if c.get("agreement") is None else f"{100 * c['agreement']:.1f}%"
        lines.append(
            f"| {lv} | {c['rollouts']} | {100 * c['imagined_success_rate']:.1f}% | "
            f"{100 * c['replayed_success_rate']:.1f}% | {agree} | {c['mean_state_error']:.4f} |"
        )
    by_steps = [
        f"{lv}: "
        + ", ".join(
            f"{t}: {100 * b['confirmed'] / b['imagined_successes']:.0f}% "
            f"({b['imagined_successes']})"
            for t, b in c["agreement_by_steps"].items()
        )
        for lv, c in rep.get("per_level", {}).items()
        if c.get("agreement_by_steps")
    ]
    lines += [
        "",
        "_Agreement: of the imagined rollouts that reach their goal in their own (imagined) "
        "states, the fraction whose actions also reach it when replayed in the simulator. "
        "State error: mean absolute difference per coordinate (m) over the steps._",
    ]
    if by_steps:
        lines += [
            "",
            "Agreement by the imagined success's length in steps (imagined successes of that "
            "length), where the world model's errors compound: " + "; ".join(by_steps) + ".",
        ]
    doubtful = [
        f"{lv}: {d['imagined_successes']} ("
        f"{100 * d['confirmed'] / max(d['imagined_successes'], 1):.0f}% confirmed)"
        for lv, c in rep.get("per_level", {}).items()
        if (d := c.get("doubtful"))
    ]
    if doubtful:
        lines += [
            "",
            "Successes kept out of the data because they did not hold up in the world model's "
            "own draws (`imagine.consistency_draws`; not in the table above): "
            + "; ".join(doubtful) + ".",
        ]
    pairs = []
    for smp in rep.get("samples", []):
        im, re_ = np.asarray(smp["imagined"]), np.asarray(smp["replayed"])
        ep = {"instruction": smp.get("instruction", "")}
        pairs.append(
            {
                "task": f"{smp.get('level', '')}: {smp.get('task', '')}",
                "panels": [("imagined", {**ep, "states": im}), ("replayed", {**ep, "states": re_})],
            }
        )
    return "\n".join(lines), pairs


def _parquet_files(run: RunDir, folder: str) -> list[str]:
    import pyarrow.fs as pafs

    if not run.exists(folder):
        return []
    sel = pafs.FileSelector(run.path(folder), recursive=True)
    return sorted(
        i.path
        for i in run.fs.get_file_info(sel)
        if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )


def _read_episodes(run: RunDir, folder: str) -> dict[str, dict[str, Any]]:
    """episode_id -> {task, level, instruction, states (T+1, D)} from a transition folder."""
    import pyarrow.parquet as pq

    from kalm_ray.data.schema import column_matrix

    eps: dict[str, dict[str, Any]] = {}
    for path in _parquet_files(run, folder):
        t = pq.read_table(
            path,
            filesystem=run.fs,
            columns=["episode_id", "t", "task", "level", "instruction", "state", "next_state"],
        )
        state, nxt = column_matrix(t, "state"), column_matrix(t, "next_state")
        ids, steps = t.column("episode_id").to_pylist(), t.column("t").to_numpy()
        tasks, levels, instr = (t.column(c).to_pylist() for c in ("task", "level", "instruction"))
        for i, eid in enumerate(ids):
            e = eps.setdefault(
                eid, {"task": tasks[i], "level": levels[i], "instruction": instr[i], "rows": []}
            )
            e["rows"].append((int(steps[i]), state[i], nxt[i]))
    for e in eps.values():
        rows = sorted(e.pop("rows"), key=lambda r: r[0])
        e["states"] = np.stack([rows[0][1], *[r[2] for r in rows]])
    return eps


def _clevr_rollouts(
    run: RunDir, *, n_tasks: int = 2, per_side: int = 2
) -> list[dict[str, Any]] | str:
    """A few tasks seen in both real and imagined data, with up to ``per_side`` episodes each."""
    real_files, imag_files = _parquet_files(run, "data/real"), _parquet_files(run, "data/imagined")
    if not imag_files:
        return "No imagined data: `data/imagined/` holds no Parquet files."
    if not real_files:
        return "No real data: `data/real/` holds no Parquet files."
    real, imag = _read_episodes(run, "data/real"), _read_episodes(run, "data/imagined")
    by_task: dict[str, list[dict[str, Any]]] = {}
    for e in real.values():
        by_task.setdefault(e["task"], []).append(e)
    shared = sorted({e["task"] for e in imag.values()} & by_task.keys())
    if not shared:
        return "No task appears in both real and imagined data: nothing to set side by side."
    out = []
    for task in shared[:n_tasks]:
        im = [e for e in imag.values() if e["task"] == task][:per_side]
        out.append({"task": task, "real": by_task[task][:per_side], "imagined": im})
    return out


# ---- figures ------------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _success_figure(results: Mapping[str, Any]):
    # The random baseline is a column of the headline table, not a panel of its own.
    groups = {k: g for k, g in results["groups"].items() if g["algo"] != "random"}
    algos = sorted({g["algo"] for g in groups.values()})
    mixes = sorted(
        {g["data"] for g in groups.values()}, key=lambda m: (m != BASELINE, m != TREATMENT, m)
    )
    levels = results["levels"]
    fig = _figure(max(5.0, 3.2 * len(algos)), 3.6)
    axes = fig.subplots(1, len(algos), sharey=True, squeeze=False)[0]
    width = 0.8 / max(1, len(mixes))
    x = np.arange(len(levels))
    for ax, algo in zip(axes, algos, strict=True):
        for j, mix in enumerate(mixes):
            g = groups.get(f"{algo}/{mix}")
            if g is None:
                continue
            pooled = [g["levels"][lv]["pooled"] for lv in levels]
            rate = np.array([p["success_rate"] for p in pooled])
            # Seed x task interval where results.json has it; Wilson in older runs.
            ci = [
                g["levels"][lv].get("ci95_seeds", p["ci95"])
                for lv, p in zip(levels, pooled, strict=True)
            ]
            err = np.array(
                [[max(0.0, r - c[0]), max(0.0, c[1] - r)] for r, c in zip(rate, ci, strict=True)]
            ).T
            pos = x + (j - (len(mixes) - 1) / 2) * width
            ax.bar(pos, rate, width, yerr=err, capsize=3, label=mix, color=_MIX_COLORS.get(mix))
            for p in results["policies"].values():
                if p["algo"] == algo and p["data"] == mix:
                    ax.plot(pos, [p["levels"][lv]["success_rate"] for lv in levels], "k.", ms=4)
        ax.set_xticks(x, levels)
        ax.set_title(algo)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("success rate")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(mixes)), fontsize=8)
    return fig


def _curves_figure(
    curves: Mapping[str, Mapping[str, np.ndarray]], policies: Mapping[str, Mapping[str, Any]]
):
    """Up to three metrics (success first, then losses); colour = data mix, line style = algo."""
    algos = sorted({p["algo"] for p in policies.values()})
    styles = ("-", "--", ":", "-.")
    metrics: list[str] = []
    for cols in curves.values():
        for k in cols:
            if (
                k not in (*_X_COLUMNS, *_NOT_CURVES)
                and k not in metrics
                and np.isfinite(cols[k]).any()
            ):
                metrics.append(k)
    ranked = sorted(
        metrics, key=lambda k: (0 if "success" in k else 1 if "loss" in k else 2, metrics.index(k))
    )
    shown = ranked[:3]
    fig = _figure(4.2 * max(1, len(shown)), 3.4)
    axes = fig.subplots(1, max(1, len(shown)), squeeze=False)[0]
    for ax, metric in zip(axes, shown, strict=False):
        for name, cols in sorted(curves.items()):
            if metric not in cols:
                continue
            xkey = next((k for k in _X_COLUMNS if k in cols), None)
            y = cols[metric]
            xs = cols[xkey] if xkey else np.arange(len(y))
            ok = np.isfinite(y)
            info = policies.get(name, {})
            ax.plot(
                xs[ok],
                y[ok],
                marker="." if ok.sum() < 30 else None,
                label=name,
                lw=1,
                color=_MIX_COLORS.get(info.get("data", "")),
                ls=styles[algos.index(info["algo"]) % len(styles)] if "algo" in info else "-",
            )
        ax.set_title(metric)
        ax.set_xlabel(next((k for k in _X_COLUMNS if any(k in c for c in curves.values())), "row"))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    return fig


def _rejections_figure(levels: Mapping[str, Mapping[str, Any]]):
    reasons = sorted({r for c in levels.values() for r in c["reasons"]})
    fig = _figure(6.0, 0.8 + 0.35 * max(3, len(reasons)))
    ax = fig.subplots()
    left = np.zeros(len(reasons))
    for lv, c in levels.items():
        vals = np.array([c["reasons"].get(r, 0) for r in reasons], dtype=float)
        ax.barh(reasons, vals, left=left, label=lv)
        left += vals
    ax.set_xlabel("rejected rollouts")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    return fig


def _topdown_figure(pairs: list[dict[str, Any]]):
    """One row per task: its real episodes, then its imagined rollouts, one panel each."""

    def panels_of(pair: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if "panels" in pair:  # labelled panels (imagined vs replayed)
            return list(pair["panels"])
        return [("real", e) for e in pair["real"]] + [("imagined", e) for e in pair["imagined"]]

    cols = max(len(panels_of(p)) for p in pairs)
    fig = _figure(2.7 * cols, 2.6 * len(pairs))
    axes = fig.subplots(len(pairs), cols, squeeze=False)
    for row, pair in zip(axes, pairs, strict=True):
        panels = panels_of(pair)
        for ax in row[len(panels) :]:
            ax.set_axis_off()
        for ax, (side, ep) in zip(row, panels, strict=False):
            s = ep["states"].reshape(len(ep["states"]), -1, 2)
            for b in range(min(s.shape[1], len(_BALL_COLORS))):
                ax.plot(s[:, b, 0], s[:, b, 1], "-", color=_BALL_COLORS[b], lw=1.2)
                ax.plot(s[0, b, 0], s[0, b, 1], "o", mfc="none", color=_BALL_COLORS[b], ms=6)
                ax.plot(s[-1, b, 0], s[-1, b, 1], "x", color=_BALL_COLORS[b], ms=6)
            text = textwrap.shorten(ep["instruction"], 60, placeholder="...")
            ax.set_title(f"{side}, {len(s) - 1} steps\n{text}", fontsize=7)
            ax.set(xlim=(-0.6, 0.6), ylim=(-0.3, 0.7), xticks=[], yticks=[])
            ax.set_aspect("equal")
        row[0].set_ylabel(pair["task"], fontsize=8)
    return fig
