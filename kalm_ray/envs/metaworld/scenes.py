"""MuJoCo scenes behind each task: a Meta-World v3 env, configured and read into slots.

Single tasks use Meta-World's own env class (``metaworld.env_dict.ALL_V3_ENVIRONMENTS``)
with the goal observable, goals re-drawn at every reset from a generator we seed.

The two composite tasks are real scenes in which both stages can be done, in order:

- ``make-coffee``: the coffee-push env unchanged. Its scene (``sawyer_coffee.xml``) is the
  very scene of coffee-button: the same machine with the same button on a slide joint
  (no spring, so it stays pressed). Stage 1 = coffee-push's test on the mug, stage 2 =
  coffee-button's test on the button, evaluated on the same sim.
- ``locked-door-open``: the door-open env (doorlockB: a hinged door, no lock) with
  doorlockA's lock lever fitted to the door leaf at the same place (its mesh, collision
  box, hinge and the two sites), and a *latch*: a joint equality holding the door hinge at
  0 while the lever is locked. The latch is released while the lever's hinge angle is at
  most :data:`~kalm_ray.envs.metaworld.tasks.UNLOCKED_ANGLE` (door-unlock's test) and
  re-engages only when the lever is locked and the door is shut (a bolt cannot catch an
  open door). Reset puts the lever at 1.5708 (locked), as door-unlock's reset does.
  doorlockA itself cannot serve: its door leaf has no hinge.

Expert views: the scripted experts of ``metaworld.policies`` read Meta-World's 39-d
observation (hand, gripper, object pos+quat, second object, previous frame, goal). For
single tasks :meth:`Scene.raw_obs` is exactly the env's observation. For composite tasks
it is the observation the current stage's own env would give: make-coffee stage 0 =
coffee-push's, later coffee-button's (object = site buttonStart, goal = pressed-button
point); locked-door-open stage 0 = door-unlock's (object = site lockStartUnlock with the
door's orientation, goal = lever hinge + (0.1, -0.04, 0)), later door-open's.
"""

from __future__ import annotations

import warnings
from typing import Any

import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.envs.sawyer_door_v3 import SawyerDoorEnvV3

from kalm_ray.envs.metaworld import slots
from kalm_ray.envs.metaworld.tasks import (
    COFFEE_BUTTON_GOAL_OFFSET,
    COMPOSITE_TASKS,
    UNLOCKED_ANGLE,
    check_task,
)

LOCKED_ANGLE = 1.5708
"""Lever hinge angle at reset in door-unlock (hanging down: locked)."""
DOOR_SHUT = -0.05
"""Door hinge angle (rad) above which the door counts as shut for the latch."""
LATCH_SOLREF = (0.005, 1.0)
"""Stiff latch (2x the 0.0025 s timestep): the locked door gives at most ~0.012 rad."""


class LockedDoorEnv(SawyerDoorEnvV3):
    """Meta-World's door-open env with doorlockA's lever fitted and a latch (module doc)."""

    def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        spec = mujoco.MjSpec.from_file(self.fullpath)
        door = spec.body("door_link")
        col = spec.find_default("dl_col")
        # doorlockA.xml's lever and its base, at the same place on the door leaf.
        _visual(door.add_geom(), "lock_base", (0.185, -0.009, 0.061))
        _box(door.add_geom(col), (0.185, -0.009, 0.061), (0.047, 0.013, 0.047))
        lever = door.add_body()
        lever.name, lever.pos = "lock_link", [0.185, -0.018, 0.061]
        hinge = lever.add_joint()
        hinge.name, hinge.type = "lockjoint", mujoco.mjtJoint.mjJNT_HINGE
        hinge.axis, hinge.range = [0, 1, 0], [0, 1.57]
        hinge.limited = mujoco.mjtLimited.mjLIMITED_TRUE
        hinge.damping, hinge.armature = 2.0, 0.001
        _visual(lever.add_geom(), "lock", (0.042, -0.022, 0.0))
        _box(lever.add_geom(col), (0.042, -0.024, 0.0), (0.05, 0.019, 0.01)).mass = 0.001
        for name, z in (("lockStartLock", 0.01), ("lockStartUnlock", -0.01)):
            site = lever.add_site()
            site.name, site.pos, site.size = name, [0.09, -0.04, z], [0.005] * 3
        latch = spec.add_equality()
        latch.name, latch.type = "door_latch", mujoco.mjtEq.mjEQ_JOINT
        latch.objtype, latch.name1 = mujoco.mjtObj.mjOBJ_JOINT, "doorjoint"
        latch.solref = list(LATCH_SOLREF)
        model = spec.compile()
        model.vis.global_.offwidth, model.vis.global_.offheight = self.width, self.height
        return model, mujoco.MjData(model)

    def reset_model(self) -> np.ndarray:
        super().reset_model()
        joint = self.model.joint("lockjoint")
        qpos, qvel = self.data.qpos.copy(), self.data.qvel.copy()
        qpos[joint.qposadr[0]], qvel[joint.dofadr[0]] = LOCKED_ANGLE, 0.0
        self.set_state(qpos, qvel)
        self.update_latch()
        return self._get_obs()

    def lever_angle(self) -> float:
        """Lock lever hinge angle (rad): 1.5708 locked (hanging), 0 unlocked (level)."""
        return float(self.data.qpos[self.model.joint("lockjoint").qposadr[0]])

    def door_angle(self) -> float:
        """Door hinge angle (rad): 0 shut, negative open."""
        return float(self.data.qpos[self.model.joint("doorjoint").qposadr[0]])

    def update_latch(self) -> None:
        latch = self.model.equality("door_latch").id
        if self.lever_angle() <= UNLOCKED_ANGLE:
            self.data.eq_active[latch] = 0
        elif self.door_angle() > DOOR_SHUT:
            self.data.eq_active[latch] = 1

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.update_latch()
        return super().step(action)


