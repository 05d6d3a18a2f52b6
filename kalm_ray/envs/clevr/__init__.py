"""The CLEVR-Robot suite (see :mod:`kalm_ray.envs.suite` for the contract).

Five balls pushed one at a time on a walled table; goals are spatial relations between
balls. Importing this module is light (numpy + gymnasium spaces): MuJoCo is only loaded
by :func:`make_env` and :mod:`kalm_ray.envs.clevr.scripted`.

State layout: ``red.x, red.y, blue.x, ..., cyan.y`` (metres).

- Bounds are the wall planes, x in [-0.6, 0.6] and y in [-0.3, 0.7]. A ball centre can
  never cross a wall plane (it would have to sink 0.13 into it), and this box holds both
  the start region (x in [-0.5, 0.5], y in [-0.3, 0.5], partly inside the walls' reach)
  and where the walls keep balls after pushes ([-0.47, 0.47] x [-0.17, 0.57]).
- ``max_step_delta`` = 0.45 per coordinate. Measured over 40,000 uniformly random pushes
  (800 episodes of 50 from random starts) the largest one-step change of any coordinate
  was 0.384, on an episode's first push, where a ball started inside a wall's reach
  springs free while being pushed; on later pushes at most 0.307 (99.9% quantile 0.286).
  An isolated pushed ball moves 0.248; a ball struck by another ball or by the fast
  pusher goes further. 296 hand-made worst cases (balls in a row, wall-embedded starts
  pushed off the wall) gave at most 0.369. 0.45 leaves ~17% above everything seen.

Note: the suite function :func:`tasks` shadows the submodule ``tasks`` as a package
attribute; import that module's other names with ``from kalm_ray.envs.clevr.tasks import ...``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from kalm_ray.envs.clevr.model import COLORS, WALL_X, WALL_Y_HIGH, WALL_Y_LOW
from kalm_ray.envs.clevr.tasks import (
    BALL_LIMITS,
    distance,
    parse_task,
    parts,
    reward,
    success,
    tasks,
    valid_start,
)
from kalm_ray.envs.clevr.tasks import (
    level_max_steps as _level_max_steps,
)
from kalm_ray.envs.clevr.wordings import instructions
from kalm_ray.envs.suite import StateLayout

name = "clevr"
gym_id = "kalm_ray/CLEVRRobot-v0"
max_episode_steps = 50
action_space = gym.spaces.Discrete(len(COLORS) * 8)
action_factors: tuple[tuple[str, int], ...] = (("ball", len(COLORS)), ("direction", 8))
"""Action ``a`` is ball ``a // 8`` pushed in direction ``a % 8`` (``sim.DIRECTION_VECTORS``):
the grounding metrics score the LLM on each part (which ball, then which way)."""

MAX_STEP_DELTA = 0.45
"""Largest possible one-push change of one coordinate (m); see the module doc."""

MAX_STEP_TOTAL = 0.9
"""Largest sum of the five balls' displacements in one push (m). Measured over 6,000 random
pushes (300 episodes of 20 from random starts): at most 0.731 (99.9% quantile 0.656); one
pushed ball moves at most 0.418. 0.9 leaves ~23% above everything seen."""

MIN_BALL_GAP = 0.19
"""Smallest distance between two ball centres seen from above (m) that the filter accepts.
Balls of radius 0.13 on the table touch at 0.26: over 40,000 uniformly random pushes (800
episodes of 50 from random starts) every state with all balls on the table had them at least
0.253 apart. A ball driven into another rides up on it and, seen from above, comes closer:
closer than 0.19 in 23 of those 40,000 states (one episode, a ball resting on two others), and
in the scripted pusher's data in 8, 48 and 19 of ~3,350 states (master seeds 0, 1, 3; seed 1:
15 of 1,200 episodes). The grounded world model writes a pushed ball through the one in its way
in a quarter of its imagined first steps (``cpu`` preset, seed 1), so the filter rejects such
states: it loses a few reachable ones to drop far more that no push makes."""

layout = StateLayout(
    names=tuple(f"{c}.{axis}" for c in COLORS for axis in ("x", "y")),
    low=np.tile(np.array([-WALL_X, WALL_Y_LOW], dtype=np.float32), len(COLORS)),
    high=np.tile(np.array([WALL_X, WALL_Y_HIGH], dtype=np.float32), len(COLORS)),
    max_step_delta=np.full(2 * len(COLORS), MAX_STEP_DELTA, dtype=np.float32),
    reach_low=np.tile(np.array([BALL_LIMITS[0][0], BALL_LIMITS[1][0]], np.float32), len(COLORS)),
    reach_high=np.tile(np.array([BALL_LIMITS[0][1], BALL_LIMITS[1][1]], np.float32), len(COLORS)),
    max_step_total=MAX_STEP_TOTAL,
    object_dims=2,
    min_object_gap=MIN_BALL_GAP,
)


def level_max_steps(level: str) -> int:
    """Pushes per episode at ``level``: 50, and 1 for ``easy`` (one push, as in ImagineBench)."""
    return _level_max_steps(level, max_episode_steps)


def make_env(level: str, task: str | None = None, **kwargs) -> gym.Env:
    """A fresh :class:`~kalm_ray.envs.clevr.env.CLEVRRobotEnv` (not wrapped).

    ``kwargs``: ``max_episode_steps`` (default 50), ``render_mode``.
    """
    from kalm_ray.envs.clevr.env import CLEVRRobotEnv

    kwargs.setdefault("max_episode_steps", max_episode_steps)
    return CLEVRRobotEnv(level=level, task=task, **kwargs)
