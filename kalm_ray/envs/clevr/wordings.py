"""Render the CLEVR-Robot instruction wordings (``envs/instructions/clevr.yaml``) for a task."""

from __future__ import annotations

from functools import lru_cache

from kalm_ray.envs import instructions as wording_files
from kalm_ray.envs.clevr.tasks import COLORS, Line, Move, Multi, Relation, parse_task, tasks
from kalm_ray.envs.suite import UnknownChoiceError


def _unique(texts: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(texts))


def _relation(spec: dict, rel: Relation) -> list[str]:
    phrase = spec["directions"][rel.direction]
    a, b = COLORS[rel.a], COLORS[rel.b]
    return [t.format(a=a, b=b, rel=phrase) for t in spec["templates"]]


def _multi(spec: dict, goal: Multi) -> list[str]:
    clauses = [
        spec["clause"].format(a=COLORS[r.a], b=COLORS[r.b], rel=spec["directions"][r.direction])
        for r in goal.relations
    ]
    joined = spec["join"].join(clauses[:-1]) + spec["last_join"] + clauses[-1]
    return [t.format(clauses=joined) for t in spec["templates"]]


@lru_cache(maxsize=1024)
def _render(level: str, task: str) -> tuple[str, ...]:
    if task not in tasks(level):  # also validates the level
        raise UnknownChoiceError(f"clevr {level} task", task, tasks(level))
    spec = wording_files.load("clevr")[level]
    goal = parse_task(task)
    if isinstance(goal, Relation):
        return _unique(_relation(spec["relation"], goal))
    if isinstance(goal, Move):
        move = spec["move"]
        phrase = move["directions"][goal.direction]
        return _unique([t.format(a=COLORS[goal.ball], dir=phrase) for t in move["templates"]])
    if isinstance(goal, Multi):
        return _unique(_multi(spec["multi"], goal))
    return _unique(list(spec["line" if isinstance(goal, Line) else "gather"]))


def instructions(level: str, task: str) -> list[str]:
    """Every wording of ``task`` at ``level``, in file order, no duplicates.

    Raises UnknownChoiceError for a level or a task not of that level.
    """
    return list(_render(level, task))
