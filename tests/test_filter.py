"""The validity filter: the right reason for each kind of bad rollout, and it never raises."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm_ray.llm.imagine.filter import (
    REASONS,
    FilterLimits,
    FilterTally,
    Verdict,
    check_arrays,
    check_text,
)

D = 4
LIMITS = FilterLimits(
    low=np.full(D, -1.0),
    high=np.full(D, 1.0),
    max_step_delta=np.full(D, 0.3),
    quantum=np.full(D, 2.0 / 63),
    bounds_tolerance=0.02,
    step_tolerance=0.1,
    n_actions=8,
)
START = np.zeros(D, np.float32)


def walk(n: int, step: float = 0.1) -> np.ndarray:
    """``(n + 1, D)``: dimension 0 moves by ``step`` each step, the rest stay."""
    s = np.zeros((n + 1, D))
    s[:, 0] = step * np.arange(n + 1)
    return s


def test_valid_rollout_is_accepted_unchanged():
    v = check_arrays(START, walk(5), np.arange(5) % 8, limits=LIMITS, max_steps=10)
    assert v.accepted and v.reason is None and v.repairs == 0
    assert v.states.dtype == np.float32 and v.states.shape == (6, D)
    assert v.actions.dtype == np.int64 and v.n_steps == 5


def test_small_overshoot_is_clipped_and_counted():
    s = walk(3)
    s[:, 1] = [0.4, 0.6, 0.9, 1.03]  # 1.5% of the range (2.0) beyond the bound: within 2%
    v = check_arrays(s[0], s, [1, 2, 3], limits=LIMITS, max_steps=10)
    assert v.accepted, v
    assert v.repairs == 1 and v.states[3, 1] == pytest.approx(1.0)


def far_out() -> np.ndarray:
    s = walk(3)
    s[3, 3] = 1.2  # 10% of the range beyond the bound
    return s


@pytest.mark.parametrize(
    ("states", "actions", "reason"),
    [
        (walk(0), np.zeros(0), "empty"),
        (walk(12), np.zeros(12), "too_long"),
        (np.zeros((4, D + 1)), np.zeros(3), "wrong_step_shape"),
        (walk(3), np.zeros(2), "wrong_step_shape"),
        (walk(3), np.zeros((3, 2)), "wrong_step_shape"),
        (np.where(np.eye(4, D) > 0, np.nan, walk(3)), np.zeros(3), "non_finite"),
        (walk(3), np.array([0, 9, 1]), "bad_action"),
        (walk(3), np.array([0, 1.5, 1]), "bad_action"),
        (walk(3), np.array([0, -1, 1]), "bad_action"),
        (far_out(), np.zeros(3), "out_of_bounds"),
        (walk(2, step=0.45), np.zeros(2), "impossible_step"),
        (np.zeros((6, D)), np.zeros(5), "no_progress"),
        (walk(5, step=0.005), np.zeros(5), "no_progress"),  # moves, but less than one bin
    ],
)
def test_each_reason(states, actions, reason):
    v = check_arrays(START, states, actions, limits=LIMITS, max_steps=10)
    assert not v.accepted
    assert v.reason == reason, v.detail
    assert v.reason in REASONS


def test_ragged_steps_are_wrong_shape():
    v = check_arrays(START, [[0, 0, 0, 0], [0.1, 0, 0]], [0], limits=LIMITS, max_steps=10)
    assert v.reason == "wrong_step_shape"


def test_continuous_actions_clip_within_tolerance_and_reject_beyond():
    lim = FilterLimits(
        low=LIMITS.low,
        high=LIMITS.high,
        max_step_delta=LIMITS.max_step_delta,
        quantum=LIMITS.quantum,
        action_low=-np.ones(2),
        action_high=np.ones(2),
    )
    ok = check_arrays(START, walk(2), [[0.5, 1.01], [-1.02, 0.0]], limits=lim, max_steps=10)
    assert ok.accepted and ok.repairs == 2 and ok.actions.dtype == np.float32
    assert np.abs(ok.actions).max() == pytest.approx(1.0)
    bad = check_arrays(START, walk(2), [[0.5, 1.5], [0, 0]], limits=lim, max_steps=10)
    assert bad.reason == "bad_action"


def test_limits_for_suite():
    class S:
        class layout:
            low, high = np.array([-1.0, 0.0]), np.array([1.0, 2.0])
            max_step_delta = np.array([0.3, 0.3])

        action_space = gym.spaces.Discrete(40)

    lim = FilterLimits.for_suite(S, n_bins=10, bounds_tolerance=0.05)
    assert lim.n_actions == 40 and lim.action_low is None
    assert np.allclose(lim.quantum, [0.2, 0.2]) and lim.bounds_tolerance == 0.05
    S.action_space = gym.spaces.Box(-1, 1, (4,))
    lim = FilterLimits.for_suite(S, n_bins=10)
    assert lim.n_actions is None and lim.action_low.shape == (4,)


# ---- texts: never raises, whatever the decoder does ---------------------------------------


class CodecError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class FakeDecoder:
    """Decodes "a,b,c,d|act;..." steps; misbehaves on purpose for some inputs."""

    def decode_rollout(self, start_state, text, *, max_steps):
        if "boom" in text:
            raise ZeroDivisionError("decoder bug")
        if "weird" in text:
            raise CodecError("some_new_reason", "not in our list")
        steps = [s for s in text.split(";") if s.strip()]
        if len(steps) > max_steps:
            raise CodecError("too_long", f"{len(steps)} steps")
        states, actions = [list(start_state)], []
        for s in steps:
            vals, _, act = s.partition("|")
            states.append([float(x) for x in vals.split(",")])
            actions.append(int(act))
        return states, actions  # lists: a ragged rollout reaches the filter as it is


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "empty"),
        ("", "empty"),
        ("   ", "empty"),
        (float("nan"), "empty"),
        ("boom", "unparseable"),
        ("weird", "unparseable"),
        ("x,y|z", "unparseable"),  # float('x') raises ValueError inside the decoder
        ("0.1,0,0,0|1;" * 11, "too_long"),
        ("0.1,0,0,0|1;0.2,0,0|1", "wrong_step_shape"),
        ("nan,0,0,0|1", "non_finite"),
        ("0.9,0,0,0|1", "impossible_step"),
        ("0.1,0,0,0|1;0.2,0,0,0|2", None),
        (b"0.1,0,0,0|1", None),
    ],
)
def test_check_text_reasons(text, reason):
    v = check_text(FakeDecoder(), START, text, limits=LIMITS, max_steps=10)
    assert isinstance(v, Verdict)
    assert v.reason == reason, v.detail
    assert v.accepted == (reason is None)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=40), st.none(), st.floats()))
def test_check_text_never_raises(text):
    v = check_text(FakeDecoder(), START, text, limits=LIMITS, max_steps=10)
    assert v.accepted or v.reason in REASONS


def test_tally_report():
    t = FilterTally(max_examples=1)
    t.add(
        level="easy",
        task="a",
        accepted=True,
        reason=None,
        repairs=2,
        success=True,
        kept=True,
        tokens=10,
    )
    t.add(
        level="easy",
        task="a",
        accepted=False,
        reason="too_long",
        repairs=0,
        success=False,
        kept=False,
        tokens=30,
        text="xx",
        detail="d",
    )
    t.add(
        level="hard",
        task="b",
        accepted=False,
        reason="too_long",
        repairs=0,
        success=False,
        kept=False,
        tokens=5,
        text="yy",
    )
    r = t.report()
    assert (
        r["requested"] == 3 and r["accepted"] == 1 and math.isclose(r["accepted_fraction"], 1 / 3)
    )
    assert r["reasons"]["too_long"] == 2 and set(REASONS) <= set(r["reasons"])
    assert r["per_level"]["easy"]["accepted_fraction"] == 0.5
    assert r["per_task"]["easy"]["a"]["repaired_values"] == 2
    assert r["generated_tokens"] == 45
    assert len(r["examples"]["too_long"]) == 1


# ---- the real codec and the CLEVR-Robot suite: the acceptance battery ---------------------


@pytest.fixture(scope="module")
def clevr():
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.codec import Codec

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, n_bins=64)
    return suite, codec, FilterLimits.for_suite(suite, n_bins=64)


def clevr_rollout(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Red ball pushed right by 0.2 per step from a fixed scene: ``(n + 1, 10)``, ``(n,)``.
    It passes the other balls at least 0.3 away (closer would be an ``overlap``)."""
    start = np.array([-0.4, 0.0, 0.0, 0.3, 0.3, -0.3, -0.3, 0.4, 0.4, 0.4], np.float32)
    states = np.repeat(start[None], n + 1, axis=0)
    states[:, 0] += 0.2 * np.minimum(np.arange(n + 1), 4)  # stops at the wall's reach
    return states, np.zeros(n, np.int64)


