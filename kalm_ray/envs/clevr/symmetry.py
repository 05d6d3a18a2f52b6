"""Symmetries of CLEVR-Robot: renaming the balls' colours and mirroring the table left-right.

The five balls are physically identical (same radius and density, ``model.py``) and the walls
and the start region are symmetric about x = 0, so a real episode with its balls renamed
and/or its x coordinates negated is another real episode, exactly, of the renamed goal: the
same pushes of the same bodies. The relabelled episode keeps its wording's template (the
same sentence with other colour and direction words), so it is a demonstration of another
training goal in another training wording. (Front/back is not a symmetry: the walls sit at
y = -0.3 and 0.7 and the start region is y in [-0.3, 0.5].)

Why: the grounded LLM memorizes its ~1,000 training episodes (on the cpu budget, as a policy:
92% from starts it was trained on, 25% from fresh starts of the same goals); the 240
relabellings of each episode show every goal from many more layouts without a simulator step.

Pure numpy; the grounding stage's example builder applies it (``ground.relabel_copies``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kalm_ray.envs.clevr.tasks import COLORS, Relation, parse_task
from kalm_ray.envs.clevr.wordings import instructions

N_DIRECTIONS = 8
DIRECTION_MIRROR: tuple[int, ...] = (2, 1, 0, 3, 5, 4, 7, 6)
"""Push direction ``k`` -> its mirror image under x -> -x (``sim.DIRECTION_VECTORS``: (1,0)
<-> (-1,0), (0.8,0.8) <-> (-0.8,0.8), (0.8,-0.8) <-> (-0.8,-0.8); (0,±1) stay)."""
WORD_MIRROR: dict[str, str] = {
    "left": "right",
    "right": "left",
    "behind": "behind",
    "front": "front",
}
"""Direction word -> its mirror image under x -> -x."""


@dataclass(frozen=True)
class Relabel:
    """One symmetry: ball ``i`` becomes ball ``perm[i]``; ``mirror`` negates every x."""

    perm: tuple[int, ...]
    mirror: bool

    def states(self, s: np.ndarray) -> np.ndarray:
        """``(..., 10)`` states (NaN rows stay NaN) under the relabelling."""
        s = np.asarray(s)
        xy = s.reshape(*s.shape[:-1], len(COLORS), 2)
        out = np.empty_like(xy)
        out[..., list(self.perm), :] = xy
        if self.mirror:
            out[..., 0] = -out[..., 0]
        return out.reshape(s.shape)

    def action(self, a: int) -> int:
        ball, k = divmod(int(a), N_DIRECTIONS)
        return self.perm[ball] * N_DIRECTIONS + (DIRECTION_MIRROR[k] if self.mirror else k)

    def task(self, task: str) -> str:
        """A train-level relation task id (``<dir>:<A>:<B>``) under the relabelling."""
        goal = parse_task(task)
        if not isinstance(goal, Relation):
            raise ValueError(f"relabel: {task!r} is not a relation goal")
        d = WORD_MIRROR[goal.direction] if self.mirror else goal.direction
        return f"{d}:{COLORS[self.perm[goal.a]]}:{COLORS[self.perm[goal.b]]}"


def random_relabel(rng: np.random.Generator) -> Relabel:
    """A uniformly drawn element of the 240 (5! colour renamings x mirror or not)."""
    return Relabel(tuple(int(i) for i in rng.permutation(len(COLORS))), bool(rng.integers(2)))


def relabel_episode(
    relabel: Relabel,
    task: str,
    instruction: str,
    states: np.ndarray,
    actions: np.ndarray,
    lookahead: np.ndarray | None = None,
) -> tuple[str, str, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(task, instruction, states, actions, lookahead)`` of the relabelled episode.

    The instruction is the training wording of the new task with the same position in its
    list (the same template: every relation goal renders the same templates in file order).
    ``lookahead[t, a]`` (the next state of action ``a`` from state ``t``) moves to the
    relabelled action's slot. Raises ValueError for a task that is not a relation, or an
    instruction that is not one of the task's training wordings.
    """
    new_task = relabel.task(task)
    wordings = instructions("train", task)
    if instruction not in wordings:
        raise ValueError(f"relabel: {instruction!r} is not a train wording of {task!r}")
    new_instruction = instructions("train", new_task)[wordings.index(instruction)]
    new_actions = np.array([relabel.action(a) for a in np.asarray(actions)], np.int64)
    new_look = None
    if lookahead is not None:
        new_look = np.empty_like(lookahead)
        order = [relabel.action(a) for a in range(lookahead.shape[1])]
        new_look[:, order] = relabel.states(lookahead)
    return new_task, new_instruction, relabel.states(states), new_actions, new_look
