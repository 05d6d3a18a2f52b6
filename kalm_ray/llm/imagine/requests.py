"""Generation requests: (level, task, wording, start state, seed, prompt), one row each.

For each target level, ``rollouts_per_level`` requests are spread round-robin over the
level's tasks (optionally a stable sample of ``max_tasks_per_level`` of them); the k-th
request of a task takes wording ``(offset + k) mod n`` of that task (:func:`wording_offsets`).
With at least as many requests per task as it has wordings, every wording of the level is
requested; with fewer, the tasks' windows follow one another, so every wording index (CLEVR:
every template) is used as evenly as the requests allow, and the imagine stage says how many
of the level's wordings its requests use. Start states come from real episodes' first
states or from the env's reset distribution, and only states where the task is meaningful
(the suite's ``valid_start``: the goal does not hold yet, a ball to move has room).
Everything is a deterministic function of the master seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kalm_ray.data import episode_files
from kalm_ray.errors import InputError

if TYPE_CHECKING:
    import ray.data

    from kalm_ray.artifacts import RunDir

REQUEST_COLUMNS: tuple[str, ...] = (
    "request_id",
    "level",
    "task",
    "instruction",
    "start_state",
    "seed",
    "prompt",
)
_SALT = 5  # this stage's stream of the master seed (issue 5)


def request_schema(state_dim: int) -> pa.Schema:
    """Arrow schema of the requests table."""
    return pa.schema(
        [
            ("request_id", pa.string()),
            ("level", pa.string()),
            ("task", pa.string()),
            ("instruction", pa.string()),
            ("start_state", pa.list_(pa.float32(), state_dim)),
            ("seed", pa.int64()),
            ("prompt", pa.string()),
        ]
    )


def level_rng(seed: int, level: str, purpose: str) -> np.random.Generator:
    """A generator for one (level, purpose), independent of every other stream."""
    return np.random.default_rng(
        [seed, _SALT, zlib.crc32(level.encode()), zlib.crc32(purpose.encode())]
    )


def pick_tasks(tasks: list[str], k: int | None, rng: np.random.Generator) -> list[str]:
    """A stable sample of ``k`` tasks, kept in the suite's order (all of them when k is None)."""
    if k is None or k >= len(tasks):
        return list(tasks)
    keep = np.sort(rng.choice(len(tasks), size=k, replace=False))
    return [tasks[i] for i in keep]


class StartSampler(Protocol):
    """Start states for requests of one (level, task), one per seed."""

    def __call__(self, level: str, task: str, seeds: np.ndarray) -> np.ndarray:
        """``(len(seeds), D)`` float32 start states; row i depends only on ``seeds[i]``."""


@dataclass
class ResetStarts:
    """Start states from the env's own reset distribution (``env.reset(seed=s)``)."""

    suite: Any

    def __call__(self, level: str, task: str, seeds: np.ndarray) -> np.ndarray:
        env = self.suite.make_env(level, task)
        try:
            out = [np.asarray(env.reset(seed=int(s))[0], np.float32).reshape(-1) for s in seeds]
        finally:
            env.close()
        states = np.stack(out) if out else np.zeros((0, self.suite.layout.dim), np.float32)
        if states.shape[1] != self.suite.layout.dim:
            raise InputError(
                f"env {self.suite.name}: reset observation has {states.shape[1]} "
                f"values, the state layout {self.suite.layout.dim}"
            )
        return states