def _visual(geom: mujoco.MjsGeom, mesh: str, at: tuple[float, ...]) -> mujoco.MjsGeom:
    geom.type, geom.meshname, geom.material = mujoco.mjtGeom.mjGEOM_MESH, mesh, "dl_metal"
    geom.pos, geom.contype, geom.conaffinity, geom.group = list(at), 0, 0, 1
    return geom


def _box(geom: mujoco.MjsGeom, at: tuple[float, ...], size: tuple[float, ...]) -> mujoco.MjsGeom:
    geom.type, geom.pos, geom.size = mujoco.mjtGeom.mjGEOM_BOX, list(at), list(size)
    return geom


def _env_class(task: str) -> type:
    if task == "locked-door-open":
        return LockedDoorEnv
    scene_task = COMPOSITE_TASKS[task][0] if task in COMPOSITE_TASKS else task
    return ALL_V3_ENVIRONMENTS[f"{scene_task}-v3"]


class Scene:
    """One task's Meta-World env, read into the shared slot state.

    Args:
        task: a task id of any level.
        max_path_length: Meta-World's own step limit (it raises past it); keep it above
            the episode limit.
        render_mode: passed to Meta-World (``None``: no rendering).
    """

    def __init__(self, task: str, *, max_path_length: int = 500, render_mode: str | None = None):
        self.task = check_task(task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = _env_class(task)(render_mode=render_mode)
        # Goal-observable, re-randomised every reset from env.np_random (set by reset()).
        env._partially_observable = False
        if "sawyer_observation_space" in env.__dict__:
            del env.sawyer_observation_space  # cached with the goal hidden
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.max_path_length = max_path_length
        self.env = env
        self.reader = slots.SlotReader(env.model, env.data, slots.SCENE_SLOTS[task])
        self._goal = np.zeros(3)
        self._unlock_goal = np.zeros(3)
        self._view_prev = np.zeros(18)
        self._obs = np.zeros(39)

    @property
    def composite(self) -> bool:
        return self.task in COMPOSITE_TASKS

    def reset(self, rng: np.random.Generator) -> None:
        """New episode, all randomness (goal/object placement) drawn from ``rng``."""
        env = self.env
        env.np_random = rng
        env.reset()
        # Meta-World moves some bodies at reset without a forward pass, so its reset
        # observation can be stale (window, faucet); recompute it from a fresh forward.
        mujoco.mj_forward(env.model, env.data)
        curr = env._get_curr_obs_combined_no_goal()
        env._prev_obs = curr.copy()
        self._obs = np.hstack((curr, curr, env._get_pos_goal())).astype(np.float64)
        self._goal = self._task_goal()
        if self.task == "locked-door-open":
            self._unlock_goal = env.data.body("lock_link").xpos + np.array([0.1, -0.04, 0.0])
        self._view_prev = self._view_curr(0)

    def _task_goal(self) -> np.ndarray:
        env = self.env
        if self.task == "make-coffee":
            return env.data.body("coffee_machine").xpos + COFFEE_BUTTON_GOAL_OFFSET
        return np.asarray(env._target_pos, dtype=np.float64).copy()

    def step(self, action: np.ndarray) -> dict[str, Any]:
        """Advance one env step; returns Meta-World's own info dict."""
        obs, _, _, _, info = self.env.step(np.asarray(action, dtype=np.float32))
        self._obs = np.asarray(obs, dtype=np.float64)
        return info

    def state(self) -> np.ndarray:
        """The current ``(91,)`` float32 slot state."""
        return self.reader.read(self._goal)

    def raw_obs(self, stage: int = 0) -> np.ndarray:
        """The 39-d observation the current stage's Meta-World env would give (a copy).

        For composite tasks this also records the frame as the next call's previous frame
        (the observation's second 18 values), so call it once per env step.
        """
        if not self.composite:
            return self._obs.copy()
        curr = self._view_curr(stage)
        out = np.hstack((curr, self._view_prev, self._view_goal(stage)))
        self._view_prev = curr
        return out

    def _view_curr(self, stage: int) -> np.ndarray:
        """Hand, gripper and first object of the stage's view (18 values, zero-padded)."""
        env, curr = self.env, np.zeros(18)
        curr[:4] = self._obs[:4]
        if self.task == "make-coffee" and stage >= 1:
            curr[4:7] = env.data.site("buttonStart").xpos
            curr[7:11] = (1.0, 0.0, 0.0, 0.0)
        elif self.task == "locked-door-open" and stage == 0:
            curr[4:7] = env.data.site("lockStartUnlock").xpos
            curr[7:11] = env.data.body("door_link").xquat
        else:
            curr[4:18] = self._obs[4:18]
        return curr

    def _view_goal(self, stage: int) -> np.ndarray:
        if self.task == "make-coffee" and stage >= 1:
            return self._goal.copy()
        if self.task == "locked-door-open" and stage == 0:
            return self._unlock_goal.copy()
        return self._obs[36:39].copy()

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()
