"""Model output is untrusted: random token streams through decode + filter (+ labels).

tests/test_filter.py already checks that ``check_text`` never raises on random text (a fake
decoder) and on short soups of CLEVR codec tokens. Here, for both suites (CLEVR: discrete
actions, flat states; Meta-World: continuous actions, entity slots) and every state coding:

- soups of the codec's own tokens mixed with junk, long enough to hold whole steps;
- near-valid trajectories (a real random walk, encoded, then mutated), which reach the
  accepted path often, so its guarantees are exercised and not just "no exception";
- random token ids decoded by the embedded ``tiny`` tokenizer, as the hf backend does;
- whole batches through ``judge_batch`` (decode, filter, labels) as the imagine stage runs it.

Every verdict is one of the filter's reasons or an acceptance, and an accepted rollout has
finite float32 states whose steps lie within the env bounds, its start equal to the request's,
actions inside the action space, no step beyond the physical limit, and at most ``max_steps``.
"""

from __future__ import annotations

import inspect

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from kalm_ray.llm.imagine.filter import (
    REASONS,
    FilterLimits,
    Verdict,
    check_arrays,
    check_text,
    object_gaps,
)

MAX_STEPS = 6
ENVS = ("clevr", "metaworld")
JUNK = [
    *"nan inf -inf NaN x 0.5 1e309 [unused ] [UNK] [unused9999] <|kalm_3|> é 🙂 [SEP]".split(),
    *("instruction:", "state:", " ", "\n", "\t", "\x00", "\ufffd"),
]
"""Text a model may write that is not (or only looks like) a codec token."""
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _codings() -> tuple[str, ...]:
    from kalm_ray.llm import codec

    return tuple(getattr(codec, "STATE_CODINGS", ("absolute",)))


def _make_codec(suite, coding: str):
    from kalm_ray.llm.codec import Codec

    if "state_coding" in inspect.signature(Codec.for_suite).parameters:
        return Codec.for_suite(suite, n_bins=64, state_coding=coding)
    return Codec.for_suite(suite, n_bins=64)


