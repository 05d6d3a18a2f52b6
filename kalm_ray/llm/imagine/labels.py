"""Labels of imagined rollouts, from each rollout's own states.

The reference generator labelled every rollout of a batch with the first rollout's reward
and success (ENVS_SPEC.md, known defects). Here each rollout is labelled alone, with the
target task's success predicate and dense reward evaluated on its own states and its own
start state, exactly as the suite labels real episodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# goal_reached: re-exported for llm/imagine/backends/stepwise.py (and tests/test_grammar.py).
from kalm_ray.envs.success import goal_reached, success_flags  # noqa: F401


@dataclass(frozen=True)
class Labels:
    """Labels of one rollout, already cut at its first success.

    Attributes:
        states: ``(T + 1, D)`` float32, the rollout up to and including the first state in
            which the goal holds (or all of it when it never does).
        actions: ``(T,)`` int64 or ``(T, A)`` float32, cut the same way.
        rewards: ``(T,)`` float32, ``suite.reward(task, start, s_t, s_{t+1})``.
        successes: ``(T,)`` bool, the suite's success rule at ``s_{t+1}``
            (:func:`kalm_ray.envs.success.success_flags`: the stage order of composite
            tasks enforced); only the last may be true.
        terminated: the goal holds at the last state (the episode ends there, no bootstrap).
    """

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    successes: np.ndarray
    terminated: bool

    @property
    def truncated(self) -> bool:
        """The rollout ended without the goal holding (the step limit, or the model stopped
        early); not terminal, so a learner bootstraps from the last state."""
        return not self.terminated

    @property
    def n_steps(self) -> int:
        return len(self.actions)


def label_rollout(suite: Any, task: str, states: np.ndarray, actions: np.ndarray) -> Labels:
    """Reward, success, terminated and truncated of one rollout for ``task``.

    Args:
        suite: the env suite (``success(task, start, state)``, ``reward(task, start, s, s2)``;
            for composite tasks ``COMPOSITE_TASKS`` and ``advance_stage``, see
            :mod:`kalm_ray.envs.success`).
        task: the task id the rollout was imagined for.
        states: ``(T + 1, D)`` env units; ``states[0]`` is the start state, T >= 1.
        actions: ``(T,)`` or ``(T, A)``.

    Returns:
        :class:`Labels`, cut after the first step whose next state satisfies the predicate.
    """
    states = np.asarray(states, dtype=np.float32)
    if states.ndim != 2 or len(states) < 2 or len(actions) != len(states) - 1:
        raise ValueError(
            f"label_rollout: need (T+1, D) states and T actions, got "
            f"{states.shape} and {len(actions)}"
        )
    start = states[0]
    n = len(actions)
    rewards = np.zeros(n, np.float32)
    successes = success_flags(suite, task, states)[1:]
    for t in range(n):
        rewards[t] = suite.reward(task, start, states[t], states[t + 1])
        if successes[t]:
            n = t + 1
            break
    done = bool(successes[n - 1])
    return Labels(
        states=states[: n + 1],
        actions=np.asarray(actions)[:n],
        rewards=rewards[:n],
        successes=successes[:n],
        terminated=done,
    )


JUDGED_COLUMNS: tuple[str, ...] = (
    "accepted",
    "reason",
    "detail",
    "repairs",
    "n_steps",
    "success",
    "terminated",
    "truncated",
    "states",
    "actions",
    "rewards",
    "successes",
)
"""Columns :func:`judge_batch` adds to each generated request (lists are flattened)."""


def judge_batch(
    batch: Any,
    *,
    decoder: Any,
    env: str,
    limits: Any,
    max_steps: int,
    level_max_steps: dict[str, int] | None = None,
) -> Any:
    """Ray Data ``map_batches`` function: decode, filter and label every generated text.

    Args:
        batch: ``pyarrow.Table`` with the request columns and ``generated_text``.
        decoder: the codec (``decode_rollout``).
        env: suite name (the suite is looked up in the worker).
        limits: :class:`~kalm_ray.llm.imagine.filter.FilterLimits`.
        max_steps: episode limit.
        level_max_steps: a shorter limit per level (CLEVR ``easy``: one push).

    Returns:
        The batch without ``prompt``, plus :data:`JUDGED_COLUMNS`; ``generated_text`` is kept
        for rejected rollouts only (the report shows examples), empty otherwise.
    """
    import pyarrow as pa

    from kalm_ray.envs import get_suite
    from kalm_ray.llm.imagine.filter import check_text
    from kalm_ray.llm.imagine.requests import state_matrix

    suite = get_suite(env)
    texts = batch.column("generated_text").to_pylist()
    tasks = batch.column("task").to_pylist()
    levels = (
        batch.column("level").to_pylist()
        if "level" in batch.column_names
        else [None] * batch.num_rows
    )
    starts = state_matrix(batch.column("start_state"), suite.layout.dim)
    cols: dict[str, list] = {c: [] for c in JUDGED_COLUMNS}
    kept_text = []
    for text, task, level, start in zip(texts, tasks, levels, starts, strict=True):
        limit = (level_max_steps or {}).get(level, max_steps)
        v = check_text(decoder, start, text, limits=limits, max_steps=limit)
        lab = label_rollout(suite, task, v.states, v.actions) if v.accepted else None
        cols["accepted"].append(v.accepted)
        cols["reason"].append(v.reason or "")
        cols["detail"].append(v.detail)
        cols["repairs"].append(v.repairs)
        cols["n_steps"].append(lab.n_steps if lab else 0)
        cols["success"].append(bool(lab and lab.terminated))
        cols["terminated"].append(bool(lab and lab.terminated))
        cols["truncated"].append(bool(lab and lab.truncated))
        for name in ("states", "actions", "rewards", "successes"):
            value = getattr(lab, name) if lab else np.zeros(0)
            cols[name].append(np.asarray(value, np.float32).reshape(-1))
        kept_text.append("" if v.accepted else str(text)[:2000])
    types = {
        "accepted": pa.bool_(),
        "reason": pa.string(),
        "detail": pa.string(),
        "repairs": pa.int64(),
        "n_steps": pa.int64(),
        "success": pa.bool_(),
        "terminated": pa.bool_(),
        "truncated": pa.bool_(),
    }
    out = batch.drop_columns([c for c in ("prompt", "generated_text") if c in batch.column_names])
    out = out.append_column("generated_text", pa.array(kept_text, pa.string()))
    for name in JUDGED_COLUMNS:
        typ = types.get(name) or pa.list_(pa.float32())
        out = out.append_column(name, pa.array(cols[name], typ))
    return out
