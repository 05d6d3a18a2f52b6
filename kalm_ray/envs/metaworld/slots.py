"""The entity-slot state shared by every Meta-World task, and how each scene fills it.

One 91-dimensional layout serves all tasks, so the same numbers mean the same object in
every task (ENVS_SPEC.md)::

    gripper.x gripper.y gripper.z gripper.open      4   tool centre point (m), opening 0..1
    goal.x goal.y goal.z                            3   the task's target point (m)
    12 entity slots, each  x y z qw qx qy qz        84  position (m) + orientation (unit
                                                        quaternion, MuJoCo's w-first order)

Entity slots, in order: object, button, lock, door_handle, window, faucet, wall,
coffee_machine, coffee_button, hammer, nail, soccer_ball. A slot whose entity is not in
the scene is all zeros. Quaternions are MuJoCo body orientations (``xquat``), which are
continuous over time (Meta-World's own observation converts some with scipy, whose sign
flips from step to step, and reports zeros for others; we do neither).

What each slot holds (the point is the one Meta-World's own success test uses, so the
predicates in :mod:`kalm_ray.envs.metaworld.tasks` mirror Meta-World exactly):

==============  ==========================================  ===========================
slot            position                                    orientation (body)
==============  ==========================================  ===========================
gripper         midpoint of the two fingertip sites (TCP)   (opening: finger gap / 0.1)
goal            the env's ``_target_pos`` (see below)       -
object          body ``obj``: the puck (reach/push/pick-    ``obj``
                place, +wall) or the mug (coffee-*)
button          body ``button`` + (0, -0.193, 0): the       ``button``
                button face (button-press, +wall)
lock            site ``lockStartUnlock`` (door-lock/        ``lock_link`` (the lever;
                unlock, locked-door-open)                   its hinge angle)
door_handle     the handle geom centre (door-open/close:    ``door_link`` (the door
                geom ``handle``; lock scenes: the same      leaf; its hinge angle)
                point of doorlockA's door, 5 cm lower)
window          site ``handleOpenStart`` (window-*)         ``windowb_a`` (slides only)
faucet          site ``handleStartOpen`` + (0, 0, -0.01)    ``faucet_link2`` (the
                (faucet-*)                                  handle; its turn angle)
wall            centre of the wall box (*-wall tasks)       ``wall``
coffee_machine  body ``coffee_machine`` (coffee-*)          ``coffee_machine``
coffee_button   site ``buttonStart`` (coffee-*)             ``cmbutton``
hammer          body ``hammer``                             ``hammer``
nail            body ``nail_link``                          ``nail_link``
soccer_ball     body ``soccer_ball``                        ``soccer_ball``
==============  ==========================================  ===========================

Goal per task: Meta-World's target (``_target_pos``) of the scene's env; the composite
tasks use their final stage's target (make-coffee: the pressed-button point
``coffee_machine + (0, -0.19, 0.3)``; locked-door-open: the door-open target), constant
through an episode like every other task's goal.

Bounds (``layout.low/high``) come from Meta-World's spaces, not from data:

- gripper xyz: ``SawyerXYZEnv._HAND_SPACE`` (the bound Meta-World clips the hand
  observation to) shifted by the TCP's offset below the hand body (0, 0, -0.045);
  opening: [0, 1] (Meta-World clips it there).
- goal: the union of the 20 single tasks' ``goal_space`` boxes (tested).
- entity positions: ``_HAND_SPACE`` (the reachable workspace), widened to contain 0 so an
  absent (all-zero) slot is in bounds; quaternion components: [-1, 1].

``max_step_delta`` (largest change of a dimension in one env step, i.e. 5 physics steps
of 2.5 ms): measured over the scripted experts (3 seeds) and uniformly random actions
(2 seeds) on all 22 tasks, then widened for what the physics allows beyond what was seen:

================  ========  ============================================================
quantity          limit     measured max and why the margin
================  ========  ============================================================
gripper xyz       0.05      0.026 (0.039 in Meta-World's faucet expert); the mocap moves
                            at most 0.01/axis/step, the hand lags and then catches up
gripper opening   0.15      0.078 (the finger actuators from fully open to closed)
goal, wall,       0.001     0 (fixed through an episode; the filter adds a codec bin)
coffee machine
other positions   0.1       0.03 (door handle); an object dropped from 0.3 m falls at
                            0.03/step and one struck by the hand moves at most ~2x
                            hand speed
quaternion comps  0.6       0.09 (mug, lock lever); a flicked 1 g lock lever can spin
                            close to 1 rad/step
soccer ball quat  2.0       0.25 while rolling; no practical bound (any orientation)
================  ========  ============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kalm_ray.envs.suite import StateLayout

ENTITIES: tuple[str, ...] = (
    "object",
    "button",
    "lock",
    "door_handle",
    "window",
    "faucet",
    "wall",
    "coffee_machine",
    "coffee_button",
    "hammer",
    "nail",
    "soccer_ball",
)
"""Entity kinds, in slot order."""

GRIPPER = slice(0, 4)
GOAL = slice(4, 7)
SLOT_DIM = 7
"""Per entity: position (3) + quaternion (4, w first)."""
STATE_DIM = 4 + 3 + SLOT_DIM * len(ENTITIES)

TCP_OFFSET = np.array([0.0, 0.0, -0.045])
"""TCP (fingertip midpoint) minus hand body position; measured, constant to 0.5 mm."""

HAND_LOW = np.array([-0.525, 0.348, -0.0525])
HAND_HIGH = np.array([0.525, 1.025, 0.7])
"""``metaworld.sawyer_xyz_env.SawyerXYZEnv._HAND_SPACE``."""

GOAL_LOW = np.array([-0.5, 0.4, -0.15])
GOAL_HIGH = np.array([0.5, 1.0, 0.5])
"""Union of the 20 single tasks' ``goal_space`` (checked by a test)."""

