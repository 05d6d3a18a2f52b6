"""CLEVR-Robot goals: task lists, predicates on hand-built states, rewards, scripted policy."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

import kalm_ray.envs.clevr as suite
from kalm_ray.envs import UnknownChoiceError, get_suite
from kalm_ray.envs.suite import LEVELS, Suite

# The suite exports the function ``tasks``, which shadows the submodule of the same name
# as a package attribute; import the module by its full name.
T = importlib.import_module("kalm_ray.envs.clevr.tasks")

BLUE = np.array([0.0, 0.2])


def place(**balls: tuple[float, float]) -> np.ndarray:
    """A state with the named balls where given and the rest parked far apart in the corners."""
    corners = iter([(-0.45, -0.15), (0.45, -0.15), (-0.45, 0.55), (0.45, 0.55), (0.0, -0.15)])
    return np.concatenate(
        [np.array(balls[c]) if c in balls else np.array(next(corners)) for c in T.COLORS]
    )


def rotate(v: np.ndarray, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def test_suite_contract() -> None:
    assert get_suite("clevr") is suite
    assert isinstance(suite, Suite)
    assert suite.name == "clevr" and suite.max_episode_steps == 50
    assert suite.action_space.n == 40
    assert suite.layout.names[:3] == ("red.x", "red.y", "blue.x") and suite.layout.dim == 10
    assert suite.layout.low.dtype == np.float32 and np.all(suite.layout.low < suite.layout.high)
    np.testing.assert_allclose(suite.layout.low[:2], [-0.6, -0.3])
    np.testing.assert_allclose(suite.layout.high[:2], [0.6, 0.7])


def test_task_lists() -> None:
    assert len(T.tasks("train")) == 80 and T.tasks("rephrase") == T.tasks("train")
    assert T.tasks("train")[:2] == ["behind:red:blue", "behind:red:green"]
    assert len(T.tasks("easy")) == 20 and "move:red:left" in T.tasks("easy")
    hard = T.tasks("hard")
    assert len(hard) == 92 and hard[-2:] == ["line", "gather"]
    assert sum(t.count("+") == 1 for t in hard) == 60
    assert sum(t.count("+") == 2 for t in hard) == 30
    for level in LEVELS:
        assert len(set(T.tasks(level))) == len(T.tasks(level))


def test_hard_goals_are_the_generated_ones() -> None:
    assert T.generate_hard_tasks() == T.hard_tasks()


def test_hard_goals_are_jointly_satisfiable_and_distinct() -> None:
    seen = set()
    for task in T.tasks("hard"):
        state = T.witness(task)
        assert state is not None and T.success(task, state, state), task
        goal = T.parse_task(task)
        if isinstance(goal, T.Multi):
            pairs = [frozenset((r.a, r.b)) for r in goal.relations]
            assert len(set(pairs)) == len(pairs), task
            key = frozenset(T._canonical(r) for r in goal.relations)
            assert key not in seen, task
            seen.add(key)


def test_contradictions_have_no_witness() -> None:
    assert T.witness("multi:left:red:blue+left:blue:green+left:green:red") is None
    assert T.witness("multi:behind:red:blue+behind:blue:green+behind:green:red") is None


@pytest.mark.parametrize("direction", ["behind", "left", "front", "right"])
def test_relation_predicate(direction: str) -> None:
    u = np.array(T.DIRECTIONS[direction])
    task = f"{direction}:red:blue"
    for offset, holds in [
        (0.30 * u, True),
        (0.27 * u, True),
        (rotate(0.32 * u, 40), True),
        (rotate(0.32 * u, -40), True),
        (rotate(0.32 * u, 50), False),  # outside the 90 degree wedge
        (rotate(0.32 * u, 180), False),
        (0.40 * u, False),  # too far apart
    ]:
        state = place(red=BLUE + offset, blue=BLUE)
        assert T.success(task, state, state) is holds, (offset, holds)
        assert (T.distance(task, state, state) == 0.0) is holds
    # The other three directions fail on the state where this one holds.
    state = place(red=BLUE + 0.3 * u, blue=BLUE)
    for other in T.DIRECTIONS:
        assert T.success(f"{other}:red:blue", state, state) is (other == direction)
    # Same goal, other id: "red left of blue" == "blue right of red".
    opposite = {"behind": "front", "front": "behind", "left": "right", "right": "left"}
    assert T.success(f"{opposite[direction]}:blue:red", state, state)


@pytest.mark.parametrize("direction", ["behind", "left", "front", "right"])
def test_move_predicate(direction: str) -> None:
    task = f"move:green:{direction}"
    u = np.array(T.DIRECTIONS[direction])
    start = place(green=(0.0, 0.2))
    for shift, holds in [(0.16 * u, True), (0.14 * u, False), (rotate(0.3 * u, 90), False)]:
        state = place(green=np.array([0.0, 0.2]) + shift)
        assert T.success(task, start, state) is holds
        assert not T.success(task, state, state)  # progress is measured from the start
    assert T.valid_start(task, start)
    assert not T.valid_start(task, place(green=(0.4 * u[0], 0.2 + 0.3 * u[1])))  # at a wall


def test_line_predicate() -> None:
    state = T.witness("line")
    assert T.success("line", state, state)
    xy = state.reshape(5, 2)
    swapped = xy[[1, 0, 2, 3, 4]].ravel()
    assert not T.success("line", swapped, swapped)
    # One step at 35 degrees breaks it, 25 degrees is fine.
    for degrees, holds in [(25, True), (35, False), (-35, False)]:
        bent = np.stack([np.arange(5) * 0.22 - 0.44, np.full(5, 0.2)], 1)
        bent[3:] += rotate(np.array([0.22, 0.0]), degrees) - np.array([0.22, 0.0])
        assert T.success("line", bent.ravel(), bent.ravel()) is holds, degrees


def test_gather_predicate() -> None:
    state = T.witness("gather")
    assert T.success("gather", state, state)
    green = state[4:6]
    far = state.copy()
    far[0:2] = green + np.array([-0.33, 0.0])  # red just outside 0.325
    assert not T.success("gather", far, far)
    assert T.distance("gather", far, far) > 0.0


def test_multi_predicates() -> None:
    two = "multi:left:red:blue+behind:green:blue"
    three = "multi:left:red:blue+behind:green:blue+right:cyan:blue"
    state = place(
        red=BLUE + np.array([-0.3, 0.0]),
        blue=BLUE,
        green=BLUE + np.array([0.0, 0.3]),
        cyan=BLUE + np.array([0.3, 0.0]),
    )
    assert T.success(two, state, state) and T.success(three, state, state)
    broken = state.copy()
    broken[8:10] = BLUE + np.array([0.0, -0.3])  # cyan in front of, not right of, blue
    assert T.success(two, broken, broken) and not T.success(three, broken, broken)
    assert T.distance(three, broken, broken) == pytest.approx(
        T.distance("right:cyan:blue", broken, broken)
    )
    assert T.distance("right:cyan:blue", broken, broken) == pytest.approx(
        np.linalg.norm(np.array([0.0, -0.3]) - np.array([0.32, 0.0]))
    )


def test_parts_are_training_goals_whose_conjunction_is_the_goal() -> None:
    """``parts`` (read by ``imagine.compose``): a multi-relation goal's relations, each a
    training task, holding all at once exactly where the goal holds; any other goal is its
    own single part."""
    train = set(suite.tasks("train"))
    rng = np.random.default_rng(0)
    hard = suite.tasks("hard")
    witnesses = [T.witness(t) for t in hard if t not in ("line", "gather")]
    states = [*rng.uniform([-0.47, -0.17] * 5, [0.47, 0.57] * 5, size=(400, 10)), *witnesses]
    for task in hard:
        parts = suite.parts(task)
        if task in ("line", "gather"):
            assert parts == [task]
            continue
        assert len(parts) in (2, 3) and set(parts) <= train
        assert suite.success(task, T.witness(task), T.witness(task))
        for s in states:
            assert suite.success(task, s, s) == all(suite.success(p, s, s) for p in parts)
    for level in ("train", "easy"):
        assert all(suite.parts(t) == [t] for t in suite.tasks(level))


def test_reward_is_progress_plus_bonus() -> None:
    task = "left:red:blue"
    goal = place(red=BLUE + np.array([-0.3, 0.0]), blue=BLUE)
    far = place(red=BLUE + np.array([0.0, 0.4]), blue=BLUE)
    d = T.distance(task, far, far)
    assert T.reward(task, far, far, goal) == pytest.approx(d / T.PUSH_LENGTH + 1.0)
    assert T.reward(task, far, goal, far) == pytest.approx(-d / T.PUSH_LENGTH)
    assert T.reward(task, far, far, far) == 0.0
    assert suite.reward is T.reward and suite.success is T.success


def test_unknown_names_raise_one_line() -> None:
    for bad in ["left:red:red", "up:red:blue", "move:red:up", "multi:left:red:blue", "spin"]:
        with pytest.raises(UnknownChoiceError) as err:
            T.parse_task(bad)
        assert "\n" not in str(err.value) and "valid choices" in str(err.value)
    with pytest.raises(UnknownChoiceError) as err:
        T.tasks("medium")
    assert "train" in str(err.value)


def test_scripted_policy_solves_train_tasks() -> None:
    from kalm_ray.envs.clevr.env import CLEVRRobotEnv
    from kalm_ray.envs.clevr.scripted import ScriptedPolicy

    sample = [
        "left:red:blue",
        "behind:green:cyan",
        "front:purple:red",
        "right:cyan:green",
        "left:blue:purple",
        "behind:red:cyan",
        "front:green:blue",
        "right:purple:red",
    ]
    wins = 0
    for seed, task in enumerate(sample):
        env = CLEVRRobotEnv("train", task=task)
        env.reset(seed=seed)
        policy = ScriptedPolicy(task, epsilon=0.0, rng=np.random.default_rng(seed))
        for _ in range(50):
            _, _, terminated, truncated, info = env.step(policy.act(env))
            if terminated or truncated:
                break
        wins += info["success"]
    print(f"scripted success on {len(sample)} train tasks: {wins / len(sample):.2f}")
    assert wins / len(sample) >= 0.8


def test_scripted_policy_is_deterministic_and_takes_states() -> None:
    from kalm_ray.envs.clevr.scripted import ScriptedPolicy

    state = place(red=(0.3, 0.2), blue=(-0.1, 0.2))
    acts = [
        ScriptedPolicy("left:red:blue", 0.3, np.random.default_rng(1)).act(state) for _ in range(2)
    ]
    assert acts[0] == acts[1] and 0 <= acts[0] < 40
    greedy = ScriptedPolicy("move:red:left", 0.0, np.random.default_rng(0)).act(state)
    assert greedy in (2, 5, 7)  # red (ball 0): a push with a -x component
