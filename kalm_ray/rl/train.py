"""``kalm train``: offline RL policies for every (algorithm, data mix, seed) of the config.

Reads ``data/real/`` (+ ``data/imagined/``) and ``data/instructions.parquet``; writes
``policy/`` with one folder per unit (see :mod:`kalm_ray.rl.unit`), the prepared data of each
mix under ``policy/_data/<mix>/``, ``summary.json`` and ``config.yaml``.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from kalm_ray.artifacts import Manifest, RunDir, stage_output, write_manifest
from kalm_ray.config import ExperimentConfig
from kalm_ray.envs import get_suite
from kalm_ray.errors import InputError
from kalm_ray.raysetup import init_ray
from kalm_ray.rl.dataset import load_embeddings, prepare_mix, wording_groups
from kalm_ray.rl.quick_eval import QuickEval
from kalm_ray.rl.unit import plan_units, train_unit
from kalm_ray.stage import OUTPUT_DIRS, plan_stage

log = logging.getLogger("kalm_ray")

DATA_DIR = "_data"
SUMMARY = "summary.json"


def encoder_name(run: RunDir, fallback: str) -> str:
    """The instruction encoder recorded by the collect stage (``fallback`` if not recorded)."""
    m = run.manifest(OUTPUT_DIRS["collect"])
    return str((m.counts.get("encoder") if m else None) or fallback)


def run_train(cfg: ExperimentConfig, run_dir: RunDir | str | None = None) -> Manifest:
    """Prepare each data mix once, then train every unit of the grid in turn."""
    plan = plan_stage("train", cfg, run_dir)
    run = plan.run
    if plan.current is not None:
        return plan.current

    # ---- build: inputs checked before Ray starts ------------------------------------------
    train = cfg.train
    suite = get_suite(cfg.env.name)
    embeddings = load_embeddings(run)
    if not embeddings:
        raise InputError(f"{run.uri_of('data/instructions.parquet')}: no instructions")
    wordings = wording_groups(run) if train.wording_copies else None
    units = plan_units(train)
    max_steps = cfg.env.max_episode_steps or suite.max_episode_steps
    info = {
        "env": suite.name,
        "encoder": encoder_name(run, cfg.text.encoder),
        "action_space": repr(suite.action_space),
        "gamma": train.gamma,
    }
    init_ray(cfg.ray)

    # ---- run ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    with stage_output(run, plan.out_dir) as out:
        mixes, t_data = {}, {}
        for mix in train.data:
            t = time.perf_counter()
            mixes[mix] = prepare_mix(
                run,
                mix,
                f"{out}/{DATA_DIR}/{mix}",
                embeddings=embeddings,
                ratio=train.imagined_ratio,
                seed=cfg.seed,
                engine=train.data_engine,
                wordings=wordings,
                wording_copies=train.wording_copies,
            )
            t_data[mix] = round(time.perf_counter() - t, 2)
            print(
                f"[kalm] train: data {mix!r}: {mixes[mix].rows} rows ({t_data[mix]}s)", flush=True
            )
        quick = None
        if train.quick_eval_every:
            quick = QuickEval(
                suite,
                embeddings,
                episodes=train.quick_eval_episodes,
                max_steps=max_steps,
                seed=cfg.seed,
            )
        results = []
        try:
            for k, unit in enumerate(units, 1):
                res = train_unit(
                    unit,
                    train=train,
                    run=run,
                    out_dir=out,
                    mix=mixes[unit.data],
                    action_space=suite.action_space,
                    info=info,
                    quick_eval=quick,
                    master_seed=cfg.seed,
                )
                results.append(res)
                shown = (
                    ""
                    if res["quick_success"] is None
                    else f", quick success {res['quick_success']:.2f}"
                )
                print(
                    f"[kalm] train: {k}/{len(units)} {unit.name}: {res['wall_s']}s{shown}",
                    flush=True,
                )
        finally:
            if quick is not None:
                quick.close()

        # ---- save ---------------------------------------------------------------------------
        summary = {"units": results, "data": {m: mi.to_json() for m, mi in mixes.items()}}
        run.write_json(summary, out, SUMMARY)
        plan.save_config(out)
        successes = [r["quick_success"] for r in results if r["quick_success"] is not None]
        manifest = plan.manifest(
            counts={
                "units": len(results),
                "policies": [r["unit"] for r in results],
                "rows": {m: mi.rows for m, mi in mixes.items()},
                "quick_success": {r["unit"]: r["quick_success"] for r in results},
                "mean_quick_success": round(float(np.mean(successes)), 4) if successes else None,
            },
            timings={
                "wall_s": round(time.perf_counter() - t0, 2),
                "data_s": t_data,
                "units_s": {r["unit"]: r["wall_s"] for r in results},
            },
        )
    write_manifest(run, plan.out_dir, manifest)
    print(
        f"[kalm] train: {len(results)} policies in {manifest.timings['wall_s']}s -> "
        f"{run.uri_of(plan.out_dir)}",
        flush=True,
    )
    return manifest