STATIC_ENTITIES: frozenset[str] = frozenset({"wall", "coffee_machine"})

MOVING_DIMS: dict[str, tuple[str, ...]] = {
    "object": ("x", "y", "z", "qw", "qx", "qy", "qz"),  # free bodies
    "hammer": ("x", "y", "z", "qw", "qx", "qy", "qz"),
    "soccer_ball": ("x", "y", "z", "qw", "qx", "qy", "qz"),
    "lock": ("x", "y", "z", "qw", "qx", "qy", "qz"),  # a point on a lever off its hinge
    "door_handle": ("x", "y", "qw", "qz"),  # hinges about the vertical axis
    "faucet": ("x", "y", "qw", "qz"),
    "button": ("y",),  # slide joints along one axis
    "coffee_button": ("y",),
    "nail": ("y",),
    "window": ("x",),
}
"""Dimensions of each entity slot that a step can change; the others are held by the
entity's joint (wall, coffee machine: no joint; the goal is fixed per episode). Measured
(expert with noise + uniform random actions, all 22 tasks): every other dimension's largest
change in one step is exactly 0 (a test re-measures it)."""

DELTA_GRIPPER_POS = 0.05
DELTA_GRIPPER_OPEN = 0.15
DELTA_STATIC = 0.001
DELTA_POS = 0.1
DELTA_QUAT = 0.6
DELTA_QUAT_ROLLING = 2.0
"""Per-step limits (see the module doc for the measurements behind them)."""


def slot(entity: str) -> slice:
    """Dimensions of ``entity``'s slot (position then quaternion)."""
    i = 7 + SLOT_DIM * ENTITIES.index(entity)
    return slice(i, i + SLOT_DIM)


