"""The ``train`` stage: offline RL policies for every (algorithm, data mix, seed) of the config.

Reads ``data/real/`` (+ ``data/imagined/`` for the ``real+imagined`` mixes) and
``data/instructions.parquet``; writes ``policy/`` with one folder per unit (see
:mod:`kalm_ray.rl.unit`), the prepared data of each mix under ``policy/_data/<mix>/``,
``summary.json``, the resolved config and ``manifest.json`` last.

``run_train(cfg, run_dir)`` reads top to bottom:

1. plan: return at once if ``policy/`` is current; load the embeddings and plan the
   units before Ray starts.
2. build: each data mix prepared once (:func:`~kalm_ray.rl.dataset.prepare_mix`).
3. run: every unit not finished by a stopped run, as concurrent Ray tasks
   (:class:`~kalm_ray.rl.unit_pool.UnitPool`) or one after another in this process
   (``train.max_concurrent_units: 1``); each finished unit is marked as it arrives.
4. save: the summary, the config, then the manifest.

The machinery (resume, the in-driver loop) is in :mod:`kalm_ray.rl.train`.
"""

from __future__ import annotations

import time

import numpy as np

from kalm_ray.artifacts import Manifest, RunDir, Staging, stage_output, write_manifest
from kalm_ray.config import ExperimentConfig
from kalm_ray.envs import get_suite
from kalm_ray.errors import InputError
from kalm_ray.progress import show_progress
from kalm_ray.raysetup import init_ray
from kalm_ray.rl.dataset import load_embeddings, prepare_mix, wording_groups
from kalm_ray.rl.policy import POLICY_INFO
from kalm_ray.rl.quick_eval import QuickEvalSpec
from kalm_ray.rl.train import (
    DATA_DIR,
    SUMMARY,
    UnitFailed,
    asked_wordings,
    encoder_name,
    finished_units,
    one_line,
    train_in_driver,
)
from kalm_ray.rl.unit import plan_units
from kalm_ray.rl.unit_pool import UnitPool
from kalm_ray.stage import plan_stage, print_resuming, require_stage_resources


def run_train(cfg: ExperimentConfig, run_dir: RunDir | str | None = None) -> Manifest:
    """Prepare each data mix once, then train every unit of the grid (as concurrent Ray tasks,
    or one after another in this process with ``train.max_concurrent_units: 1``)."""
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
    asked = (
        asked_wordings(run, suite)
        if wordings and any("imagined" in m for m in train.data)
        else None
    )
    units = plan_units(train)
    max_steps = cfg.env.max_episode_steps or suite.max_episode_steps
    info = {
        "env": suite.name,
        "encoder": encoder_name(run, cfg.text.encoder),
        "action_space": repr(suite.action_space),
        "gamma": train.gamma,
    }
    init_ray(cfg.ray)
    require_stage_resources(cfg, "train")

    # ---- run ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    # The staging folder is named by the fingerprint and kept if the stage stops or a unit
    # fails, so a rerun of the same config trains only the units not finished there.
    with stage_output(run, plan.out_dir, resume_key=plan.fingerprint) as out:
        mixes, t_data = {}, {}
        for mix in train.data:
            t = time.perf_counter()
            run.delete(out, DATA_DIR, mix)  # the ray engine adds files to a folder, never replaces
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
                asked=asked,
            )
            t_data[mix] = round(time.perf_counter() - t, 2)
            print(
                f"[kalm] train: data {mix!r}: {mixes[mix].rows} rows ({t_data[mix]}s)", flush=True
            )
        done = finished_units(run, out, units)
        print_resuming(
            "train", done=len(done), total=len(units), what="units", where=run.uri_of(out)
        )
        todo = [u for u in units if u.name not in done]
        quick = (
            QuickEvalSpec(
                env=suite.name,
                episodes=train.quick_eval_episodes,
                max_steps=max_steps,
                seed=cfg.seed,
            )
            if train.quick_eval_every
            else None
        )
        common = {
            "train": train,
            "run": run,
            "out_dir": out,
            "mixes": mixes,
            "action_space": suite.action_space,
            "info": info,
            "embeddings": embeddings,
            "quick": quick,
            "master_seed": cfg.seed,
        }
        by_name, failed = dict(done), {}
        # A bar over the units' iterations: units run in Ray workers, whose logs the console
        # does not show, so without it nothing moves between two finished units.
        with show_progress("train", total=len(todo) * train.iterations, unit="it") as board:
            if train.max_concurrent_units == 1:
                outcomes = train_in_driver(todo, **common, progress=board)
            else:
                outcomes = UnitPool(**common, progress=board).imap_unordered(todo)
            for unit, res in outcomes:
                if isinstance(res, BaseException):
                    failed[unit.name] = res
                    print(f"[kalm] train: {unit.name} failed: {one_line(res)}", flush=True)
                    continue
                # Marked only once complete: a unit cut short has no mark and is trained again.
                Staging(run, f"{out}/{unit.name}").mark_finished(POLICY_INFO, res)
                by_name[unit.name] = res
                quick_s = res["quick_success"]
                shown = "" if quick_s is None else f", quick success {quick_s:.2f}"
                print(
                    f"[kalm] train: {len(by_name)}/{len(units)} {unit.name}: "
                    f"{res['wall_s']}s{shown}",
                    flush=True,
                )
        if failed:
            name, err = next(iter(failed.items()))
            raise UnitFailed(
                f"train: unit {name} failed ({one_line(err)}); {len(failed)} of {len(units)} "
                f"units failed, the {len(by_name)} finished are kept in {run.uri_of(out)} and a "
                f"rerun trains only the others"
            )
        results = [by_name[u.name] for u in units]
        for u in units:
            run.delete(out, u.name, Staging.UNITS)

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
                "train_s": round(time.perf_counter() - t0 - sum(t_data.values()), 2),
            },
        )
    write_manifest(run, plan.out_dir, manifest)
    print(
        f"[kalm] train: {len(results)} policies in {manifest.timings['wall_s']}s -> "
        f"{run.uri_of(plan.out_dir)}",
        flush=True,
    )
    return manifest
