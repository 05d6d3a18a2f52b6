"""The contract every environment suite (CLEVR-Robot, Meta-World) fulfils.

A *suite* is everything the rest of kalm_ray needs to know about one environment
family without running a simulator: its task list per level, success predicates
and dense rewards over states alone, state bounds for the LLM codec, and the
instruction wordings. Only `make_env` touches MuJoCo.

Task ids are stable strings (e.g. ``left:red:blue``), unique within a suite; the
same task id may appear at two levels (``train`` and ``rephrase`` share goals),
the wordings then differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

LEVELS: tuple[str, ...] = ("train", "rephrase", "easy", "hard")
"""Task levels, in the order reports show them. Only ``train`` is in real data."""

NOVEL_LEVELS: tuple[str, ...] = ("rephrase", "easy", "hard")


class UnknownChoiceError(ValueError):
    """A name (env, level, task) that is not one of the valid choices.

    The message is one line naming the valid choices, fit for the CLI.
    """

    def __init__(self, kind: str, value: object, choices: list[str] | tuple[str, ...]):
        shown = list(choices)
        more = "" if len(shown) <= 12 else f", ... ({len(shown)} in all)"
        super().__init__(
            f"unknown {kind} {value!r}; valid choices: {', '.join(map(str, shown[:12]))}{more}"
        )


@dataclass(frozen=True)
class StateLayout:
    """Per-dimension facts about a suite's state vector.

    Attributes:
        names: one name per dimension, e.g. ``red.x`` or ``gripper.z``.
        low, high: bounds from the environment spec (not from data), float32,
            shape ``(state_dim,)``; the codec normalises with these.
        max_step_delta: largest physically possible change of each dimension
            in one env step (same units), used to reject impossible imagined steps.
        entities: for entity-slot states, entity name -> slice of dimensions;
            an entity whose dimensions are all zero is absent. Empty for CLEVR.
        reach_low, reach_high: where a value can be *after it moved* (CLEVR: the walls keep
            ball centres inside [-0.47, 0.47] x [-0.17, 0.57], while a start may lie closer
            to a wall); None = ``low``/``high``. The validity filter rejects a value that
            moved in a step and ends outside these.
        max_step_total: largest sum over objects of each object's displacement (L2 norm
            over ``object_dims`` consecutive dimensions) in one step; None = no such limit.
            Why: ``max_step_delta`` bounds one coordinate, so a step that moves *every*
            object by that much stays within it although no push can do that.
        object_dims: dimensions per object for ``max_step_total`` (CLEVR: x, y).
        min_object_gap: smallest distance between two objects' positions (``object_dims``
            consecutive dimensions each) in a state the filter accepts; None = no such
            limit. Why: a world model that has not learnt collisions writes a pushed ball
            into another one, a step the per-value and summed limits above cannot see
            (CLEVR: balls 0.26 wide, closer seen from above only while one rides up on
            another, rarely).
        fixed: ``(state_dim,)`` bool, dimensions no step can change (a goal, a static body,
            the axes a slide or hinge joint holds still); under delta coding a step does not
            write them. None = every dimension can change.
    """

    names: tuple[str, ...]
    low: np.ndarray
    high: np.ndarray
    max_step_delta: np.ndarray
    entities: dict[str, slice] = field(default_factory=dict)
    reach_low: np.ndarray | None = None
    reach_high: np.ndarray | None = None
    max_step_total: float | None = None
    object_dims: int = 1
    min_object_gap: float | None = None
    fixed: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return len(self.names)


@runtime_checkable
class Suite(Protocol):
    """What every environment suite module exposes (see ``kalm_ray.envs.get_suite``)."""

    name: str
    """Short env name used in configs and data: ``clevr`` or ``metaworld``."""
    gym_id: str
    """Gymnasium id, e.g. ``kalm_ray/CLEVRRobot-v0``."""
    layout: StateLayout
    action_space: gym.Space
    """``Discrete(40)`` for CLEVR, ``Box(-1, 1, (4,))`` for Meta-World."""
    max_episode_steps: int
    # Optional: ``action_factors``, a discrete action as a mixed-radix number, most
    # significant part first (CLEVR: ``(("ball", 5), ("direction", 8))``); the grounding
    # metrics then also score each part given the ones before it.

    def level_max_steps(self, level: str) -> int:
        """Steps per episode at ``level`` (CLEVR ``easy``: one push); envs of that level
        truncate there, and imagined rollouts of it are that long at most."""

    def tasks(self, level: str) -> list[str]:
        """All task ids of a level, in a stable order. Raises UnknownChoiceError."""

    def success(self, task: str, start: np.ndarray, state: np.ndarray) -> bool:
        """Whether ``task`` holds in ``state``; ``start`` is the episode's first state.

        Pure function of states, so imagined rollouts can be labelled offline.
        """

    def reward(
        self, task: str, start: np.ndarray, state: np.ndarray, next_state: np.ndarray
    ) -> float:
        """Dense reward of the step ``state -> next_state`` for ``task``."""

    def parts(self, task: str) -> list[str]:
        """The ``train`` tasks whose conjunction is ``task`` (CLEVR: a hard multi-relation
        goal's relations), else ``[task]``. ``imagine.compose`` reads it."""

    def instructions(self, level: str, task: str) -> list[str]:
        """Every wording of ``task`` at ``level`` (non-empty, deterministic order)."""

    def make_env(self, level: str, task: str | None = None, **kwargs) -> gym.Env:
        """A fresh gymnasium env for ``level``; ``task=None`` samples a task per reset."""