def position(state: np.ndarray, entity: str) -> np.ndarray:
    """``(..., 3)`` position of ``entity`` (or of ``gripper``/``goal``) in ``(..., 91)`` states."""
    if entity == "gripper":
        return state[..., 0:3]
    if entity == "goal":
        return state[..., GOAL]
    i = 7 + SLOT_DIM * ENTITIES.index(entity)
    return state[..., i : i + 3]


def quaternion(state: np.ndarray, entity: str) -> np.ndarray:
    """``(..., 4)`` orientation (w, x, y, z) of ``entity`` in ``(..., 91)`` states."""
    i = 7 + SLOT_DIM * ENTITIES.index(entity) + 3
    return state[..., i : i + 4]


def _build_layout() -> StateLayout:
    names = ["gripper.x", "gripper.y", "gripper.z", "gripper.open", "goal.x", "goal.y", "goal.z"]
    low = [*(HAND_LOW + TCP_OFFSET), 0.0, *GOAL_LOW]
    high = [*(HAND_HIGH + TCP_OFFSET), 1.0, *GOAL_HIGH]
    delta = [DELTA_GRIPPER_POS] * 3 + [DELTA_GRIPPER_OPEN] + [DELTA_STATIC] * 3
    entities = {"gripper": GRIPPER, "goal": GOAL}
    fixed = [False] * 4 + [True] * 3
    for entity in ENTITIES:
        names += [f"{entity}.{c}" for c in ("x", "y", "z", "qw", "qx", "qy", "qz")]
        low += [*np.minimum(HAND_LOW, 0.0), -1.0, -1.0, -1.0, -1.0]
        high += [*np.maximum(HAND_HIGH, 0.0), 1.0, 1.0, 1.0, 1.0]
        pos_delta = DELTA_STATIC if entity in STATIC_ENTITIES else DELTA_POS
        quat_delta = DELTA_STATIC if entity in STATIC_ENTITIES else DELTA_QUAT
        if entity == "soccer_ball":
            quat_delta = DELTA_QUAT_ROLLING
        delta += [pos_delta] * 3 + [quat_delta] * 4
        moving = MOVING_DIMS.get(entity, ())
        fixed += [c not in moving for c in ("x", "y", "z", "qw", "qx", "qy", "qz")]
        entities[entity] = slot(entity)
    assert len(names) == STATE_DIM
    return StateLayout(
        names=tuple(names),
        low=np.asarray(low, dtype=np.float32),
        high=np.asarray(high, dtype=np.float32),
        max_step_delta=np.asarray(delta, dtype=np.float32),
        entities=entities,
        fixed=np.asarray(fixed, dtype=bool),
    )


LAYOUT: StateLayout = _build_layout()


@dataclass(frozen=True)
class Source:
    """Where one entity slot is read from in a MuJoCo scene.

    Position = origin of ``frame`` (a ``kind`` object: body, site or geom) + its rotation
    applied to ``local`` + ``offset`` (world frame). Orientation = ``xquat`` of body
    ``quat_body``.
    """

    kind: str
    frame: str
    quat_body: str
    local: tuple[float, float, float] = (0.0, 0.0, 0.0)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _body(name: str, **kw) -> Source:
    return Source("body", name, name, **kw)


PUCK = {"object": _body("obj")}
COFFEE = {
    "object": _body("obj"),
    "coffee_machine": _body("coffee_machine"),
    "coffee_button": Source("site", "buttonStart", "cmbutton"),
}
BUTTON = {"button": _body("button", offset=(0.0, -0.193, 0.0))}
DOOR_HANDLE_A = Source("body", "door_link", "door_link", local=(0.325, -0.062, -0.05))
"""doorlockA's handle is an unnamed geom at this point of the door leaf."""
LOCK = Source("site", "lockStartUnlock", "lock_link")
DOOR_LOCK = {"lock": LOCK, "door_handle": DOOR_HANDLE_A}
DOOR = {"door_handle": Source("geom", "handle", "door_link")}
LOCKED_DOOR = {"lock": LOCK, "door_handle": Source("geom", "handle", "door_link")}
WINDOW = {"window": Source("site", "handleOpenStart", "windowb_a")}
FAUCET = {"faucet": Source("site", "handleStartOpen", "faucet_link2", offset=(0.0, 0.0, -0.01))}
WALL_CENTRED = {"wall": _body("wall")}
WALL_ON_FLOOR = {"wall": _body("wall", local=(0.0, 0.0, 0.075))}
"""button-press-wall's wall body sits on the table; its box centre is 7.5 cm up."""

