"""The one success rule of every suite, offline (a list of states) and online (an env stepped).

Success is a function of the episode's states, never of one state alone: composite tasks
(Meta-World ``make-coffee``, ``locked-door-open``) need their two stages *in order*, which a
single state cannot show (the coffee button stays pressed, so pressing it first and then
pushing the mug ends in the same state). A suite with composite tasks exposes
``COMPOSITE_TASKS`` and ``advance_stage(task, stage, state) -> stage`` (0: first stage not
done, 1: done, 2: both done in order, -1: spoiled); the goal holds at a state when the stage
reached there is 2 and ``suite.success(task, start, state)`` holds. Every other task: just
``suite.success(task, start, state)``.

Used by the labels of imagined rollouts, the collected episodes, the grounding metrics and
the quick evaluation during training, and ``MetaWorldEnv`` for ``info["success"]`` (a tracker
per episode), which the evaluation stage reads; Meta-World's ``trajectory_success`` is
:func:`success_flags` on that suite.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SuccessTracker:
    """The success rule of ``task`` fed one state at a time, from the episode's ``start``.

    ``tracker(state) -> bool`` for each next state in order; :attr:`at_start` is the verdict
    on ``start`` itself.
    """

    def __init__(self, suite: Any, task: str, start: np.ndarray):
        self.suite, self.task = suite, task
        self.start = np.asarray(start, dtype=np.float32)
        self.composite = task in getattr(suite, "COMPOSITE_TASKS", ())
        self.stage = 0
        self.at_start = self(self.start)

    def __call__(self, state: np.ndarray) -> bool:
        """Whether the goal holds at ``state``, the episode's next state."""
        if self.composite:
            self.stage = self.suite.advance_stage(self.task, self.stage, state)
            if self.stage != 2:
                return False
        return bool(self.suite.success(self.task, self.start, state))


def success_flags(suite: Any, task: str, states: np.ndarray) -> np.ndarray:
    """``(T + 1,)`` bool: whether the goal of ``task`` holds at each of ``states``
    (``(T + 1, D)``, row 0 = the start), by :class:`SuccessTracker`'s rule."""
    states = np.asarray(states, dtype=np.float32)
    track = SuccessTracker(suite, task, states[0])
    return np.asarray([track.at_start, *(track(s) for s in states[1:])], dtype=bool)


def goal_reached(suite: Any, task: str, states: np.ndarray) -> bool:
    """Whether the goal holds at the last of ``states`` (``(T + 1, D)``)."""
    return bool(success_flags(suite, task, states)[-1])
