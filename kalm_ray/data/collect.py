"""Machinery of the ``collect`` stage (:mod:`kalm_ray.stages.collect`): which tasks and work
units to collect, the instruction embeddings computed beside the actors, and the per-task
episode files written as the units arrive (:class:`EpisodeFiles`).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from kalm_ray.artifacts import RunDir, Staging
from kalm_ray.config import ExperimentConfig
from kalm_ray.data.card import TaskStats
from kalm_ray.data.collect_actor import UnitResult, WorkUnit
from kalm_ray.data.text import build_instruction_table, make_encoder
from kalm_ray.envs import LEVELS, Suite
from kalm_ray.errors import ConfigError

UNIT_EPISODES = 20
"""Episodes per work unit: small enough to balance and to lose little when a worker dies."""
ROW_GROUP_SIZE = 65_536
"""Fixed Parquet row-group size, so file bytes never depend on how rows arrived."""
EPISODE_FILE = "episodes-{:04d}.parquet"
"""One file per task, numbered by the task's index in the suite's train list."""
CARD_ROWS = 20
"""Tasks shown in the terminal summary (the README lists all)."""


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
                f"(train tasks: {shown}; all: `kalm envs --tasks`)"
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
