"""Environment suites and their gymnasium registration.

``get_suite("clevr")`` returns the suite module (see :mod:`kalm_ray.envs.suite`);
importing this package registers ``kalm_ray/CLEVRRobot-v0`` and
``kalm_ray/MetaWorld-v0`` with gymnasium, lazily (no MuJoCo model is built until
``gymnasium.make`` is called).
"""

from __future__ import annotations

import importlib

import gymnasium as gym

from kalm_ray.envs.suite import LEVELS, NOVEL_LEVELS, StateLayout, Suite, UnknownChoiceError

ENVS: tuple[str, ...] = ("clevr", "metaworld")

_MODULES = {"clevr": "kalm_ray.envs.clevr", "metaworld": "kalm_ray.envs.metaworld"}


def get_suite(env: str) -> Suite:
    """The suite for ``env`` (``clevr`` or ``metaworld``); raises UnknownChoiceError."""
    if env not in _MODULES:
        raise UnknownChoiceError("env", env, ENVS)
    return importlib.import_module(_MODULES[env])  # type: ignore[return-value]


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise UnknownChoiceError("level", level, LEVELS)
    return level


def _register() -> None:
    ids = {
        "kalm_ray/CLEVRRobot-v0": "kalm_ray.envs.clevr.env:CLEVRRobotEnv",
        "kalm_ray/MetaWorld-v0": "kalm_ray.envs.metaworld.env:MetaWorldEnv",
    }
    for env_id, entry in ids.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry)


_register()

__all__ = [
    "ENVS",
    "LEVELS",
    "NOVEL_LEVELS",
    "StateLayout",
    "Suite",
    "UnknownChoiceError",
    "check_level",
    "get_suite",
]
