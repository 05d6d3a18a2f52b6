"""``MetaWorldEnv``: every Meta-World task of one level behind the shared slot state.

Registered as ``kalm_ray/MetaWorld-v0``. Observation: the 91-d entity-slot state
(:mod:`kalm_ray.envs.metaworld.slots`), float32. Action: ``Box(-1, 1, (4,))`` (hand
displacement xyz, gripper effort), as in Meta-World.

``reset(seed=..., options={"task": id, "instruction": text})``: the task is the option,
else the constructor's ``task``, else drawn from the level; the instruction is the option,
else drawn from the task's wordings at this level. Goals (and object placements) are
re-drawn at every reset from the env's generator, so ``reset(seed=s)`` is reproducible.

``info``: ``success`` (the suite predicate; composite tasks also need the stage order),
``task``, ``instruction``, ``level``, ``raw_obs`` (the 39-d observation the scripted
expert of the current stage reads), ``mw_success`` (Meta-World's own verdict, for the
single tasks only) and, for composite tasks, ``stage`` (see
:func:`kalm_ray.envs.metaworld.tasks.advance_stage`). ``terminated`` when ``success``;
``truncated`` at ``max_episode_steps``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from kalm_ray.envs.metaworld.scenes import Scene
from kalm_ray.envs.metaworld.slots import LAYOUT
from kalm_ray.envs.metaworld.tasks import check_task, reward, tasks
from kalm_ray.envs.metaworld.wordings import instructions
from kalm_ray.envs.success import SuccessTracker


def _suite() -> Any:
    # Imported on use: the suite module imports this one's package.
    import kalm_ray.envs.metaworld as suite

    return suite


class MetaWorldEnv(gym.Env):
    """Meta-World tasks of ``level`` (one fixed ``task``, or one drawn per reset)."""

    metadata = {"render_modes": ["human", "rgb_array", "depth_array"], "render_fps": 80}

    def __init__(
        self,
        level: str = "train",
        task: str | None = None,
        max_episode_steps: int = 150,
        render_mode: str | None = None,
    ):
        self.level = level
        self.level_tasks = tasks(level)  # validates the level
        self.task = None if task is None else check_task(task, level)
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.max_episode_steps = int(max_episode_steps)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(LAYOUT.low, LAYOUT.high, dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self._scenes: dict[str, Scene] = {}
        self._scene: Scene | None = None
        self._task: str | None = None
        self._instruction = ""
        self._start = np.zeros(LAYOUT.dim, np.float32)
        self._state = self._start
        self._success: SuccessTracker | None = None
        self._t = 0
        self._raw_obs = np.zeros(39)

    @property
    def raw_obs(self) -> np.ndarray:
        """The 39-d observation for the current stage's scripted expert (a copy)."""
        return self._raw_obs.copy()

    @property
    def _stage(self) -> int:
        """The composite task's stage (see ``advance_stage``), kept by the success tracker."""
        return 0 if self._success is None else self._success.stage

    @property
    def current_task(self) -> str | None:
        """The task of the running episode (None before the first reset)."""
        return self._task

    def _scene_for(self, task: str) -> Scene:
        if task not in self._scenes:
            self._scenes[task] = Scene(
                task,
                max_path_length=max(500, self.max_episode_steps + 1),
                render_mode=self.render_mode,
            )
        return self._scenes[task]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        task = options.get("task") or self.task
        if task is None:
            task = self.level_tasks[int(self.np_random.integers(len(self.level_tasks)))]
        task = check_task(task, self.level)
        instruction = options.get("instruction")
        if instruction is None:
            wordings = instructions(self.level, task)
            instruction = wordings[int(self.np_random.integers(len(wordings)))]
        self._task, self._instruction = task, str(instruction)
        self._scene = self._scene_for(task)
        self._scene.reset(np.random.default_rng(int(self.np_random.integers(2**63))))
        self._t = 0
        self._start = self._state = self._scene.state()
        # The suites' one success rule, fed state by state (it keeps the composite stage).
        self._success = SuccessTracker(_suite(), task, self._start)
        self._raw_obs = self._scene.raw_obs(self._stage)
        return self._state.copy(), self._info(success=False)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._scene is None:
            raise RuntimeError("MetaWorldEnv.step() called before reset()")
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(4), -1.0, 1.0)
        mw_info = self._scene.step(action)
        prev, self._state = self._state, self._scene.state()
        self._t += 1
        task = self._task
        ok = self._success(self._state)
        r = reward(task, self._start, prev, self._state)
        self._raw_obs = self._scene.raw_obs(self._stage)
        info = self._info(success=ok)
        if not self._scene.composite:
            info["mw_success"] = bool(mw_info.get("success", 0.0))
        truncated = (not ok) and self._t >= self.max_episode_steps
        return self._state.copy(), r, ok, truncated, info

    def _info(self, *, success: bool) -> dict[str, Any]:
        info = {
            "success": bool(success),
            "task": self._task,
            "instruction": self._instruction,
            "level": self.level,
            "raw_obs": self._raw_obs.copy(),
        }
        if self._scene is not None and self._scene.composite:
            info["stage"] = self._stage
        return info

    def render(self) -> Any:
        if self._scene is None or self.render_mode is None:
            return None
        return self._scene.render()

    def close(self) -> None:
        for scene in self._scenes.values():
            scene.close()
        self._scenes.clear()
        self._scene = None