class Case:
    """A suite, its codec (one state coding), its filter limits."""

    def __init__(self, env: str, coding: str):
        from kalm_ray.envs import get_suite

        self.env, self.coding = env, coding
        self.suite = get_suite(env)
        self.codec = _make_codec(self.suite, coding)
        self.limits = FilterLimits.for_suite(self.suite, n_bins=64)
        self.layout = self.suite.layout
        self._tokenizer = None

    def __repr__(self) -> str:
        return f"{self.env}/{self.coding}"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from kalm_ray.llm.model import build_tiny_tokenizer, codec_token_ids

            tok, _ = build_tiny_tokenizer(self.codec, ["push the red ball left of the blue ball"])
            self._tokenizer = (tok, codec_token_ids(tok, self.codec))
        return self._tokenizer

    # ---- states the env could be in ------------------------------------------------------

    def present_mask(self, rng: np.random.Generator) -> np.ndarray:
        """``(D,)`` bool: free dims, plus a random non-empty subset of entity slots."""
        mask = np.ones(self.layout.dim, bool)
        ents = list(self.layout.entities.values())
        if ents:
            mask[:] = False
            low, high = np.asarray(self.layout.low), np.asarray(self.layout.high)
            for sl in ents:
                # Slots whose bounds exclude zero (gripper, goal) are always there.
                always = not ((low[sl] <= 0) & (high[sl] >= 0)).all()
                mask[sl] = always or rng.random() < 0.4
        return mask

    def random_walk(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(n + 1, D)`` states within bounds moving at most half the physical limit per step
        (absent entities stay zero), and ``n`` valid actions."""
        low, high = np.asarray(self.layout.low), np.asarray(self.layout.high)
        # Where moved values may end (CLEVR: the walls' reach) and how much a step can move in
        # all (issue 11's physics): a walk that breaks them is rightly rejected.
        if self.layout.reach_low is not None:
            low, high = np.asarray(self.layout.reach_low), np.asarray(self.layout.reach_high)
        mask = self.present_mask(rng)
        s = np.where(mask, rng.uniform(low, high), 0.0)
        while not self.apart(s):  # objects never overlap (CLEVR: balls 0.26 wide)
            s = np.where(mask, rng.uniform(low, high), 0.0)
        states = [s]
        k = self.layout.object_dims
        for _ in range(n):
            nxt = states[-1]
            for _try in range(100):  # a step that would push one object into another: redraw
                step = rng.uniform(-0.5, 0.5, len(s)) * np.asarray(self.layout.max_step_delta)
                if self.layout.max_step_total is not None:  # one object moves per step
                    moving = np.zeros(len(s), bool)
                    obj = int(rng.integers(len(s) // k))
                    moving[obj * k : (obj + 1) * k] = True
                    step = np.where(moving, step, 0.0)
                    norm = np.linalg.norm(step)
                    if norm > 0.5 * self.layout.max_step_total:
                        step *= 0.5 * self.layout.max_step_total / norm
                cand = np.where(mask, np.clip(states[-1] + step, low, high), 0.0)
                if self.apart(cand):
                    nxt = cand
                    break
            states.append(nxt)
        space = self.suite.action_space
        if hasattr(space, "n"):
            actions = rng.integers(space.n, size=n)
        else:
            actions = rng.uniform(space.low, space.high, (n, *space.shape)).astype(np.float32)
        return np.asarray(states, np.float32), actions

    def apart(self, s: np.ndarray) -> bool:
        """Whether no two objects of state ``s`` are closer than the layout allows."""
        gap = self.layout.min_object_gap
        if gap is None:
            return True
        gaps, _ = object_gaps(np.asarray(s)[None], self.layout.object_dims)
        return bool((gaps >= gap).all())

    def start(self, rng: np.random.Generator) -> np.ndarray:
        return self.random_walk(rng, 0)[0][0]


@pytest.fixture(scope="module", params=[(e, c) for e in ENVS for c in _codings()], ids=repr)
def case(request) -> Case:
    return Case(*request.param)


def assert_sound(case: Case, start: np.ndarray, v: Verdict) -> None:
    """The filter's guarantees on any verdict."""
    assert isinstance(v, Verdict)
    if not v.accepted:
        assert v.reason in REASONS and v.states is None and v.repairs == 0
        _event(f"rejected: {v.reason}")
        return
    _event("accepted")
    lim = case.limits
    s, a = v.states, v.actions
    assert v.reason is None and s.dtype == np.float32
    assert s.ndim == 2 and s.shape[1] == case.layout.dim and 1 <= v.n_steps <= MAX_STEPS
    assert len(s) == v.n_steps + 1
    assert np.isfinite(s).all() and np.isfinite(np.asarray(a, np.float64)).all()
    np.testing.assert_array_equal(s[0], np.asarray(start, np.float32))
    # float32 rounding of a clipped float64 bound: allow one ulp-sized slack.
    eps = 1e-6 * (np.abs(lim.low) + np.abs(lim.high) + 1)
    assert (s[1:] >= lim.low - eps).all() and (s[1:] <= lim.high + eps).all()
    allowed = lim.max_step_delta * (1 + lim.step_tolerance) + lim.quantum
    assert (np.abs(np.diff(s.astype(np.float64), axis=0)) <= allowed + eps).all()
    if lim.n_actions is not None:
        assert a.dtype == np.int64 and a.shape == (v.n_steps,)
        assert ((a >= 0) & (a < lim.n_actions)).all()
    else:
        assert a.dtype == np.float32 and a.shape == (v.n_steps, len(lim.action_low))
        assert (a >= lim.action_low - 1e-6).all() and (a <= lim.action_high + 1e-6).all()


def _event(name: str) -> None:
    """Count an outcome in hypothesis' statistics (``--hypothesis-show-statistics``)."""
    if currently_in_test_context():
        event(name)


def judge(case: Case, start: np.ndarray, text) -> Verdict:
    v = check_text(case.codec, start, text, limits=case.limits, max_steps=MAX_STEPS)
    assert_sound(case, start, v)
    return v


# ---- 1. token soups ---------------------------------------------------------------------------


@settings(max_examples=100, **SETTINGS)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_token_soup_never_raises(case, data, seed):
    toks = case.codec.all_tokens
    piece = st.one_of(
        st.sampled_from(toks),
        st.sampled_from(toks),  # codec tokens twice as likely as junk
        st.sampled_from(JUNK),
        st.text(max_size=4),
    )
    text = "".join(data.draw(st.lists(piece, max_size=250)))
    judge(case, case.start(np.random.default_rng(seed)), text)


# ---- 2. near-valid trajectories, mutated ------------------------------------------------------


def _mutate(data, toks: list[str], case: Case) -> list[str]:
    """Random edits of a valid token list: replace, insert, delete, truncate, append."""
    pool = case.codec.all_tokens + JUNK
    for _ in range(data.draw(st.integers(0, 4))):
        op = data.draw(st.sampled_from(["replace_bin", "replace", "insert", "delete", "cut"]))
        if not toks:
            break
        i = data.draw(st.integers(0, len(toks) - 1))
        if op == "replace_bin":  # a plausible slip: another value token
            toks[i] = data.draw(st.sampled_from(case.codec.bin_tokens))
        elif op == "replace":
            toks[i] = data.draw(st.sampled_from(pool))
        elif op == "insert":
            toks.insert(i, data.draw(st.sampled_from(pool)))
        elif op == "delete":
            del toks[i]
        else:
            toks = toks[:i]
    return toks


@settings(max_examples=150, **SETTINGS)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1), n=st.integers(1, MAX_STEPS + 2))
def test_mutated_trajectories(case, data, seed, n):
    states, actions = case.random_walk(np.random.default_rng(seed), n)
    toks = case.codec.encode_steps(states, actions)
    toks = _mutate(data, toks, case)
    if data.draw(st.sampled_from([True, True, True, False])):  # mostly ended
        toks = [*toks, case.codec.end_token]
    text = data.draw(st.sampled_from(["", " ", "\n"])).join(toks)
    judge(case, states[0], text)


