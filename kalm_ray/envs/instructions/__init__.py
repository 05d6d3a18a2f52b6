"""Instruction wordings shipped with the package, one YAML file per environment suite.

The files are written by this project (not copied from any paper's data). Each suite
renders its own file into concrete instructions (see e.g. ``kalm_ray.envs.clevr``);
this module only finds and parses them.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources

import yaml

from kalm_ray.envs.suite import UnknownChoiceError


def available() -> list[str]:
    """Env names that have a wordings file, sorted."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


@cache
def _parsed(env: str) -> dict:
    source = resources.files(__name__) / f"{env}.yaml"
    if not source.is_file():
        raise UnknownChoiceError("instruction set", env, available())
    return yaml.safe_load(source.read_text(encoding="utf-8"))


def load(env: str) -> dict:
    """The parsed ``<env>.yaml`` (a fresh copy, safe to modify); raises UnknownChoiceError."""
    return copy.deepcopy(_parsed(env))
