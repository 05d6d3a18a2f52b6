"""The diagnostic scripts' pure parts (``scripts/`` is not a package: imported by path)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from action_tokens_probe import ActionText  # noqa: E402
from hard_replay import replay_parts  # noqa: E402
from wording_probe import probe  # noqa: E402


def test_wording_probe_reads_what_the_features_hold():
    """Goals that the features separate are read right; features without them, at chance."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 3.0
    y_train, y_test = np.repeat(np.arange(8), 20), np.repeat(np.arange(8), 10)
    x_train = centres[y_train] + rng.normal(size=(len(y_train), 16))
    x_test = centres[y_test] + rng.normal(size=(len(y_test), 16))
    linear, nearest = probe(x_train, y_train, x_test, y_test)
    assert linear > 0.95 and nearest > 0.9
    noise = rng.normal(size=x_test.shape)
    linear, nearest = probe(x_train, y_train, noise, y_test)
    assert linear < 0.35 and nearest < 0.35  # chance is 1/8


def test_hard_replay_scores_parts_met_in_mujoco():
    """A hard episode whose actions are the scripted pusher's for its first relation: replayed
    in MuJoCo, that relation holds at the end; the same episode under another level is
    ignored, and random actions of the same length start from the same state."""
    import pyarrow as pa

    from kalm_ray.envs import get_suite
    from kalm_ray.envs.clevr.env import CLEVRRobotEnv
    from kalm_ray.envs.clevr.scripted import ScriptedPolicy

    suite = get_suite("clevr")
    task = "multi:left:blue:green+right:cyan:purple"
    first = suite.parts(task)[0]
    env = CLEVRRobotEnv("hard", task=task)
    state, _ = env.reset(seed=3)
    start, states, actions = np.asarray(state, np.float32), [], []
    policy = ScriptedPolicy(first, epsilon=0.0, rng=np.random.default_rng(0))
    while not suite.success(first, start, state) and len(actions) < 12:
        states.append(np.asarray(state, np.float32))
        actions.append(policy.act(env))
        state, *_ = env.step(actions[-1])
    assert suite.success(first, start, state) and not suite.success(first, start, start)
    n = len(actions)
    rows = {
        "episode_id": ["a"] * n + ["b"] * n,
        "t": list(range(n)) * 2,
        "task": [task] * 2 * n,
        "level": ["hard"] * n + ["train"] * n,
        "state": [s.tolist() for s in states] * 2,
        "action": actions * 2,
    }
    out = replay_parts(pa.table(rows), suite, seed=0)
    assert out["rollouts"] == 1 and out["mean_steps"] == n
    assert out["parts_at_start"] < 0.5 <= out["parts_at_end"]
    assert 0.0 <= out["random_parts_at_end"] <= 1.0 and out["random_goal"] in (0.0, 1.0)


def test_action_tokens_probe_writes_each_push_once_in_every_mode():
    """The probe's three action texts: 40 distinct pushes each (ball token then direction token
    when factored), and under ``named`` each ball's token just before its two coordinates."""
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.codec import Codec

    codec = Codec.for_suite(get_suite("clevr"), 64, state_coding="delta")
    state = np.linspace(-0.3, 0.3, 10).astype(np.float32)
    for mode in ("joint", "factored", "named"):
        fmt = ActionText(codec, mode)
        texts = [fmt.action(a) for a in range(40)]
        assert len(set(texts)) == 40
        if mode != "joint":
            assert fmt.action(3 * 8 + 5) == fmt.balls[3] + fmt.dirs[5]
    plain = codec.encode_state(state)
    named, _ = codec._lex(ActionText(codec, "named").state(state))
    assert named[3:6] == [codec.action_tokens[1], *plain[2:4]]  # blue, then blue.x blue.y