@pytest.mark.parametrize("n", [1, MAX_STEPS])
def test_unmutated_walks_are_accepted(case, n):
    """The generator above does reach the accepted path (its checks are not vacuous)."""
    rng = np.random.default_rng(n)
    accepted = 0
    for _ in range(10):
        states, actions = case.random_walk(rng, n)
        v = judge(case, states[0], case.codec.encode_trajectory(states, actions))
        accepted += v.accepted or v.reason == "no_progress"
    assert accepted == 10


# ---- 3. random ids through the tokenizer -------------------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_random_ids_decoded_by_the_tokenizer(case, data, seed):
    tok, codec_ids = case.tokenizer
    any_id = st.integers(0, len(tok) - 1)
    ids = data.draw(
        st.lists(
            st.one_of(st.sampled_from(codec_ids), st.sampled_from(codec_ids), any_id), max_size=200
        )
    )
    text = tok.decode(ids, skip_special_tokens=False)  # what the hf backend does
    judge(case, case.start(np.random.default_rng(seed)), text)


# ---- 4. the stage's batch function ------------------------------------------------------------


@settings(max_examples=20, **SETTINGS)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_judge_batch_never_raises(case, data, seed):
    from kalm_ray.llm.imagine.labels import judge_batch

    rng = np.random.default_rng(seed)
    texts, starts = [], []
    for _ in range(data.draw(st.integers(1, 6))):
        states, actions = case.random_walk(rng, data.draw(st.integers(1, MAX_STEPS)))
        toks = [
            *_mutate(data, case.codec.encode_steps(states, actions), case),
            case.codec.end_token,
        ]
        texts.append(
            data.draw(st.sampled_from([case.codec.join(toks), "".join(toks[:3]), None, "🙂"]))
        )
        starts.append(states[0])
    tasks = case.suite.tasks("easy")
    batch = pa.table(
        {
            "request_id": [f"r{i}" for i in range(len(texts))],
            "level": ["easy"] * len(texts),
            "task": [tasks[i % len(tasks)] for i in range(len(texts))],
            "start_state": [s.tolist() for s in starts],
            "generated_text": pa.array(texts, pa.string()),
        }
    )
    out = judge_batch(
        batch, decoder=case.codec, env=case.env, limits=case.limits, max_steps=MAX_STEPS
    )
    assert out.num_rows == len(texts)
    for row in out.to_pylist():
        if not row["accepted"]:
            assert row["reason"] in REASONS and row["n_steps"] == 0
            continue
        s = np.asarray(row["states"], np.float64).reshape(-1, case.layout.dim)
        assert len(s) == row["n_steps"] + 1 and np.isfinite(s).all()
        assert np.isfinite(row["rewards"]).all() and not (row["terminated"] and row["truncated"])


# ---- 5. the start state is not model output, but never lets NaN through --------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_start_state_is_never_accepted(case, bad):
    states, actions = case.random_walk(np.random.default_rng(0), 3)
    start = states[0].copy()
    start[0] = bad
    v = judge(case, start, case.codec.encode_trajectory(states, actions))
    assert not v.accepted
    # Straight into the array check (a decoder that does not put the start in row 0).
    v = check_arrays(start, states, actions, limits=case.limits, max_steps=MAX_STEPS)
    assert not v.accepted and v.reason == "non_finite"
