"""The ``evaluate`` stage: every trained policy on every level, in one pass over a pool of Ray
actors.

Reads ``policy/*/`` (exported policies; with ``evaluate.llm_policy`` also ``model/``) and
``data/instructions.parquet`` (wording embeddings); writes ``eval/results.json``,
``eval/episodes.parquet`` (one row per policy and episode), ``eval/headline.md``,
``eval/report.md`` and its plots, the resolved config and ``manifest.json`` last.

``run_evaluate(cfg, run_dir)`` reads top to bottom:

1. plan: return at once if ``eval/`` is current.
2. build: the episode specs (every policy meets the same ones: paired evaluation), the
   policies, the embeddings, and the work units (policy, chunk of specs), ordered policy by
   policy so an actor mostly reuses the policy it has cached.
3. run: the units not finished by a stopped run, on a pool of evaluation actors
   (:class:`~kalm_ray.eval.eval_actor.EvalPool`); results are keyed by (policy, spec index),
   and each finished unit is saved for a resumed run.
4. save: results, episodes table, headline, report, config, then the manifest.

The machinery (policies, units, the resume store) is in :mod:`kalm_ray.eval.evaluate`.
"""

from __future__ import annotations

import functools
import logging
import time

from kalm_ray.artifacts import Manifest, RunDir, stage_output, write_manifest
from kalm_ray.config import ExperimentConfig
from kalm_ray.envs import get_suite
from kalm_ray.errors import KalmError
from kalm_ray.eval.episodes import build_episode_specs, specs_digest
from kalm_ray.eval.evaluate import (
    RANDOM_POLICY,
    UnitStore,
    episodes_parquet,
    evaluate_units,
    find_policies,
    llm_policy_id,
    load_policy_or_random,
    make_suite_env,
    make_units,
    obs_builder,
    policy_loader,
    pool_size,
    wording_embeddings,
)
from kalm_ray.eval.results import build_results, headline_markdown
from kalm_ray.stage import plan_stage, print_resuming, require_stage_resources

log = logging.getLogger("kalm_ray")


def run_evaluate(cfg: ExperimentConfig, run_dir: RunDir | str | None) -> Manifest:
    """Evaluate every policy under ``policy/`` on ``cfg.evaluate.levels``; skipped when current."""
    plan = plan_stage("evaluate", cfg, run_dir)
    if plan.current is not None:
        return plan.current
    run, ev = plan.run, cfg.evaluate
    t0 = time.perf_counter()

    # ---- build: episode specs, policies, embeddings, work units ---------------------------
    suite = get_suite(cfg.env.name)
    specs = build_episode_specs(cfg, suite)
    if not specs:
        raise KalmError(f"evaluate.levels {ev.levels}: no tasks to evaluate")
    policies = find_policies(run, env=cfg.env.name)
    if ev.llm_policy:
        policies.append(llm_policy_id(run, cfg))
    if ev.random_baseline:
        policies.append(RANDOM_POLICY)
    embeddings = wording_embeddings(run, specs)
    size = ev.episodes_per_unit or 4 * ev.envs_per_worker
    units = make_units(policies, specs, run=run, size=size)

    from kalm_ray.raysetup import init_ray

    init_ray(cfg.ray)
    require_stage_resources(cfg, "evaluate")
    import ray

    num_workers = pool_size(
        ev.num_workers,
        available_cpus=ray.available_resources().get("CPU", 0.0),
        num_cpus_per_worker=ev.num_cpus_per_worker,
        n_units=len(units),
    )
    max_steps = cfg.env.max_episode_steps or suite.max_episode_steps
    worker_kwargs = {
        "make_env": functools.partial(make_suite_env, cfg.env.name, max_steps),
        "load_policy": functools.partial(
            load_policy_or_random, loader=policy_loader(), action_space=suite.action_space
        ),
        "make_obs": obs_builder(),
        "embeddings": ray.put(embeddings),
        "n_envs": ev.envs_per_worker,
        "max_steps": max_steps,
    }
    t_build = time.perf_counter() - t0

    # ---- run: one pass over the pool, results keyed by (policy, spec index) ---------------
    # The staging folder is named by the fingerprint and kept if the stage is stopped: each
    # finished work unit's episodes are saved there, so a rerun runs only the others.
    with stage_output(run, plan.out_dir, resume_key=plan.fingerprint) as tmp:
        store = UnitStore(run, tmp)
        resumed = store.resume(units)
        print_resuming(
            "evaluate",
            done=len(resumed),
            total=len(units),
            what="work units",
            where=run.uri_of(tmp),
        )
        t1 = time.perf_counter()
        outcomes, replaced = evaluate_units(
            [u for u in units if u.uid not in resumed],
            worker_kwargs,
            num_workers=num_workers,
            num_cpus=ev.num_cpus_per_worker,
            done=resumed,
            on_unit=store.save,
        )
        t_run = time.perf_counter() - t1
        missing = [
            (p.name, s.index) for p in policies for s in specs if s.index not in outcomes[p.name]
        ]
        if missing:
            raise KalmError(
                f"evaluation lost {len(missing)} episodes (first: {missing[0]}); "
                f"rerun `{run.command('evaluate')}`"
            )
        ordered = {p.name: [outcomes[p.name][s.index] for s in specs] for p in policies}
        n_episodes = len(specs) * len(policies)
        log.info(
            "evaluated %d episodes in %.1fs (%.1f episodes/s, %d workers, %d replaced)",
            n_episodes,
            t_run,
            n_episodes / t_run,
            num_workers,
            replaced,
        )

        # ---- save: results, episodes table, headline, report ---------------------------
        t2 = time.perf_counter()
        meta = {
            "env": cfg.env.name,
            "n_specs": len(specs),
            "specs_digest": specs_digest(specs),
            "seed": cfg.seed,
            "max_steps": max_steps,
        }
        results = build_results(specs, ordered, policies, meta=meta)
        from kalm_ray.eval.report import write_report

        store.clear()
        run.write_json(results, tmp, "results.json")
        run.write_bytes(episodes_parquet(specs, ordered), tmp, "episodes.parquet")
        run.write_text(headline_markdown(results), tmp, "headline.md")
        plan.save_config(tmp)
        try:
            write_report(run, eval_dir=tmp)
        except Exception as e:  # noqa: BLE001 - a plotting failure must not discard the results
            log.warning(
                "eval report failed (%s: %s); fix it and run `kalm report %s`",
                type(e).__name__,
                e,
                run.uri,
            )
    manifest = plan.manifest(
        counts={
            "policies": len(policies),
            "episodes": n_episodes,
            "episodes_per_policy": len(specs),
            "workers": num_workers,
            "actors_replaced": replaced,
            "episodes_per_s": round(n_episodes / max(t_run, 1e-9), 2),
            "resumed_units": len(resumed),
        },
        timings={"build_s": t_build, "run_s": t_run, "save_s": time.perf_counter() - t2},
    )
    write_manifest(run, plan.out_dir, manifest)
    return manifest