@dataclass
class DataStarts:
    """Start states drawn from real episodes' first states (``t == 0`` rows).

    A task present in the real data draws from its own episodes. Any other task draws from
    every real first state when the scene does not depend on the task (no entity slots, e.g.
    CLEVR-Robot), otherwise from ``fallback`` (the env's reset), since another task's scene
    holds other objects.
    """

    by_task: dict[str, np.ndarray]
    fallback: StartSampler | None = None
    task_dependent: bool = False
    pooled: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.pooled = (
            np.concatenate(list(self.by_task.values())) if self.by_task else np.zeros((0, 0))
        )

    valid: Callable[[str, np.ndarray], bool] | None = None
    """``valid_start(task, state)`` of the suite; None = every state is a valid start."""

    MAX_DRAWS = 64
    """Draws from the pool per request before the env's reset is used instead."""

    def __call__(self, level: str, task: str, seeds: np.ndarray) -> np.ndarray:
        pool = self.by_task.get(task)
        if pool is None or not len(pool):
            if self.task_dependent or not len(self.pooled):
                if self.fallback is None:
                    raise InputError(f"no real start state for task {task!r} and no env to reset")
                return self.fallback(level, task, seeds)
            pool = self.pooled
        out = []
        for s in seeds:
            rng = np.random.default_rng(int(s))
            for _ in range(self.MAX_DRAWS):
                state = pool[rng.integers(len(pool))].astype(np.float32)
                if self.valid is None or self.valid(task, state):
                    break
            else:  # no valid state in this many draws: the env's reset makes a valid one
                if self.fallback is None:
                    raise InputError(f"no valid real start state for task {task!r}")
                state = self.fallback(level, task, np.asarray([s]))[0]
            out.append(state)
        return np.stack(out) if out else np.zeros((0, pool.shape[1]), np.float32)


def real_first_states(run: RunDir, folder: str = "data/real") -> dict[str, np.ndarray]:
    """Task -> ``(N, D)`` first states of the real episodes under ``folder``."""
    files = episode_files(run, folder)
    parts = []
    for f in files:
        t = pq.read_table(f, columns=["t", "task", "state"], filesystem=run.fs)
        parts.append(t.filter(pc.equal(t.column("t"), 0)))
    table = pa.concat_tables(parts)
    tasks = np.asarray(table.column("task").to_pylist(), dtype=object)
    col = table.column("state").combine_chunks()
    states = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(
        len(table), -1
    )
    return {task: states[tasks == task] for task in sorted(set(tasks.tolist()))}


