"""Instruction wordings of the Meta-World tasks (``envs/instructions/metaworld.yaml``).

The file maps ``level -> task id -> [wording, ...]``; every level has its own wordings
(train and rephrase share goals, never wordings).
"""

from __future__ import annotations

from functools import cache

from kalm_ray.envs import instructions as wording_files
from kalm_ray.envs.metaworld.tasks import check_task


@cache
def _wordings(level: str, task: str) -> tuple[str, ...]:
    check_task(task, level)  # also validates the level
    return tuple(dict.fromkeys(wording_files.load("metaworld")[level][task]))


def instructions(level: str, task: str) -> list[str]:
    """Every wording of ``task`` at ``level``, in file order, no duplicates.

    Raises UnknownChoiceError for a level or a task not of that level.
    """
    return list(_wordings(level, task))