SCENE_SLOTS: dict[str, dict[str, Source]] = {
    "reach": PUCK,
    "push": PUCK,
    "pick-place": PUCK,
    "button-press": BUTTON,
    "door-unlock": DOOR_LOCK,
    "door-open": DOOR,
    "window-open": WINDOW,
    "faucet-open": FAUCET,
    "coffee-push": COFFEE,
    "coffee-button": COFFEE,
    "reach-wall": {**PUCK, **WALL_CENTRED},
    "push-wall": {**PUCK, **WALL_CENTRED},
    "pick-place-wall": {**PUCK, **WALL_CENTRED},
    "button-press-wall": {**BUTTON, **WALL_ON_FLOOR},
    "door-lock": DOOR_LOCK,
    "door-close": DOOR,
    "window-close": WINDOW,
    "faucet-close": FAUCET,
    "make-coffee": COFFEE,
    "locked-door-open": LOCKED_DOOR,
    "hammer": {"hammer": _body("hammer"), "nail": _body("nail_link")},
    "soccer": {"soccer_ball": _body("soccer_ball")},
}
"""Task id -> the entity slots its scene fills (every other slot stays zero)."""


class SlotReader:
    """Reads the 91-d slot state from a live MuJoCo model/data (ids resolved once).

    Args:
        model, data: the scene's ``mujoco.MjModel`` / ``mujoco.MjData``.
        sources: entity -> :class:`Source` (one of :data:`SCENE_SLOTS`).
    """

    def __init__(self, model, data, sources: dict[str, Source]):
        self.data = data
        self._right = model.site("rightEndEffector").id
        self._left = model.site("leftEndEffector").id
        self._rclaw = model.body("rightclaw").id
        self._lclaw = model.body("leftclaw").id
        self._reads = []
        for entity, src in sources.items():
            frame_id = getattr(model, src.kind)(src.frame).id
            self._reads.append(
                (
                    slot(entity).start,
                    src.kind,
                    frame_id,
                    model.body(src.quat_body).id,
                    np.asarray(src.local, dtype=np.float64),
                    np.asarray(src.offset, dtype=np.float64),
                )
            )

    def read(self, goal: np.ndarray) -> np.ndarray:
        """The ``(91,)`` float32 state for the current ``data``, clipped to the layout bounds."""
        d = self.data
        state = np.zeros(STATE_DIM, dtype=np.float64)
        state[0:3] = 0.5 * (d.site_xpos[self._right] + d.site_xpos[self._left])
        gap = np.linalg.norm(d.xpos[self._rclaw] - d.xpos[self._lclaw])
        state[3] = np.clip(gap / 0.1, 0.0, 1.0)
        state[GOAL] = goal
        for start, kind, frame_id, quat_id, local, offset in self._reads:
            if kind == "body":
                origin, rot = d.xpos[frame_id], d.xmat[frame_id]
            elif kind == "site":
                origin, rot = d.site_xpos[frame_id], d.site_xmat[frame_id]
            else:
                origin, rot = d.geom_xpos[frame_id], d.geom_xmat[frame_id]
            state[start : start + 3] = origin + rot.reshape(3, 3) @ local + offset
            state[start + 3 : start + 7] = d.xquat[quat_id]
        return np.clip(state, LAYOUT.low, LAYOUT.high).astype(np.float32)