def wording_offsets(n_wordings: list[int], n_requests: int, rng: np.random.Generator) -> np.ndarray:
    """Each task's first wording: its k-th request takes wording ``(offset + k) mod n``.

    Requests go round-robin over the tasks, so task j gets ``count_j`` of them. When every
    task gets at least as many requests as it has wordings, every (task, wording) pair is
    requested whatever the offsets, and they are seeded draws. When some get fewer, the tasks
    take consecutive windows of the wording list from one seeded start (task j's window
    begins where task j-1's ended), so the level uses each wording index (CLEVR: each
    template, the same index in every task) as evenly as its requests allow; independent
    offsets would leave templates out by chance.
    """
    n_tasks = len(n_wordings)
    counts = [n_requests // n_tasks + (j < n_requests % n_tasks) for j in range(n_tasks)]
    if all(c >= n for c, n in zip(counts, n_wordings, strict=True)):
        return rng.integers(0, 2**31 - 1, size=n_tasks)
    start = int(rng.integers(0, 2**31 - 1))
    return start + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def level_wordings(
    suite: Any,
    level: str,
    *,
    rollouts_per_level: int,
    max_tasks_per_level: int | None,
    seed: int,
) -> list[tuple[str, str]]:
    """``(task, instruction)`` of each of a level's requests, in request order: round-robin
    over the level's picked tasks, each task's wordings from its offset (:func:`wording_offsets`).
    Needs no start state, so the train stage can tell which wordings imagination was given."""
    tasks = pick_tasks(suite.tasks(level), max_tasks_per_level, level_rng(seed, level, "tasks"))
    if not tasks:
        return []
    offsets = wording_offsets(
        [len(suite.instructions(level, t)) for t in tasks],
        rollouts_per_level,
        level_rng(seed, level, "wordings"),
    )
    out = []
    for i in range(rollouts_per_level):
        k, j = divmod(i, len(tasks))  # the k-th request of task j
        wordings = suite.instructions(level, tasks[j])
        out.append((tasks[j], wordings[(int(offsets[j]) + k) % len(wordings)]))
    return out


def build_requests(
    suite: Any,
    *,
    levels: list[str],
    rollouts_per_level: int,
    max_tasks_per_level: int | None,
    seed: int,
    starts: StartSampler,
    prompt_fn: Callable[[str, np.ndarray], str],
) -> pa.Table:
    """Every request of the stage, in a deterministic order.

    Args:
        suite: the env suite (``tasks(level)``, ``instructions(level, task)``, ``layout``).
        levels: target levels, e.g. ``["rephrase", "easy", "hard"]``.
        rollouts_per_level: requests per level, round-robin over its tasks.
        max_tasks_per_level: stable sample of tasks per level (None = all).
        seed: the master seed.
        starts: start-state sampler.
        prompt_fn: ``(instruction, start_state (D,)) -> prompt``.

    Returns:
        A table with :data:`REQUEST_COLUMNS` (schema :func:`request_schema`).
    """
    dim = suite.layout.dim
    rows: dict[str, list] = {c: [] for c in REQUEST_COLUMNS}
    for level in levels:
        pairs = level_wordings(
            suite,
            level,
            rollouts_per_level=rollouts_per_level,
            max_tasks_per_level=max_tasks_per_level,
            seed=seed,
        )
        if not pairs:
            continue
        seeds = level_rng(seed, level, "seeds").integers(0, 2**31 - 1, size=rollouts_per_level)
        task_of = [t for t, _ in pairs]
        state_of = np.zeros((rollouts_per_level, dim), np.float32)
        for task in dict.fromkeys(task_of):
            idx = np.array([i for i, t in enumerate(task_of) if t == task], dtype=int)
            state_of[idx] = starts(level, task, seeds[idx])
        for i, (task, instruction) in enumerate(pairs):
            rows["request_id"].append(f"{level}-{i:06d}")
            rows["level"].append(level)
            rows["task"].append(task)
            rows["instruction"].append(instruction)
            rows["start_state"].append(state_of[i])
            rows["seed"].append(int(seeds[i]))
            rows["prompt"].append(prompt_fn(instruction, state_of[i]))
    schema = request_schema(dim)
    flat = np.asarray(rows.pop("start_state"), np.float32).reshape(-1)
    arrays = {c: pa.array(v, schema.field(c).type) for c, v in rows.items()}
    arrays["start_state"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    return pa.Table.from_arrays([arrays[c] for c in REQUEST_COLUMNS], schema=schema)


def wording_shortfall(
    table: pa.Table, suite: Any, *, max_tasks_per_level: int | None, seed: int
) -> dict[str, tuple[int, int, int]]:
    """Levels whose requests leave wordings out: ``level -> (used, wordings, needed)``, with
    ``needed`` the ``rollouts_per_level`` that requests each. The level's tasks are those
    :func:`build_requests` picked (with the same arguments), requested or not."""
    out: dict[str, tuple[int, int, int]] = {}
    levels = table.column("level").to_pylist()
    pairs = list(
        zip(
            levels,
            table.column("task").to_pylist(),
            table.column("instruction").to_pylist(),
            strict=True,
        )
    )
    for level in dict.fromkeys(levels):
        tasks = pick_tasks(suite.tasks(level), max_tasks_per_level, level_rng(seed, level, "tasks"))
        n = [len(suite.instructions(level, t)) for t in tasks]
        used = len({(t, w) for lv, t, w in pairs if lv == level})
        if used < sum(n):
            # round-robin: task j's n-th request is request (n - 1) * len(tasks) + j
            needed = max((k - 1) * len(tasks) + j + 1 for j, k in enumerate(n))
            out[level] = (used, sum(n), needed)
    return out


def requests_dataset(table: pa.Table, *, rows_per_block: int) -> ray.data.Dataset:
    """The requests as a Ray Dataset of blocks of ``rows_per_block`` rows.

    One block per generate batch, so that an actor pool spreads the batches over its actors,
    and a batch holds the same requests whatever the number of actors (greedy outputs then
    do not depend on it).
    """
    import ray.data

    step = max(1, rows_per_block)
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
    return ray.data.from_arrow(blocks)


def state_matrix(column: Any, dim: int | None = None) -> np.ndarray:
    """A start-state column of any Arrow list type (or a list of arrays) as ``(N, D)`` float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.Array) and (
        pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type)
    ):
        flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32)
        return flat.reshape(
            len(column), (dim or 0) if not len(column) else (-1 if dim is None else dim)
        )
    values = column.to_pylist() if isinstance(column, pa.Array) else list(column)
    if not values:
        return np.zeros((0, dim or 0), np.float32)
    return np.asarray([np.asarray(v, np.float32).reshape(-1) for v in values], np.float32).reshape(
        len(values), -1
    )
