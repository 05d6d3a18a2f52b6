"""The push physics of CLEVR-Robot: place balls, push one, read ball positions.

Shared by the gymnasium env and the scripted policy (which pushes on a scratch copy to
look one step ahead). Imports MuJoCo, so only :mod:`env` and :mod:`scripted` import it.
"""

from __future__ import annotations

import mujoco
import numpy as np

from kalm_ray.envs.clevr.model import BALL_Z, COLORS, build_model

DIRECTION_VECTORS = np.array(
    [(1, 0), (0, 1), (-1, 0), (0, -1), (0.8, 0.8), (-0.8, 0.8), (0.8, -0.8), (-0.8, -0.8)],
    dtype=np.float64,
)
"""Push directions; action ``a`` pushes ball ``a // 8`` along ``DIRECTION_VECTORS[a % 8]``.
Not unit length: the diagonal ones are both the pusher's start offset and its control."""
N_ACTIONS = len(COLORS) * len(DIRECTION_VECTORS)  # 40
PUSH_OFFSET = 0.15
"""The pusher starts at ``ball_xy - PUSH_OFFSET * direction``."""
PHYSICS_STEPS_PER_PUSH = 40
PARKED_PUSHER = (0.0, -1.5)
"""Where set_state leaves the pusher: outside the walls, touching nothing."""


# Everything a step reads, so restoring a snapshot replays a push bit for bit.
_FULL_STATE = mujoco.mjtState.mjSTATE_INTEGRATION


class PushSim:
    """One MuJoCo model + data; ``push`` is one env step.

    Attributes:
        model, data: the compiled scene and its state.
    """

    def __init__(self, model: mujoco.MjModel | None = None) -> None:
        self.model = model if model is not None else build_model()
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._ball_qpos = np.array([m.jnt_qposadr[m.joint(f"{c}_free").id] for c in COLORS])
        self._ball_dof = np.array([m.jnt_dofadr[m.joint(f"{c}_free").id] for c in COLORS])
        # The pusher's x and y slide joints are adjacent in qpos/qvel.
        self._pusher_qpos = m.jnt_qposadr[m.joint("pusher_x").id]
        self._pusher_dof = m.jnt_dofadr[m.joint("pusher_x").id]
        self._xy_index = (self._ball_qpos[:, None] + np.arange(2)).ravel()

    def set_state(self, xy: np.ndarray) -> None:
        """Place the balls at ``xy`` (10,) on the table, at rest; reset everything else."""
        xy = np.asarray(xy, dtype=np.float64).reshape(len(COLORS), 2)
        mujoco.mj_resetData(self.model, self.data)
        for q, (x, y) in zip(self._ball_qpos, xy, strict=True):
            self.data.qpos[q : q + 7] = (x, y, BALL_Z, 1.0, 0.0, 0.0, 0.0)
        self.data.qpos[self._pusher_qpos : self._pusher_qpos + 2] = PARKED_PUSHER
        mujoco.mj_forward(self.model, self.data)

    def get_state(self) -> np.ndarray:
        """Ball (x, y) in colour order, shape (10,), float64, metres."""
        return self.data.qpos[self._xy_index].copy()

    def push(self, action: int) -> None:
        """Teleport the pusher behind the chosen ball at rest, drive it for 40 physics steps.

        Ball velocities carry over from the previous push, as in the reference.
        """
        ball, k = divmod(int(action), len(DIRECTION_VECTORS))
        direction = DIRECTION_VECTORS[k]
        q = self._ball_qpos[ball]
        p, v = self._pusher_qpos, self._pusher_dof
        self.data.qpos[p : p + 2] = self.data.qpos[q : q + 2] - PUSH_OFFSET * direction
        self.data.qvel[v : v + 2] = 0.0
        self.data.ctrl[:] = direction
        mujoco.mj_step(self.model, self.data, nstep=PHYSICS_STEPS_PER_PUSH)

    def snapshot(self) -> np.ndarray:
        """The full integration state (positions, velocities, controls, solver warm start)."""
        buf = np.empty(mujoco.mj_stateSize(self.model, _FULL_STATE))
        mujoco.mj_getState(self.model, self.data, buf, _FULL_STATE)
        return buf

    def restore(self, snapshot: np.ndarray) -> None:
        """Return to a :meth:`snapshot` (of this or another sim of the same model)."""
        mujoco.mj_setState(self.model, self.data, snapshot, _FULL_STATE)
