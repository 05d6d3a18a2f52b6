"""Labels of imagined rollouts come from each rollout's own states and the task's predicate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kalm_ray.llm.imagine.labels import JUDGED_COLUMNS, label_rollout


class LineSuite:
    """Stand-in suite: task ``right`` = dimension 0 moved at least 0.5 from the start."""

    name = "line"

    def success(self, task, start, state):
        assert task == "right"
        return bool(state[0] - start[0] >= 0.5)

    def reward(self, task, start, state, next_state):
        return float(next_state[0] - state[0]) + (
            1.0 if self.success(task, start, next_state) else 0.0
        )


def rollout(xs: list[float]) -> np.ndarray:
    s = np.zeros((len(xs), 2), np.float32)
    s[:, 0] = xs
    return s


def test_success_cuts_the_rollout_and_terminates():
    states = rollout([0.1, 0.3, 0.7, 0.9, 1.2])
    lab = label_rollout(LineSuite(), "right", states, np.array([1, 2, 3, 4]))
    assert lab.n_steps == 2 and lab.terminated and not lab.truncated
    assert lab.states.shape == (3, 2) and lab.actions.tolist() == [1, 2]
    assert lab.successes.tolist() == [False, True]
    np.testing.assert_allclose(lab.rewards, [0.2, 0.4 + 1.0], rtol=1e-6)


def test_failure_is_kept_whole_and_truncated():
    states = rollout([0.1, 0.2, 0.3])
    lab = label_rollout(LineSuite(), "right", states, np.array([0, 0]))
    assert lab.n_steps == 2 and not lab.terminated and lab.truncated
    assert not lab.successes.any()


def test_each_rollout_uses_its_own_start():
    # Same absolute states, different starts: only the one that moved 0.5 succeeds.
    a = label_rollout(LineSuite(), "right", rollout([0.0, 0.6]), np.array([0]))
    b = label_rollout(LineSuite(), "right", rollout([0.4, 0.6]), np.array([0]))
    assert a.terminated and not b.terminated


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        label_rollout(LineSuite(), "right", rollout([0.0]), np.zeros(0))


def test_judge_batch_columns(monkeypatch):
    from kalm_ray.llm.imagine import labels
    from kalm_ray.llm.imagine.filter import FilterLimits

    class Layout:
        dim = 2

    suite = LineSuite()
    suite.layout = Layout()
    monkeypatch.setattr("kalm_ray.envs.get_suite", lambda name: suite)

    class Dec:
        def decode_rollout(self, start, text, *, max_steps):
            xs = [float(x) for x in text.split()]
            return rollout([float(start[0]), *xs]), np.zeros(len(xs))

    limits = FilterLimits(
        low=np.full(2, -2.0),
        high=np.full(2, 2.0),
        max_step_delta=np.full(2, 0.5),
        quantum=np.full(2, 0.01),
        n_actions=4,
    )
    batch = pa.table(
        {
            "request_id": ["a", "b", "c"],
            "level": ["easy"] * 3,
            "task": ["right"] * 3,
            "start_state": pa.array([[0.0, 0.0]] * 3, pa.list_(pa.float32(), 2)),
            "prompt": ["p"] * 3,
            "generated_text": ["0.3 0.6 0.9", "0.1 0.2", "oops"],
            "num_generated_tokens": [3, 2, 1],
        }
    )
    out = labels.judge_batch(batch, decoder=Dec(), env="line", limits=limits, max_steps=10)
    assert set(JUDGED_COLUMNS) <= set(out.column_names) and "prompt" not in out.column_names
    rows = out.to_pylist()
    assert [r["accepted"] for r in rows] == [True, True, False]
    assert rows[0]["n_steps"] == 2 and rows[0]["terminated"] and rows[0]["success"]
    assert len(rows[0]["states"]) == 3 * 2 and len(rows[0]["rewards"]) == 2
    assert rows[1]["truncated"] and not rows[1]["terminated"]
    assert rows[2]["reason"] == "unparseable" and rows[2]["generated_text"] == "oops"
    assert rows[0]["generated_text"] == ""


def test_clevr_labels_equal_the_predicate():
    """A hand-built CLEVR rollout: red pushed right three times, task move:red:right."""
    from kalm_ray.envs import get_suite

    suite = get_suite("clevr")
    start = np.array([-0.4, 0.0, 0.0, 0.3, 0.3, 0.0, -0.3, 0.4, 0.4, 0.4], np.float32)
    states = np.repeat(start[None], 4, axis=0)
    states[:, 0] = [-0.4, -0.3, -0.2, 0.05]  # +0.1, +0.2 (goal: +0.15), +0.45
    actions = np.array([0, 0, 0])
    lab = label_rollout(suite, "move:red:right", states, actions)
    want = [suite.success("move:red:right", start, s) for s in states[1:]]
    assert want == [False, True, True]
    assert lab.successes.tolist() == want[:2] and lab.terminated and lab.n_steps == 2
    np.testing.assert_allclose(
        lab.rewards,
        [suite.reward("move:red:right", start, states[t], states[t + 1]) for t in range(2)],
        rtol=1e-6,
    )
    # The same states for a goal that never holds: kept whole, truncated, rewards per step.
    other = label_rollout(suite, "move:red:left", states, actions)
    assert other.n_steps == 3 and other.truncated and not other.successes.any()
    assert [suite.success("move:red:left", start, s) for s in states[1:]] == [False] * 3


# ---- composite Meta-World tasks: stage order decides success ---------------------------------


def _coffee_state(*, mug_ok: bool, pressed: bool) -> np.ndarray:
    """A made-up 91-d make-coffee state: mug under the spout or not, button pressed or not."""
    import importlib

    from helpers import slot_state

    mw = importlib.import_module("kalm_ray.envs.metaworld.tasks")
    machine = np.array([0.0, 0.95, 0.0])
    goal = machine + mw.COFFEE_BUTTON_GOAL_OFFSET
    return slot_state(
        goal=goal,
        object=machine + mw.SPOUT_OFFSET + ([0, 0, 0] if mug_ok else [0, -0.2, 0]),
        coffee_machine=machine,
        coffee_button=goal + ([0, 0.005, 0] if pressed else [0, -0.03, 0]),
        gripper=[0, 0.6, 0.2],
    )


def test_composite_task_needs_its_stages_in_order():
    from kalm_ray.envs import get_suite

    suite = get_suite("metaworld")
    none = _coffee_state(mug_ok=False, pressed=False)
    mug = _coffee_state(mug_ok=True, pressed=False)
    button = _coffee_state(mug_ok=False, pressed=True)
    both = _coffee_state(mug_ok=True, pressed=True)
    actions = np.zeros((3, 4), np.float32)

    in_order = label_rollout(suite, "make-coffee", np.stack([none, mug, both, both]), actions)
    assert in_order.terminated and in_order.n_steps == 2
    assert in_order.successes.tolist() == [False, True]

    # Button first, then the mug: the last state is the same, but the order is wrong. The
    # one-state predicate alone would call it a success (the button stays pressed).
    assert suite.success("make-coffee", none, both)
    wrong = label_rollout(suite, "make-coffee", np.stack([none, button, both, both]), actions)
    assert not wrong.terminated and wrong.truncated and wrong.n_steps == 3
    assert not wrong.successes.any()