def battery(codec) -> list[tuple[str, str | None]]:
    states, actions = clevr_rollout(3)
    good = codec.encode_trajectory(states, actions)
    toks = codec.encode_steps(states, actions)
    jump = states.copy()
    jump[1:, 2] = [-0.45, 0.5, 0.5]  # blue jumps 0.95 in one push (CLEVR max 0.45)
    long_s, long_a = clevr_rollout(10 * 5)
    return [
        ("", "empty"),
        (codec.end_token, "empty"),
        (good, None),
        (" ".join(toks) + " " + codec.end_token, None),  # whitespace between tokens is noise
        (good + "instruction: trailing words after the end", None),
        (codec.join(toks[:-4]), "wrong_step_shape"),  # generation cut in the middle of a step
        (codec.join(toks[:-4]) + codec.end_token, "wrong_step_shape"),
        (codec.join(toks), "no_end"),
        ("move the red ball " + good, "unparseable"),  # words where codec tokens belong
        (
            good.replace(codec.bin_tokens[0], "[unused999]", 1)
            if codec.bin_tokens[0] in good
            else toks[0] + "[unused999]" + codec.end_token,
            "unparseable",
        ),  # a token outside the codec
        ("nan nan inf " + codec.end_token, "unparseable"),
        (codec.join([*codec.action_tokens[:1]] * 12) + codec.end_token, "wrong_step_shape"),
        (codec.encode_trajectory(long_s, long_a), "too_long"),  # 10x the limit
        (codec.encode_trajectory(jump, actions), "impossible_step"),
        (codec.encode_trajectory(np.repeat(states[:1], 4, axis=0), actions), "no_progress"),
        ("\x00\ufffd" * 50, "unparseable"),
    ]


