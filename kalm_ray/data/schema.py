"""The transition schema shared by real and imagined episodes (Parquet, one row per step).

Columns (DESIGN.md): ``episode_id, t, env, task, level, instruction, state, action,
reward, next_state, terminated, truncated, success, source, generator``.

- ``state``/``next_state``: ``fixed_size_list<float32>[state_dim]``.
- ``action``: ``int64`` for discrete suites, ``fixed_size_list<float32>[action_dim]`` otherwise.
- ``terminated``: the task's predicate holds on ``next_state`` (the episode ends there);
  ``truncated``: the step limit was reached without success. Never both.
- ``success``: the predicate on ``next_state`` (equal to ``terminated`` for well-formed data).
- ``source``: ``real`` or ``imagined``; ``generator``: JSON (model id, backend, seed), null
  for real.

Optional, real CLEVR data with ``collect.lookahead``: ``lookahead``,
``fixed_size_list<float32>[n_actions * state_dim]``, the next state of every action from
``state`` (NaN where the behaviour policy did not simulate them).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pyarrow as pa

SOURCES: tuple[str, ...] = ("real", "imagined")


def transition_schema(
    state_dim: int, action_space: gym.Space, *, lookahead: bool = False
) -> pa.Schema:
    """Arrow schema of a suite's transitions (with the optional ``lookahead`` column)."""
    if isinstance(action_space, gym.spaces.Discrete):
        action_type = pa.int64()
    else:
        action_type = pa.list_(pa.float32(), int(np.prod(action_space.shape)))
    vec = pa.list_(pa.float32(), state_dim)
    extra = []
    if lookahead:  # every discrete action's next state, flattened
        extra = [("lookahead", pa.list_(pa.float32(), int(action_space.n) * state_dim))]
    return pa.schema(
        [
            ("episode_id", pa.string()),
            ("t", pa.int32()),
            ("env", pa.string()),
            ("task", pa.string()),
            ("level", pa.string()),
            ("instruction", pa.string()),
            ("state", vec),
            ("action", action_type),
            ("reward", pa.float32()),
            ("next_state", vec),
            ("terminated", pa.bool_()),
            ("truncated", pa.bool_()),
            ("success", pa.bool_()),
            ("source", pa.string()),
            ("generator", pa.string()),
            *extra,
        ]
    )


@dataclass
class Episode:
    """One episode in memory, before it becomes rows.

    Attributes:
        states: ``(T + 1, state_dim)`` float32, the start state then one state per step.
        actions: ``(T,)`` int64 or ``(T, action_dim)`` float32.
        rewards: ``(T,)`` float32.
        successes: ``(T,)`` bool, the predicate on each step's next state.
        terminated: the episode ended because the goal held at its last step.
        truncated: the episode ended at the step limit without success.
    """

    episode_id: str
    env: str
    task: str
    level: str
    instruction: str
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    successes: np.ndarray
    terminated: bool
    truncated: bool
    source: str = "real"
    generator: str | None = None
    lookahead: np.ndarray | None = None
    """``(T, n_actions, state_dim)``: each action's next state from each step's state."""

    def __post_init__(self) -> None:
        n = len(self.actions)
        if self.states.shape[0] != n + 1 or len(self.rewards) != n or len(self.successes) != n:
            raise ValueError(f"episode {self.episode_id}: inconsistent lengths")
        if self.terminated and self.truncated:
            raise ValueError(f"episode {self.episode_id}: terminated and truncated at once")
        if self.source not in SOURCES:
            raise ValueError(f"episode {self.episode_id}: source {self.source!r} not in {SOURCES}")

    def __len__(self) -> int:
        return len(self.actions)


def episodes_to_table(episodes: list[Episode], schema: pa.Schema) -> pa.Table:
    """Rows of many episodes, in order. ``terminated``/``truncated`` mark only the last step."""
    state_dim = schema.field("state").type.list_size
    discrete = pa.types.is_integer(schema.field("action").type)
    cols: dict[str, list] = {name: [] for name in schema.names}
    for ep in episodes:
        n = len(ep)
        last = np.zeros(n, dtype=bool)
        if n:
            last[-1] = True
        cols["episode_id"] += [ep.episode_id] * n
        cols["t"] += list(range(n))
        for name in ("env", "task", "level", "instruction", "source", "generator"):
            cols[name] += [getattr(ep, name)] * n
        cols["state"].append(np.asarray(ep.states[:-1], dtype=np.float32).reshape(n, state_dim))
        cols["next_state"].append(np.asarray(ep.states[1:], dtype=np.float32).reshape(n, state_dim))
        cols["action"].append(np.asarray(ep.actions, dtype=np.int64 if discrete else np.float32))
        cols["reward"].append(np.asarray(ep.rewards, dtype=np.float32))
        cols["success"].append(np.asarray(ep.successes, dtype=bool))
        cols["terminated"].append(last & ep.terminated)
        cols["truncated"].append(last & ep.truncated)
        if "lookahead" in cols:
            cols["lookahead"].append(np.asarray(ep.lookahead, np.float32).reshape(n, -1))
    arrays = []
    for f in schema:
        v = cols[f.name]
        if f.name in ("state", "next_state", "lookahead") or (
            f.name == "action" and not discrete
        ):
            flat = np.concatenate(v).reshape(-1) if v else np.zeros(0, np.float32)
            arrays.append(
                pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), f.type.list_size)
            )
        elif f.name in ("action", "reward", "success", "terminated", "truncated"):
            arrays.append(pa.array(np.concatenate(v) if v else [], f.type))
        else:
            arrays.append(pa.array(v, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def column_matrix(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size-list column as a ``(rows, width)`` numpy array (no Python loop)."""
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, width
    )
