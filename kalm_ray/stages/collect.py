"""The ``collect`` stage: real episodes from scripted behaviour policies, on Ray actors.

Reads the env suite only (``cfg.env``, ``cfg.collect``, ``cfg.text``); writes ``data/real/``
(one Parquet file of transitions per train task, the dataset card ``README.md``, the
resolved config, ``manifest.json`` last) and ``data/instructions.parquet`` (every wording
of the env and its embedding).

``run_collect(cfg, run_dir)`` reads top to bottom:

1. plan: resolve the run dir and fingerprint; return at once if the data are current;
   check the tasks and the text encoder before any work.
2. run: split the episodes into work units (task, episode range) and run them on a
   pool of collection actors (:class:`~kalm_ray.data.collect_actor.CollectorPool`);
   meanwhile a background thread embeds every instruction wording of the env.
3. save: one Parquet file per task (sorted by task, episodes in order, fixed row groups)
   into ``data/real/`` atomically, the instructions table, the card, the config, and the
   manifest last.

Every episode's randomness comes from (seed, task index, episode index), and files are
written in a fixed order with fixed settings, so the bytes do not depend on the number
of workers nor on which worker ran which unit. The machinery is in
:mod:`kalm_ray.data.collect` (units, per-task files) and :mod:`kalm_ray.data.collect_actor`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from kalm_ray.artifacts import Manifest, RunDir, stage_output, write_manifest
from kalm_ray.config import ExperimentConfig
from kalm_ray.data.card import card_table, dataset_card, total
from kalm_ray.data.collect import (
    CARD_ROWS,
    UNIT_EPISODES,
    EpisodeFiles,
    embed_instructions,
    plan_units,
    policy_description,
    progress_bar,
    resolve_tasks,
)
from kalm_ray.data.collect_actor import CollectorPool, CollectSpec
from kalm_ray.data.text import (
    INSTRUCTIONS_FILE,
    encoder_info,
    resolve_encoder,
    write_instruction_table,
)
from kalm_ray.envs import LEVELS, get_suite
from kalm_ray.raysetup import init_ray
from kalm_ray.stage import plan_stage, print_resuming, require_stage_resources


def run_collect(cfg: ExperimentConfig, run_dir: RunDir | str | None = None) -> Manifest:
    """Collect ``cfg.collect.episodes_per_task`` episodes per train task into ``data/real/``."""
    suite = get_suite(cfg.env.name)
    # Refused before the run dir is claimed (plan_stage claims it once inputs pass).
    tasks = resolve_tasks(suite, cfg.collect.tasks)
    resolve_encoder(cfg.text)
    plan = plan_stage("collect", cfg, run_dir)
    run = plan.run
    if plan.current is not None and run.exists(*INSTRUCTIONS_FILE):
        print(
            f"[kalm] collect: {run.uri_of(plan.out_dir)} is up to date; nothing to do",
            flush=True,
        )
        return plan.current

    # ---- build: everything that can be wrong is checked before Ray starts ------------------
    spec = CollectSpec(
        env=suite.name,
        max_episode_steps=cfg.env.max_episode_steps or suite.max_episode_steps,
        seed=cfg.seed,
        epsilon=cfg.collect.epsilon,
        fail_fraction=cfg.collect.fail_fraction,
        action_noise=cfg.collect.action_noise,
        lookahead=cfg.collect.lookahead,
    )
    units = plan_units(
        tasks, episodes_per_task=cfg.collect.episodes_per_task, unit_episodes=UNIT_EPISODES
    )
    n_episodes = sum(u.episodes for u in units)
    init_ray(cfg.ray)
    require_stage_resources(cfg, "collect")

    # ---- run ---------------------------------------------------------------------------------
    t_start = time.perf_counter()
    # The staging folder is named by the fingerprint and kept if the stage is stopped, so a
    # rerun of the same config keeps the episode files already finished there (issue 19).
    with (
        stage_output(run, plan.out_dir, resume_key=plan.fingerprint) as tmp,
        ThreadPoolExecutor(1, thread_name_prefix="kalm-embed") as bg,
    ):
        # Embedding the wordings needs no simulator: overlap it with collection.
        embedded = bg.submit(embed_instructions, suite, cfg)
        files = EpisodeFiles(run, tmp, units)
        resumed = files.resume()
        print_resuming(
            "collect",
            done=len(resumed),
            total=len(files.expected),
            what="episode files",
            where=run.uri_of(tmp),
        )
        todo = [u for u in units if u.task_index not in resumed]
        pool = CollectorPool(
            spec,
            num_workers=cfg.collect.num_workers,
            num_cpus_per_worker=cfg.collect.num_cpus_per_worker,
        )
        try:
            with progress_bar(n_episodes) as bar:
                bar.update(n_episodes - sum(u.episodes for u in todo))
                for result in pool.imap_unordered(todo):
                    files.add(result)
                    elapsed = time.perf_counter() - t_start
                    bar.update(result.unit.episodes)
                    bar.set_postfix_str(
                        f"{files.env_steps / max(elapsed, 1e-9):,.0f} env steps/s", refresh=False
                    )
        finally:
            restarts = pool.restarts
            pool.shutdown()
        t_collect = time.perf_counter() - t_start
        files.check_complete()
        if not embedded.done():  # it can outlast a short collection by ~30 s on 2 cores
            print(
                f"[kalm] collect: {n_episodes} episodes in {t_collect:.0f} s; still "
                "embedding the instruction wordings (started beside the collection)",
                flush=True,
            )
        instructions, t_embed = embedded.result()
        encoder_name, embedding_dim = encoder_info(instructions)

        # ---- save --------------------------------------------------------------------------
        write_instruction_table(run, instructions)
        stats = files.stats()
        card = dataset_card(
            stats,
            env=suite.name,
            policy=policy_description(cfg),
            facts={
                "seed": str(cfg.seed),
                "episode limit": f"{spec.max_episode_steps} steps",
                "instructions": f"{instructions.num_rows} wordings over {len(LEVELS)} levels, "
                f"embedded by {encoder_name} ({embedding_dim}-d), in `data/instructions.parquet`",
                "files": f"{len(files.written)} Parquet files, one per task",
            },
        )
        run.write_text(card, tmp, "README.md")
        plan.save_config(tmp)
        all_ = total(stats)
        wall = time.perf_counter() - t_start
        manifest = plan.manifest(
            counts={
                "episodes": all_.episodes,
                "env_steps": all_.env_steps,
                "successes": all_.successes,
                "success_rate": round(all_.success_rate, 4),
                "tasks": len(stats),
                "per_task": {s.task: s.as_dict() for s in stats},
                "files": files.written,
                "instructions": instructions.num_rows,
                "encoder": encoder_name,
                "embedding_dim": embedding_dim,
                "num_workers": cfg.collect.num_workers,
                "worker_restarts": restarts,
                "resumed_files": len(resumed),
            },
            timings={
                "wall_s": round(wall, 3),
                "collect_s": round(t_collect, 3),
                "env_steps_per_s": round(all_.env_steps / max(t_collect, 1e-9), 1),
                "instructions_s": round(t_embed, 3),
            },
        )
    write_manifest(run, plan.out_dir, manifest, also=("/".join(INSTRUCTIONS_FILE),))
    print(
        f"[kalm] collect: {all_.episodes} episodes, {all_.env_steps} env steps, "
        f"success {all_.success_rate:.1%}, "
        f"{wall:.1f}s -> {run.uri_of(plan.out_dir)}",
        flush=True,
    )
    print(card_table(stats, limit=CARD_ROWS), flush=True)
    return manifest