def test_codec_battery(clevr):
    suite, codec, limits = clevr
    for text, reason in battery(codec):
        v = check_text(codec, clevr_rollout(3)[0][0], text, limits=limits, max_steps=5)
        assert v.reason == reason, (text[:80], v.detail)
        if reason is None:
            assert v.accepted and v.n_steps == 3
            np.testing.assert_allclose(v.states, clevr_rollout(3)[0], atol=1.2 / 64)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_codec_texts_never_raise(clevr, data):
    suite, codec, limits = clevr
    pieces = st.one_of(
        st.sampled_from(codec.all_tokens),
        st.sampled_from(["nan", " ", "x", "[unused1]"]),
        st.text(max_size=3),
    )
    text = "".join(data.draw(st.lists(pieces, max_size=60)))
    v = check_text(codec, clevr_rollout(1)[0][0], text, limits=limits, max_steps=5)
    assert v.accepted or v.reason in REASONS


def _clevr_delta():
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.codec import Codec

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, n_bins=64, state_coding="delta")
    return suite, codec, FilterLimits.for_suite(suite, n_bins=64)


def test_a_ball_pushed_into_another_is_an_overlap():
    """Balls do not pass through each other: a world model blind to collisions writes a pushed
    ball into the ball in its way (measured: a quarter of the cpu preset's imagined first steps),
    and neither the per-coordinate nor the summed limit can see it. Touching balls (0.26 apart)
    and a ball riding up on another (0.195 apart seen from above) pass."""
    suite, codec, limits = _clevr_delta()
    start = np.array([-0.4, 0.0, 0.2, 0.0, 0.3, -0.3, -0.3, 0.4, 0.4, 0.4], np.float32)

    def verdict(red_x: float) -> Verdict:
        nxt = start.copy()
        nxt[0] = red_x  # red pushed right (action 0) toward blue, which does not move
        text = codec.encode_trajectory(np.stack([start, nxt]), np.array([0]))
        return check_text(codec, start, text, limits=limits, max_steps=5)

    assert verdict(0.2 - 0.26).accepted  # touching
    assert verdict(0.2 - 0.195).accepted  # riding up
    v = verdict(0.2 - 0.1)
    assert v.reason == "overlap" and "objects 0 and 1" in v.detail
    assert verdict(0.2).reason == "overlap"  # red where blue is
    # A start with two balls that close already (not a CLEVR start) is not the model's doing:
    # they may stay as close, not come closer.
    wedged = start.copy()
    wedged[4:6] = start[2:4] + [0.0, 0.1]  # green 0.1 behind blue
    still = wedged.copy()
    still[0] = -0.2  # red pushed right, far from both
    text = codec.encode_trajectory(np.stack([wedged, still]), np.array([0]))
    assert check_text(codec, wedged, text, limits=limits, max_steps=5).accepted


