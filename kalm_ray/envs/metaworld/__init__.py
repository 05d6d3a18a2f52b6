"""The Meta-World suite (see :mod:`kalm_ray.envs.suite` for the contract).

Twenty Meta-World v3 tasks and two composite ones, all behind one 91-d entity-slot state
(:mod:`~kalm_ray.envs.metaworld.slots`), with success predicates and dense rewards over
states alone (:mod:`~kalm_ray.envs.metaworld.tasks`). Importing this module is light
(numpy, gymnasium spaces, yaml): ``metaworld`` and MuJoCo are only loaded by
:func:`make_env` and :func:`expert_policy`.

Levels: train = reach, push, pick-place, button-press, door-unlock, door-open,
window-open, faucet-open, coffee-push, coffee-button; rephrase = the same ten in unseen
wordings; easy = reach-wall, push-wall, pick-place-wall, button-press-wall, door-lock,
door-close, window-close, faucet-close; hard = make-coffee (coffee-push then the coffee
button), locked-door-open (door-unlock then door-open), hammer, soccer.

Scripted experts act on ``info["raw_obs"]``; use :func:`expert_action` (composite experts
need ``info["stage"]`` too). For composite tasks, label whole trajectories with
:func:`trajectory_success` to enforce stage order; :func:`success` alone judges one state.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from kalm_ray.envs.metaworld.slots import ENTITIES, LAYOUT
from kalm_ray.envs.metaworld.tasks import (
    COMPOSITE_TASKS,
    advance_stage,
    gaps,
    reward,
    success,
    tasks,
    trajectory_success,
)
from kalm_ray.envs.metaworld.wordings import instructions

name = "metaworld"
gym_id = "kalm_ray/MetaWorld-v0"
max_episode_steps = 150
layout = LAYOUT
action_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)


def level_max_steps(level: str) -> int:
    """Steps per episode at ``level`` (the same at every Meta-World level)."""
    return max_episode_steps


def parts(task: str) -> list[str]:
    """Every task is its own single part. The two composite hard tasks are not split: their
    stages must happen in order in one scene, and each stage's training task has a scene of
    its own, so "the first part that does not hold in this state" is not defined for them."""
    return [task]


def make_env(level: str, task: str | None = None, **kwargs: Any) -> gym.Env:
    """A fresh :class:`~kalm_ray.envs.metaworld.env.MetaWorldEnv` (not wrapped).

    ``kwargs``: ``max_episode_steps`` (default 150), ``render_mode``.
    """
    from kalm_ray.envs.metaworld.env import MetaWorldEnv

    kwargs.setdefault("max_episode_steps", max_episode_steps)
    return MetaWorldEnv(level=level, task=task, **kwargs)


def expert_policy(task: str) -> Any:
    """Scripted expert of ``task``: ``metaworld.policies`` for single tasks (call
    ``get_action(info["raw_obs"])``), a stage sequencer for composite ones."""
    from kalm_ray.envs.metaworld.experts import expert_policy as _expert_policy

    return _expert_policy(task)


def expert_action(policy: Any, info: dict[str, Any]) -> np.ndarray:
    """``policy``'s action from an env step's ``info`` (works for every task)."""
    from kalm_ray.envs.metaworld.experts import expert_action as _expert_action

    return _expert_action(policy, info)
