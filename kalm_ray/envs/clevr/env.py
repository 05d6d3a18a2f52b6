"""``kalm_ray/CLEVRRobot-v0``: five balls on a table, pushed one at a time toward a goal."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from kalm_ray.envs.clevr.model import COLORS, WALL_X, WALL_Y_HIGH, WALL_Y_LOW
from kalm_ray.envs.clevr.sim import N_ACTIONS, PushSim
from kalm_ray.envs.clevr.tasks import level_max_steps, reward, success, tasks, valid_start
from kalm_ray.envs.clevr.wordings import instructions
from kalm_ray.envs.suite import UnknownChoiceError

START_X = (-0.5, 0.5)
START_Y = (-0.3, 0.5)
"""Start positions are uniform in START_X x START_Y (as in the reference, partly inside
the walls' reach: the first push that touches such a ball also lets it spring free)."""
START_MIN_GAP = 0.36
"""Every pair of start centres is at least this far apart."""


_START_BATCH = 512
"""Candidates drawn at once; only ~0.6% of uniform draws are spaced widely enough."""


def sample_start(rng: np.random.Generator) -> np.ndarray:
    """A start state (10,): uniform positions, resampled until all pairs >= START_MIN_GAP apart.

    Rejection sampling in batches (the first acceptable candidate of a batch is an
    independent draw from the same distribution as one-at-a-time resampling).
    """
    n = len(COLORS)
    i, j = np.triu_indices(n, 1)
    while True:
        xy = np.stack(
            [rng.uniform(*START_X, (_START_BATCH, n)), rng.uniform(*START_Y, (_START_BATCH, n))],
            axis=-1,
        )
        gaps = np.linalg.norm(xy[:, i] - xy[:, j], axis=-1).min(axis=1)
        ok = np.flatnonzero(gaps >= START_MIN_GAP)
        if ok.size:
            return xy[ok[0]].ravel()


class CLEVRRobotEnv(gym.Env[np.ndarray, np.int64]):
    """CLEVR-Robot with discrete pushes (``Discrete(40)``) and state observations.

    Observation: ball (x, y) in colour order, ``Box(10,)`` float32 bounded by the walls.
    Action ``a``: push ball ``a // 8`` along direction ``a % 8`` (see ``sim.DIRECTION_VECTORS``).
    An episode is terminated when its goal holds and truncated after
    ``max_episode_steps`` pushes otherwise (never both); ``easy`` episodes are one push
    (:data:`~kalm_ray.envs.clevr.tasks.LEVEL_MAX_STEPS`), whatever ``max_episode_steps``
    says. Success and reward are computed by :mod:`kalm_ray.envs.clevr.tasks` on the
    float32 observations, so labels recomputed from stored data match the env exactly.

    Args:
        level: task level (``train``, ``rephrase``, ``easy``, ``hard``).
        task: a fixed task id of that level; None samples one per reset.
        max_episode_steps: pushes per episode before truncation (capped per level).
        render_mode: None or ``rgb_array`` (needs an OpenGL context for MuJoCo).

    ``reset(options=...)`` accepts ``state`` (10 ball coordinates placed exactly, at rest),
    ``task`` and ``instruction``. ``info`` carries ``success``, ``task``, ``instruction``,
    ``level``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        level: str = "train",
        task: str | None = None,
        max_episode_steps: int = 50,
        render_mode: str | None = None,
    ) -> None:
        self._tasks = tasks(level)  # validates the level
        if task is not None and task not in self._tasks:
            raise UnknownChoiceError(f"clevr {level} task", task, self._tasks)
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise UnknownChoiceError("render_mode", render_mode, self.metadata["render_modes"])
        self.level = level
        self.fixed_task = task
        self.max_episode_steps = level_max_steps(level, max_episode_steps)
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        low = np.tile(np.array([-WALL_X, WALL_Y_LOW], dtype=np.float32), len(COLORS))
        high = np.tile(np.array([WALL_X, WALL_Y_HIGH], dtype=np.float32), len(COLORS))
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.sim = PushSim()
        self.task: str | None = None
        self.instruction: str | None = None
        self.start: np.ndarray | None = None
        self._obs: np.ndarray | None = None
        self._t = 0
        self._renderer = None

    # ------------------------------------------------------------------ state access

    def set_state(self, xy: np.ndarray) -> None:
        """Place the balls at ``xy`` (10,) at rest (does not change the episode's start)."""
        xy = np.asarray(xy, dtype=np.float64)
        if xy.shape != (2 * len(COLORS),):
            raise ValueError(f"CLEVR state must have shape (10,), got {xy.shape}")
        self.sim.set_state(xy)
        self._obs = self._observe()

    def get_state(self) -> np.ndarray:
        """Ball (x, y) in colour order, (10,) float64."""
        return self.sim.get_state()

    def _observe(self) -> np.ndarray:
        return self.sim.get_state().astype(np.float32)

    def _info(self, ok: bool) -> dict[str, Any]:
        return {
            "success": ok,
            "task": self.task,
            "instruction": self.instruction,
            "level": self.level,
        }

    # ------------------------------------------------------------------ gym API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        task = options.get("task") or self.fixed_task
        if task is None:
            task = self._tasks[int(self.np_random.integers(len(self._tasks)))]
        elif task not in self._tasks:
            raise UnknownChoiceError(f"clevr {self.level} task", task, self._tasks)
        state = options.get("state")
        if state is None:
            # An episode whose goal already holds (or cannot be reached) teaches nothing.
            state = sample_start(self.np_random)
            while not valid_start(task, state.astype(np.float32)):
                state = sample_start(self.np_random)
        self.task = task
        self.set_state(np.asarray(state, dtype=np.float64).ravel())
        wordings = instructions(self.level, task)
        self.instruction = (
            options.get("instruction") or wordings[int(self.np_random.integers(len(wordings)))]
        )
        self.start = self._obs.copy()
        self._t = 0
        return self._obs.copy(), self._info(success(task, self.start, self._obs))

    def step(self, action: int | np.integer) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.start is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"CLEVR action must be an int in [0, {N_ACTIONS}), got {action!r}")
        before = self._obs
        self.sim.push(int(action))
        self._obs = self._observe()
        self._t += 1
        ok = success(self.task, self.start, self._obs)
        r = reward(self.task, self.start, before, self._obs)
        truncated = not ok and self._t >= self.max_episode_steps
        return self._obs.copy(), r, ok, truncated, self._info(ok)

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        import mujoco

        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.sim.model, height=480, width=640)
        self._renderer.update_scene(self.sim.data, camera="top")
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
