"""CLEVR symmetries (``ground.relabel_copies``): a relabelled real episode is a real episode.

Real MuJoCo: scripted-pusher episodes are relabelled (colours renamed, table mirrored) and
their relabelled actions replayed from the relabelled start; the simulator must give the
relabelled states and the renamed goal must hold at the end.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kalm_ray.envs.clevr.env import CLEVRRobotEnv
from kalm_ray.envs.clevr.scripted import ScriptedPolicy
from kalm_ray.envs.clevr.symmetry import Relabel, random_relabel, relabel_episode
from kalm_ray.envs.clevr.tasks import success
from kalm_ray.envs.clevr.wordings import instructions


def _scripted_episode(task: str, seed: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    env = CLEVRRobotEnv("train", task=task)
    obs, info = env.reset(seed=seed)
    pusher = ScriptedPolicy(task)
    states, actions = [obs], []
    for _ in range(12):
        a = pusher.act(env)
        obs, _, term, trunc, _ = env.step(a)
        states.append(obs)
        actions.append(a)
        if term or trunc:
            break
    # The lookahead of step 0: every push's real next state from the start.
    look = np.full((len(actions), 40, 10), np.nan, np.float32)
    for a in range(40):
        env.reset(options={"state": states[0]})
        look[0, a] = env.step(a)[0]
    return env.instruction, np.array(states), np.array(actions), look


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relabelled_episode_replays_exactly(seed: int) -> None:
    task = ["left:red:blue", "behind:green:cyan", "right:purple:red"][seed]
    text, states, actions, look = _scripted_episode(task, seed)
    assert success(task, states[0], states[-1])
    env = CLEVRRobotEnv("train")
    rng = np.random.default_rng(seed)
    for relabel in [random_relabel(rng) for _ in range(3)] + [Relabel((4, 3, 2, 1, 0), True)]:
        new_task, new_text, s, a, la = relabel_episode(relabel, task, text, states, actions, look)
        assert success(new_task, s[0], s[-1])
        assert new_text == instructions("train", new_task)[instructions("train", task).index(text)]
        env.reset(options={"state": s[0], "task": new_task})
        for t, act in enumerate(a):
            np.testing.assert_allclose(env.step(int(act))[0], s[t + 1], atol=1e-5)
        for act in range(40):  # the relabelled lookahead is each relabelled push's next state
            env.reset(options={"state": s[0]})
            np.testing.assert_allclose(env.step(act)[0], la[0, act], atol=1e-5)
        assert np.isnan(la[1:]).all()


def test_relabel_group_facts() -> None:
    # 240 distinct relabellings; each maps the 40 actions and the 80 relation goals one-to-one
    # and only the mirror swaps left and right.
    from kalm_ray.envs.clevr.tasks import pairwise_tasks

    goals = pairwise_tasks()
    for perm in itertools.islice(itertools.permutations(range(5)), 0, 120, 17):
        for mirror in (False, True):
            r = Relabel(perm, mirror)
            assert sorted(r.action(a) for a in range(40)) == list(range(40))
            assert sorted(r.task(g) for g in goals) == sorted(goals)
            assert r.task("behind:red:blue").startswith("behind:")
            assert r.task("left:red:blue").startswith("right:" if mirror else "left:")
    # The wording of a copy is picked by position: every relation goal has the same templates.
    assert len({len(instructions("train", g)) for g in goals}) == 1
    identity = Relabel((0, 1, 2, 3, 4), False)
    s = np.arange(20, dtype=np.float32).reshape(2, 10)
    assert np.array_equal(identity.states(s), s)
    assert random_relabel(np.random.default_rng(3)) == random_relabel(np.random.default_rng(3))


def test_relabel_refuses_what_it_cannot_map() -> None:
    s, a = np.zeros((2, 10), np.float32), np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="not a relation"):
        relabel_episode(Relabel((0, 1, 2, 3, 4), True), "move:red:left", "x", s, a)
    with pytest.raises(ValueError, match="not a train wording"):
        relabel_episode(Relabel((0, 1, 2, 3, 4), True), "left:red:blue", "Hello.", s, a)
