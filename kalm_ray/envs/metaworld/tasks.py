"""Meta-World tasks per level, and their success predicates and rewards over slot states.

Everything here is a pure function of 91-d slot states (see
:mod:`kalm_ray.envs.metaworld.slots`), so imagined rollouts are labelled without a
simulator. Single-task predicates reproduce the success test of each v3 env's
``evaluate_state`` with the slot points chosen to be exactly the points Meta-World
measures (thresholds in metres):

==================  ========================================================================
task                success (Meta-World v3)
==================  ========================================================================
reach, reach-wall   ``|gripper - goal| <= 0.05`` (gripper = TCP, as Meta-World uses)
push                ``|object - goal| <= 0.05``
pick-place          ``|object - goal| <= 0.07``; push-wall, pick-place-wall: also 0.07
button-press        ``|goal.y - button.y| <= 0.02``; button-press-wall: 0.03
door-unlock         ``|goal.x - lock.x| <= 0.02`` (lock = site lockStartUnlock)
door-lock           ``|goal.z - lockStartLock.z| <= 0.02``; lockStartLock = lock +
                    R(lock.q) (0, 0, 0.02) (the two sites are 2 cm apart on the lever)
door-open           ``|door_handle.x - goal.x| <= 0.08``
door-close          ``|door_handle - goal| <= 0.08``
window-open         ``|window.x - goal.x| <= 0.05``
window-close        same with handleCloseStart = window + R(window.q) (0.05, 0, 0)
faucet-open         ``|faucet + (-0.04, 0, 0.03) - goal| <= 0.07``
faucet-close        ``|faucet + R(faucet.q) (0.03, 0, 0) - goal| <= 0.07`` (the close-side
                    site is 3 cm from the open-side one on the handle)
coffee-push         ``|object - goal| <= 0.07``
coffee-button       ``|goal.y - coffee_button.y| <= 0.02``
hammer              nail driven in: ``nail.y > goal.y - 0.01`` (Meta-World: nail slide
                    joint > 0.09; the nail rests 0.10 in front of the goal site)
soccer              ``|soccer_ball - goal| <= 0.07``
==================  ========================================================================

Composite (hard) tasks need two stages in order. ``success(task, start, state)`` on one
state means: the final stage's condition holds, the first stage's condition *still holds
in the same state* (evidence it was done), and neither held at ``start`` (both were done
within the episode):

- ``make-coffee`` (coffee-push scene, goal = the pressed-button point): stage 1 "mug
  under the spout" = ``|object - (coffee_machine + (0, -0.22, 0))| <= 0.07`` (exactly
  coffee-push's test); stage 2 "button pressed" = ``|goal.y - coffee_button.y| <= 0.02``
  (coffee-button's test).
- ``locked-door-open`` (door-open scene with doorlockA's lock fitted, goal = the door-open
  target): stage 1 "unlocked" = the lever's hinge angle relative to the door leaf,
  from ``conj(door_handle.q) * lock.q``, is <= 0.377 rad, the angle at which door-unlock's
  test ``|goal.x - lock.x| <= 0.02`` is met with the door shut; stage 2 = door-open's test.

A single state cannot show *order* (the coffee button stays pressed, so pressing it first
and then pushing the mug ends in the same state). :func:`advance_stage` /
:func:`trajectory_success` add that: a composite episode is spoiled (stage -1) if the
second stage's condition holds before the first's. The env's ``info['success']`` is
``trajectory_success`` run online; for single tasks it is ``success``.

Dense reward (:func:`reward`): 10 when ``next_state`` succeeds, else
``4 exp(-gap / 0.1) + exp(-approach / 0.05)`` in [0, 5], where ``gap`` is how far the
predicate's distance is beyond its threshold (m; for composites the remaining stages' gaps
summed) and ``approach`` is the TCP's distance to the entity to act on now. It depends on
``next_state`` (and ``start`` for composites) only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kalm_ray.envs.metaworld.slots import position as pos
from kalm_ray.envs.metaworld.slots import quaternion as quat
from kalm_ray.envs.metaworld.slots import slot
from kalm_ray.envs.suite import LEVELS, UnknownChoiceError

TRAIN_TASKS: tuple[str, ...] = (
    "reach",
    "push",
    "pick-place",
    "button-press",
    "door-unlock",
    "door-open",
    "window-open",
    "faucet-open",
    "coffee-push",
    "coffee-button",
)
EASY_TASKS: tuple[str, ...] = (
    "reach-wall",
    "push-wall",
    "pick-place-wall",
    "button-press-wall",
    "door-lock",
    "door-close",
    "window-close",
    "faucet-close",
)
HARD_TASKS: tuple[str, ...] = ("make-coffee", "locked-door-open", "hammer", "soccer")
COMPOSITE_TASKS: dict[str, tuple[str, str]] = {
    "make-coffee": ("coffee-push", "coffee-button"),
    "locked-door-open": ("door-unlock", "door-open"),
}
"""Composite task -> its two stages, in order (each a single task)."""

LEVEL_TASKS: dict[str, tuple[str, ...]] = {
    "train": TRAIN_TASKS,
    "rephrase": TRAIN_TASKS,
    "easy": EASY_TASKS,
    "hard": HARD_TASKS,
}
ALL_TASKS: tuple[str, ...] = TRAIN_TASKS + EASY_TASKS + HARD_TASKS

SPOUT_OFFSET = np.array([0.0, -0.22, 0.0])
"""Mug target (under the spout) minus coffee-machine position (coffee-push's reset)."""
COFFEE_BUTTON_GOAL_OFFSET = np.array([0.0, -0.19, 0.3])
"""Pressed-button point minus coffee-machine position (coffee-button's reset)."""
UNLOCKED_ANGLE = 0.377
"""Lever hinge angle (rad) at and below which door-unlock's test passes with the door shut:
the site at lever (0.09, -0.04, -0.01) reaches x >= 0.08 past the hinge iff
``0.09 cos(a) - 0.01 sin(a) >= 0.08``."""
LOCK_LEVER_RADIUS = 0.09
"""Metres of lever travel per radian (for the unlock stage's reward gap)."""


def tasks(level: str) -> list[str]:
    """Task ids of ``level`` in a stable order; raises UnknownChoiceError."""
    if level not in LEVEL_TASKS:
        raise UnknownChoiceError("level", level, LEVELS)
    return list(LEVEL_TASKS[level])


def check_task(task: str, level: str | None = None) -> str:
    """``task`` if it is a task (of ``level`` when given); raises UnknownChoiceError."""
    choices = ALL_TASKS if level is None else tasks(level)
    if task not in choices:
        kind = "metaworld task" if level is None else f"metaworld {level} task"
        raise UnknownChoiceError(kind, task, choices)
    return task


# ---------------------------------------------------------------- geometry helpers


def rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate vector ``v`` (3,) by quaternion ``q`` (4,: w, x, y, z; normalised here)."""
    w, x, y, z = (float(c) for c in q)
    vx, vy, vz = (float(c) for c in v)
    n2 = w * w + x * x + y * y + z * z
    if n2 < 1e-12:
        return np.array([vx, vy, vz])
    # v + 2 u x (u x v + w v) with u = (x, y, z), for the normalised quaternion; scalar
    # arithmetic because np.cross costs more than the whole rotation on 3-vectors.
    tx, ty, tz = y * vz - z * vy + w * vx, z * vx - x * vz + w * vy, x * vy - y * vx + w * vz
    k = 2.0 / n2
    return np.array(
        [vx + k * (y * tz - z * ty), vy + k * (z * tx - x * tz), vz + k * (x * ty - y * tx)]
    )


def hinge_angle_y(q_parent: np.ndarray, q_child: np.ndarray) -> float:
    """Signed angle (rad) of ``q_child`` relative to ``q_parent`` about the parent's y axis.

    Both (4,) w-first quaternions; the relative rotation ``conj(q_parent) * q_child`` is
    projected onto a y-axis rotation (exact for a hinge about y).
    """
    pw, px, py, pz = (float(c) for c in q_parent)
    cw, cx, cy, cz = (float(c) for c in q_child)
    # conj(p) * c, Hamilton product; only the w and y parts are needed.
    rw = pw * cw + px * cx + py * cy + pz * cz
    ry = pw * cy - py * cw - pz * cx + px * cz
    return 2.0 * math.atan2(ry, rw)


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def _present(state: np.ndarray, entity: str) -> bool:
    return bool(state[slot(entity)].any())


# ---------------------------------------------------------------- single-task checks


@dataclass(frozen=True)
class Check:
    """One success check: ``measure(state) <= threshold``; ``contact(state)`` is where the
    gripper must go to make progress (for the reward's approach term)."""

    measure: Callable[[np.ndarray], float]
    threshold: float
    contact: Callable[[np.ndarray], np.ndarray]

    def holds(self, state: np.ndarray) -> bool:
        return self.measure(state) <= self.threshold

    def gap(self, state: np.ndarray) -> float:
        return max(0.0, self.measure(state) - self.threshold)


def _entity_to_goal(entity: str, threshold: float) -> Check:
    return Check(
        lambda s: _dist(pos(s, entity), pos(s, "goal")), threshold, lambda s: pos(s, entity)
    )


def _axis_to_goal(entity: str, axis: int, threshold: float) -> Check:
    return Check(
        lambda s: abs(float(pos(s, "goal")[axis]) - float(pos(s, entity)[axis])),
        threshold,
        lambda s: pos(s, entity),
    )


def _lock_site_locked(s: np.ndarray) -> np.ndarray:
    return pos(s, "lock") + rotate(quat(s, "lock"), np.array([0.0, 0.0, 0.02]))


def _window_close_site(s: np.ndarray) -> np.ndarray:
    return pos(s, "window") + rotate(quat(s, "window"), np.array([0.05, 0.0, 0.0]))


def _faucet_close_site(s: np.ndarray) -> np.ndarray:
    return pos(s, "faucet") + rotate(quat(s, "faucet"), np.array([0.03, 0.0, 0.0]))


def _mug_target(s: np.ndarray) -> np.ndarray:
    return pos(s, "coffee_machine") + SPOUT_OFFSET


def _lever_angle(s: np.ndarray) -> float:
    return hinge_angle_y(quat(s, "door_handle"), quat(s, "lock"))


CHECKS: dict[str, Check] = {
    "reach": _entity_to_goal("gripper", 0.05),
    "reach-wall": _entity_to_goal("gripper", 0.05),
    "push": _entity_to_goal("object", 0.05),
    "pick-place": _entity_to_goal("object", 0.07),
    "push-wall": _entity_to_goal("object", 0.07),
    "pick-place-wall": _entity_to_goal("object", 0.07),
    "button-press": _axis_to_goal("button", 1, 0.02),
    "button-press-wall": _axis_to_goal("button", 1, 0.03),
    "door-unlock": _axis_to_goal("lock", 0, 0.02),
    "door-lock": Check(
        lambda s: abs(float(pos(s, "goal")[2]) - float(_lock_site_locked(s)[2])),
        0.02,
        _lock_site_locked,
    ),
    "door-open": _axis_to_goal("door_handle", 0, 0.08),
    "door-close": _entity_to_goal("door_handle", 0.08),
    "window-open": _axis_to_goal("window", 0, 0.05),
    "window-close": Check(
        lambda s: abs(float(_window_close_site(s)[0]) - float(pos(s, "goal")[0])),
        0.05,
        _window_close_site,
    ),
    "faucet-open": Check(
        lambda s: _dist(pos(s, "faucet") + np.array([-0.04, 0.0, 0.03]), pos(s, "goal")),
        0.07,
        lambda s: pos(s, "faucet"),
    ),
    "faucet-close": Check(
        lambda s: _dist(_faucet_close_site(s), pos(s, "goal")), 0.07, _faucet_close_site
    ),
    "coffee-push": _entity_to_goal("object", 0.07),
    "coffee-button": _axis_to_goal("coffee_button", 1, 0.02),
    "hammer": Check(
        lambda s: float(pos(s, "goal")[1]) - 0.01 - float(pos(s, "nail")[1]),
        0.0,
        lambda s: pos(s, "hammer"),
    ),
    "soccer": _entity_to_goal("soccer_ball", 0.07),
}
"""Single task -> its success check on one state."""

STAGE_CHECKS: dict[str, tuple[Check, Check]] = {
    "make-coffee": (
        Check(lambda s: _dist(pos(s, "object"), _mug_target(s)), 0.07, lambda s: pos(s, "object")),
        _axis_to_goal("coffee_button", 1, 0.02),
    ),
    "locked-door-open": (
        Check(
            lambda s: LOCK_LEVER_RADIUS * (_lever_angle(s) - UNLOCKED_ANGLE),
            0.0,
            lambda s: pos(s, "lock"),
        ),
        _axis_to_goal("door_handle", 0, 0.08),
    ),
}
"""Composite task -> (stage-1 check, stage-2 check), each on one state."""

_SCENE_ENTITY = {
    "make-coffee": ("object", "coffee_machine", "coffee_button"),
    "locked-door-open": ("lock", "door_handle"),
}


# ---------------------------------------------------------------- predicates


def stages_holding(task: str, state: np.ndarray) -> tuple[bool, bool]:
    """(stage-1 condition, stage-2 condition) of composite ``task`` in one ``(91,)`` state."""
    first, second = STAGE_CHECKS[task]
    if not all(_present(state, e) for e in _SCENE_ENTITY[task]):
        return False, False
    return first.holds(state), second.holds(state)


def success(task: str, start: np.ndarray, state: np.ndarray) -> bool:
    """Whether ``task`` holds in ``state`` (``(91,)`` slot states; ``start`` = first state).

    Single tasks ignore ``start``. Composite tasks: both stage conditions hold in
    ``state`` and neither held in ``start`` (see the module doc; order is checked by
    :func:`trajectory_success`). Raises UnknownChoiceError for an unknown task.
    """
    if task in CHECKS:
        return CHECKS[task].holds(state)
    if task in STAGE_CHECKS:
        if any(stages_holding(task, start)):
            return False
        return all(stages_holding(task, state))
    raise UnknownChoiceError("metaworld task", task, ALL_TASKS)


def advance_stage(task: str, stage: int, state: np.ndarray) -> int:
    """Next stage of composite ``task`` after observing ``state``.

    Stages: 0 = first stage not done yet, 1 = first stage done, 2 = both done in order
    (success), -1 = spoiled (the second stage's condition held before the first's; it
    stays -1 for the rest of the episode).
    """
    if stage in (-1, 2):
        return stage
    first, second = stages_holding(task, state)
    if stage == 0:
        if second and not first:
            return -1
        stage = 1 if first else 0
    if stage == 1 and first and second:
        return 2
    return stage


def trajectory_success(task: str, states: np.ndarray) -> np.ndarray:
    """``(T,)`` bool: success of ``task`` at each of ``states`` ``(T, 91)`` (``states[0]`` is
    the start), with stage order enforced for composite tasks: the one rule of
    :func:`kalm_ray.envs.success.success_flags` on this suite."""
    import kalm_ray.envs.metaworld as suite
    from kalm_ray.envs.success import success_flags

    return success_flags(suite, task, states)


def gaps(task: str, state: np.ndarray) -> tuple[float, float]:
    """(gap, approach) in metres for the reward: how far the success test is from passing,
    and how far the TCP is from the entity to act on now."""
    gripper = pos(state, "gripper")
    if task in CHECKS:
        test = CHECKS[task]
        return test.gap(state), _dist(gripper, test.contact(state))
    if task not in STAGE_CHECKS:
        raise UnknownChoiceError("metaworld task", task, ALL_TASKS)
    first, second = STAGE_CHECKS[task]
    if stages_holding(task, state)[0]:
        return second.gap(state), _dist(gripper, second.contact(state))
    return first.gap(state) + second.gap(state), _dist(gripper, first.contact(state))


def reward(task: str, start: np.ndarray, state: np.ndarray, next_state: np.ndarray) -> float:
    """Dense reward of the step ``state -> next_state`` (see the module doc), in [0, 10]."""
    if success(task, start, next_state):
        return 10.0
    gap, approach = gaps(task, next_state)
    return float(4.0 * np.exp(-gap / 0.1) + np.exp(-approach / 0.05))