def test_physics_fires_under_delta_coding_the_pipeline_uses():
    """Issue 11: under delta coding no written change exceeds the codec's bound (0.45), so the
    per-coordinate check alone could never fire; the summed movement and the walls' reach do."""
    from kalm_ray.envs.clevr.env import CLEVRRobotEnv

    suite, codec, limits = _clevr_delta()
    env = CLEVRRobotEnv(level="train")
    rng = np.random.default_rng(3)
    accepted = 0
    for ep in range(30):  # real pushes, encoded and decoded as the pipeline does: accepted
        s, _ = env.reset(seed=ep)
        states, actions = [s], []
        for _ in range(4):
            a = int(rng.integers(40))
            s, *_ = env.step(a)
            states.append(s)
            actions.append(a)
        text = codec.encode_trajectory(np.stack(states), np.asarray(actions))
        v = check_text(codec, states[0], text, limits=limits, max_steps=10)
        accepted += v.accepted or v.reason == "no_progress"
    assert accepted == 30
    start = np.array([-0.45, 0.0, -0.3, 0.2, -0.15, 0.4, 0.0, -0.1, -0.2, 0.1], np.float32)
    every_ball = np.stack([start, start + np.tile([0.45, 0.0], 5).astype(np.float32)])
    text = codec.encode_trajectory(every_ball, np.array([0]))
    v = check_text(codec, start, text, limits=limits, max_steps=10)
    assert v.reason == "impossible_step" and "in all" in v.detail
    # One ball pushed through the front wall's reach is impossible too.
    through = start.copy()
    through[8] = 0.2  # cyan x -0.2 -> 0.2 is a normal push, so first check the test's premise
    text = codec.encode_trajectory(np.stack([start, through]), np.array([32]))
    assert check_text(codec, start, text, limits=limits, max_steps=10).accepted
    through[6], through[8] = 0.0, -0.2
    through[7] = -0.25  # purple y -0.1 -> -0.25: within the walls, below their reach (-0.17)
    text = codec.encode_trajectory(np.stack([start, through]), np.array([27]))
    v = check_text(codec, start, text, limits=limits, max_steps=10)
    assert v.reason == "impossible_step" and "reach" in v.detail


def test_physical_rejection_scores_one_step_from_a_real_state():
    """The grounding metric's per-step check (``dynamics_rejected``): real MuJoCo pushes pass,
    a pushed ball written into the ball in its way is an ``overlap``, and a push that moves
    nothing (a ball against a wall) is not rejected: ``no_progress`` judges whole rollouts."""
    from kalm_ray.envs.clevr.env import CLEVRRobotEnv
    from kalm_ray.llm.imagine.filter import physical_rejection

    _, _, limits = _clevr_delta()
    env = CLEVRRobotEnv(level="train")
    rng = np.random.default_rng(0)
    for ep in range(10):
        s, _ = env.reset(seed=ep)
        for _ in range(3):
            a = int(rng.integers(40))
            nxt, *_ = env.step(a)
            assert physical_rejection([s, nxt], [a], limits) is None
            s = nxt
    start = np.array([-0.1, 0.0, 0.2, 0.0, 0.3, -0.3, -0.3, 0.4, 0.4, 0.4], np.float32)
    into = start.copy()
    into[0] = 0.12  # red pushed right (action 0) by 0.22, onto blue, which stays
    assert physical_rejection([start, into], [0], limits) == "overlap"
    assert physical_rejection([start, start], [0], limits) is None


def test_dynamics_metrics_score_the_real_next_states_through_the_filter():
    """``dynamics_rejected_real`` is exactly the share of the given real next states the filter
    rejects: three real MuJoCo pushes pass and one ball written into another does not (the
    ground stage's own test runs on a toy world whose pushes ignore collisions, so it can only
    check the range)."""
    from helpers import SMALL

    from kalm_ray.envs.clevr.env import CLEVRRobotEnv
    from kalm_ray.llm.ground.metrics import dynamics_metrics
    from kalm_ray.llm.model import build_tiny

    _, codec, limits = _clevr_delta()
    env = CLEVRRobotEnv(level="train")
    s, _ = env.reset(seed=0)
    transitions = []
    for a in (3, 17, 30):
        nxt, *_ = env.step(a)
        transitions.append((s, a, nxt))
        s = nxt
    start = np.array([-0.1, 0.0, 0.2, 0.0, 0.3, -0.3, -0.3, 0.4, 0.4, 0.4], np.float32)
    into = start.copy()
    into[0] = 0.12  # red pushed right onto blue (see the test above)
    transitions.append((start, 0, into))
    model, tok = build_tiny(codec, ["push the red ball left"], overrides=SMALL)
    m = dynamics_metrics(model, tok, codec, transitions, batch_size=4, device="cpu", limits=limits)
    assert m["dynamics_n"] == 4
    assert m["dynamics_rejected_real"] == 0.25
    assert 0.0 <= m["dynamics_rejected"] <= 1.0
