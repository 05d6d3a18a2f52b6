"""Instruction wordings of every env suite: coverage, counts, and levels kept disjoint."""

from __future__ import annotations

import itertools

import pytest

from kalm_ray.envs import ENVS, LEVELS, UnknownChoiceError, get_suite
from kalm_ray.envs import instructions as wording_files

MIN_DISTINCT = {"train": 15, "rephrase": 10}


def _suite(env: str):
    try:
        return get_suite(env)
    except ModuleNotFoundError as err:  # a suite another part of the project has not built yet
        if err.name and err.name.startswith(f"kalm_ray.envs.{env}"):
            pytest.skip(f"suite {env!r} is not built yet")
        raise


@pytest.fixture(scope="module", params=ENVS)
def wordings(request) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """env -> {level: {task: wordings}}."""
    suite = _suite(request.param)
    table = {
        level: {task: suite.instructions(level, task) for task in suite.tasks(level)}
        for level in LEVELS
    }
    return request.param, table


def test_every_task_has_wordings(wordings) -> None:
    env, table = wordings
    for level, per_task in table.items():
        assert per_task, (env, level)
        for task, texts in per_task.items():
            assert texts and all(isinstance(t, str) and t.strip() == t and t for t in texts), (
                env,
                level,
                task,
            )
            assert len(set(texts)) == len(texts), (env, level, task)
            if level in MIN_DISTINCT:
                assert len(set(texts)) >= MIN_DISTINCT[level], (env, level, task, len(texts))


def test_wordings_are_deterministic(wordings) -> None:
    env, table = wordings
    suite = _suite(env)
    for level in LEVELS:
        task = suite.tasks(level)[0]
        assert suite.instructions(level, task) == table[level][task]


def test_levels_are_disjoint_per_task(wordings) -> None:
    env, table = wordings
    for a, b in itertools.combinations(LEVELS, 2):
        for task in set(table[a]) & set(table[b]):
            exact = set(table[a][task]) & set(table[b][task])
            folded = {t.casefold() for t in table[a][task]} & {t.casefold() for t in table[b][task]}
            assert not exact and not folded, (env, a, b, task, exact or folded)


def test_levels_are_disjoint_globally(wordings) -> None:
    env, table = wordings
    every = {level: {t for texts in table[level].values() for t in texts} for level in LEVELS}
    for a, b in itertools.combinations(LEVELS, 2):
        assert not every[a] & every[b], (env, a, b, sorted(every[a] & every[b])[:3])
        folded = {t.casefold() for t in every[a]} & {t.casefold() for t in every[b]}
        assert not folded, (env, a, b, sorted(folded)[:3])


def test_a_wording_names_one_task_per_level(wordings) -> None:
    env, table = wordings
    for level, per_task in table.items():
        owners: dict[str, str] = {}
        for task, texts in per_task.items():
            for text in texts:
                assert owners.setdefault(text.casefold(), task) == task, (env, level, text)


def test_load_reads_the_shipped_files() -> None:
    data = wording_files.load("clevr")
    assert set(data) == set(LEVELS)
    data["train"] = None  # a copy: the next load is unaffected
    assert wording_files.load("clevr")["train"] is not None
    assert "clevr" in wording_files.available()
    with pytest.raises(UnknownChoiceError) as err:
        wording_files.load("atari")
    assert "clevr" in str(err.value) and "\n" not in str(err.value)


def test_unknown_task_or_level_raises() -> None:
    suite = get_suite("clevr")
    with pytest.raises(UnknownChoiceError):
        suite.instructions("medium", "left:red:blue")
    with pytest.raises(UnknownChoiceError):
        suite.instructions("easy", "left:red:blue")
