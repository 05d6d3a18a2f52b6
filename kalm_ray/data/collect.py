"""The ``collect`` stage: real episodes from scripted behaviour policies, on Ray actors.

``run_collect(cfg, run_dir)`` reads top to bottom:

1. plan: resolve the run dir and fingerprint; return at once if the data are current;
   check the tasks and the text encoder before any work.
2. run: split the episodes into work units (task, episode range) and run them on a
   pool of ``CollectActor`` s; meanwhile a background thread embeds every instruction
   wording of the env.
3. save: one Parquet file per task (sorted by task, episodes in order, fixed row groups)
   into ``data/real/`` atomically, ``data/instructions.parquet``, the dataset card
   (``README.md``), the resolved config, and ``manifest.json`` last.

Every episode's randomness comes from (seed, task index, episode index), and files are
written in a fixed order with fixed settings, so the bytes do not depend on the number
of workers nor on which worker ran which unit.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from kalm_ray.artifacts import Manifest, RunDir, Staging, stage_output, write_manifest
from kalm_ray.config import ExperimentConfig
from kalm_ray.data.card import TaskStats, card_table, dataset_card, total
from kalm_ray.data.collect_actor import CollectorPool, CollectSpec, UnitResult, WorkUnit
from kalm_ray.data.text import (
    INSTRUCTIONS_FILE,
    build_instruction_table,
    encoder_info,
    make_encoder,
    resolve_encoder,
    write_instruction_table,
)
from kalm_ray.envs import LEVELS, Suite, get_suite
from kalm_ray.errors import ConfigError
from kalm_ray.raysetup import init_ray
from kalm_ray.stage import plan_stage

UNIT_EPISODES = 20
"""Episodes per work unit: small enough to balance and to lose little when a worker dies."""
ROW_GROUP_SIZE = 65_536
"""Fixed Parquet row-group size, so file bytes never depend on how rows arrived."""
EPISODE_FILE = "episodes-{:04d}.parquet"
"""One file per task, numbered by the task's index in the suite's train list."""
CARD_ROWS = 20
"""Tasks shown in the terminal summary (the README lists all)."""


def run_collect(cfg: ExperimentConfig, run_dir: RunDir | str | None = None) -> Manifest:
    """Collect ``cfg.collect.episodes_per_task`` episodes per train task into ``data/real/``."""
    plan = plan_stage("collect", cfg, run_dir)
    run = plan.run
    if plan.current is not None and run.exists(*INSTRUCTIONS_FILE):
        print(
            f"[kalm] collect: {run.uri_of(plan.out_dir)} is up to date; nothing to do",
            flush=True,
        )
        return plan.current

    # ---- build: everything that can be wrong is checked before Ray starts ------------------
    suite = get_suite(cfg.env.name)
    tasks = resolve_tasks(suite, cfg.collect.tasks)
    resolve_encoder(cfg.text)
    spec = CollectSpec(
        env=suite.name,
        max_episode_steps=cfg.env.max_episode_steps or suite.max_episode_steps,
        seed=cfg.seed,
        epsilon=cfg.collect.epsilon,
        fail_fraction=cfg.collect.fail_fraction,
        action_noise=cfg.collect.action_noise,
    )
    units = plan_units(
        tasks, episodes_per_task=cfg.collect.episodes_per_task, unit_episodes=UNIT_EPISODES
    )
    n_episodes = sum(u.episodes for u in units)
    init_ray(cfg.ray)

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
        if resumed:
            print(
                f"[kalm] collect: resuming; {len(resumed)} of {len(files.expected)} episode "
                f"files already finished in {run.uri_of(tmp)}",
                flush=True,
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


# ---- helpers (pure or small) ------------------------------------------------------------------


def resolve_tasks(suite: Suite, wanted: list[str] | None) -> list[tuple[int, str]]:
    """``(index in the train list, task)`` pairs to collect, in train-list order.

    Raises ConfigError naming the first task that is not a ``train`` task of ``suite``.
    """
    train = suite.tasks("train")
    if wanted is None:
        return list(enumerate(train))
    index = {t: i for i, t in enumerate(train)}
    for t in wanted:
        if t not in index:
            other = next((lv for lv in LEVELS[1:] if t in suite.tasks(lv)), None)
            why = f"a {other!r} task; only train tasks are collected" if other else "not a task"
            shown = ", ".join(train[:6]) + (
                f", ... ({len(train)} in all)" if len(train) > 6 else ""
            )
            raise ConfigError(
                f"collect.tasks: {t!r} is {why} of env {suite.name!r} "
                f"(train tasks: {shown}; see `kalm envs`)"
            )
    return sorted({(index[t], t) for t in wanted})


def plan_units(
    tasks: list[tuple[int, str]], *, episodes_per_task: int, unit_episodes: int
) -> list[WorkUnit]:
    """Split each task's episodes ``0..episodes_per_task-1`` into consecutive units of at most
    ``unit_episodes``, task by task (the order the driver submits them)."""
    return [
        WorkUnit(task=task, task_index=ti, start=s, stop=min(s + unit_episodes, episodes_per_task))
        for ti, task in tasks
        for s in range(0, episodes_per_task, unit_episodes)
    ]


def embed_instructions(suite: Suite, cfg: ExperimentConfig) -> tuple[pa.Table, float]:
    """The instructions table and the seconds it took, computed beside the collection actors.

    Torch gets only the cores the local actors leave free (at least one): it runs while
    they step their envs, and extra threads would only spin-wait against them.
    """
    import torch

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    local_actors = int(cfg.collect.num_workers * cfg.collect.num_cpus_per_worker)
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - local_actors)))
    try:
        table = build_instruction_table(suite, make_encoder(cfg.text))
    finally:
        torch.set_num_threads(threads)
    return table, time.perf_counter() - t0


def policy_description(cfg: ExperimentConfig) -> str:
    c = cfg.collect
    if cfg.env.name == "clevr":
        random = f"{c.fail_fraction:.0%} of episodes uniformly random"
        return f"scripted pusher, epsilon {c.epsilon}, {random}"
    return f"metaworld.policies expert + Gaussian action noise (sigma {c.action_noise})"


def progress_bar(total_episodes: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total_episodes,
        unit="ep",
        desc="collect",
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
    )


class EpisodeFiles:
    """Writes one Parquet file per task as soon as all of that task's units have arrived.

    Results come in any order; each task's units are put back in episode order before
    writing, so the bytes are the same however the work was scheduled.
    """

    def __init__(self, run: RunDir, folder: str, units: list[WorkUnit]):
        self.run, self.folder = run, folder
        self.expected = Counter(u.task_index for u in units)
        self.names = {u.task_index: u.task for u in units}
        self.buffers: dict[int, dict[int, UnitResult]] = {}
        self._stats: dict[int, TaskStats] = {}
        self.written: list[str] = []
        self.env_steps = 0

    def add(self, result: UnitResult) -> None:
        ti = result.unit.task_index
        buf = self.buffers.setdefault(ti, {})
        buf[result.unit.start] = result
        self.env_steps += result.env_steps
        if len(buf) == self.expected[ti]:
            self._write(ti, [buf[s] for s in sorted(buf)])
            del self.buffers[ti]

    def _write(self, task_index: int, results: list[UnitResult]) -> None:
        table = pa.concat_tables([r.table for r in results]).combine_chunks()
        name = EPISODE_FILE.format(task_index)
        pq.write_table(
            table,
            self.run.path(self.folder, name),
            filesystem=self.run.fs,
            row_group_size=ROW_GROUP_SIZE,
            compression="zstd",
        )
        self.written.append(name)
        lengths = [n for r in results for n in r.lengths]
        self._stats[task_index] = TaskStats(
            task=self.names[task_index],
            episodes=len(lengths),
            env_steps=int(sum(lengths)),
            successes=sum(s for r in results for s in r.successes),
        )
        # Marked only once complete: a file cut short by a kill has no mark and is redone.
        info = {"task": self.names[task_index], **self._stats[task_index].as_dict()}
        Staging(self.run, self.folder).mark_finished(name, info)

    def resume(self) -> set[int]:
        """Take the task files a stopped run finished in this staging folder (marked, and
        unchanged since); returns their task indices, whose units need not run again."""
        done = Staging(self.run, self.folder).finished()
        out = set()
        for ti, task in self.names.items():
            info = done.get(EPISODE_FILE.format(ti))
            if info is None or info.get("task") != task:
                continue
            self._stats[ti] = TaskStats(
                task=task,
                episodes=int(info["episodes"]),
                env_steps=int(info["env_steps"]),
                successes=int(info["successes"]),
            )
            self.written.append(EPISODE_FILE.format(ti))
            out.add(ti)
        return out

    def check_complete(self) -> None:
        missing = sorted(set(self.expected) - set(self._stats))
        if missing:
            raise RuntimeError(f"collect: tasks {[self.names[i] for i in missing]} are incomplete")
        self.written.sort()

    def stats(self) -> list[TaskStats]:
        """Per-task stats in train-list order."""
        return [self._stats[i] for i in sorted(self._stats)]
