"""Scripted experts: ``metaworld.policies`` for single tasks, stage sequencers for composites.

Every expert acts on ``info["raw_obs"]`` (the 39-d Meta-World observation of the current
stage's env, see :meth:`kalm_ray.envs.metaworld.scenes.Scene.raw_obs`). Single-task
experts are Meta-World's own policy objects (``policy.get_action(raw_obs)``); composite
experts also need the stage: ``policy.get_action(raw_obs, stage=info["stage"])``.
:func:`expert_action` does the right call for either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kalm_ray.envs.metaworld.tasks import COMPOSITE_TASKS, check_task

RETREAT = np.array([0.0, -0.1, 0.1])
"""After unlocking, the hand backs off this far before the door-open expert takes over:
door-unlock's expert ends with the fingers pressed into the table under the lever, a pose
from which door-open's expert gets stuck."""
RETREAT_STEPS = 25


def _policy(task: str) -> Any:
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[f"{task}-v3"]()


class CompositeExpert:
    """Runs the two stages' Meta-World experts in order (stateful within an episode).

    Args:
        task: a composite task id (``make-coffee`` or ``locked-door-open``).
    """

    def __init__(self, task: str):
        self.task = task
        first, second = COMPOSITE_TASKS[task]
        self.first, self.second = _policy(first), _policy(second)
        self._waypoint: np.ndarray | None = None
        self._retreat_left = 0

    def get_action(self, obs: np.ndarray, stage: int | None = None) -> np.ndarray:
        """Action for raw observation ``obs`` at ``stage`` (0: first stage, else second)."""
        if stage is None:
            raise ValueError(f"{self.task} expert needs the stage: get_action(obs, stage=...)")
        obs = np.array(obs, dtype=np.float64)  # Meta-World experts write into their input
        if stage == 0:
            self._waypoint = None
            return self.first.get_action(obs)
        if self.task == "locked-door-open":
            if self._waypoint is None:
                self._waypoint, self._retreat_left = obs[:3] + RETREAT, RETREAT_STEPS
            if self._retreat_left > 0 and obs[2] < self._waypoint[2] - 0.02:
                self._retreat_left -= 1
                move = np.clip(25.0 * (self._waypoint - obs[:3]), -1.0, 1.0)
                return np.append(move, 1.0).astype(np.float32)
            self._retreat_left = 0
        return self.second.get_action(obs)


def expert_policy(task: str) -> Any:
    """The scripted expert of ``task`` (any level); raises UnknownChoiceError."""
    check_task(task)
    if task in COMPOSITE_TASKS:
        return CompositeExpert(task)
    return _policy(task)


def expert_action(policy: Any, info: Mapping[str, Any]) -> np.ndarray:
    """``policy``'s action from an env ``info`` (passes the stage to composite experts)."""
    if isinstance(policy, CompositeExpert):
        return policy.get_action(info["raw_obs"], stage=info["stage"])
    return np.asarray(policy.get_action(np.array(info["raw_obs"], dtype=np.float64)))
