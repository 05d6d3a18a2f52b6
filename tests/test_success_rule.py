"""One success rule per suite (kalm_ray.envs.success), on every path that judges success.

A composite Meta-World task (make-coffee: mug under the spout, then the button) whose
states reach the second stage's condition before the first's is never a success: not in
the labels of imagined rollouts, not in collected episodes, not in the grounding metrics,
not in the quick evaluation during training. The same states in order are one. No MuJoCo:
made-up slot states, replayed by a scripted env.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from helpers import coffee_state

from kalm_ray.envs import get_suite
from kalm_ray.envs.success import SuccessTracker, goal_reached, success_flags

MW = get_suite("metaworld")
TASK = "make-coffee"

START, MUG, BOTH, BUTTON = (
    coffee_state(False, False),
    coffee_state(True, False),
    coffee_state(True, True),
    coffee_state(False, True),
)
IN_ORDER = np.stack([START, MUG, BOTH])
WRONG_ORDER = np.stack([START, BUTTON, BOTH])  # the button stays pressed: same last state


def test_the_states_themselves():
    assert MW.success(TASK, START, BOTH)  # one state alone cannot tell the order
    assert success_flags(MW, TASK, IN_ORDER).tolist() == [False, False, True]
    assert not success_flags(MW, TASK, WRONG_ORDER).any()
    assert goal_reached(MW, TASK, IN_ORDER) and not goal_reached(MW, TASK, WRONG_ORDER)


@pytest.mark.parametrize("seed", range(5))
def test_rule_equals_the_suites_trajectory_success(seed):
    """The rule is the Meta-World suite's own (what its env reports as info["success"])."""
    rng = np.random.default_rng(seed)
    pool = [START, MUG, BOTH, BUTTON]
    for _ in range(20):
        states = np.stack([pool[i] for i in rng.integers(len(pool), size=6)])
        for task in (TASK, "coffee-push", "coffee-button"):
            want = MW.trajectory_success(task, states)
            assert success_flags(MW, task, states).tolist() == want.tolist()


def test_clevr_rule_is_the_state_predicate():
    clevr = get_suite("clevr")
    env = clevr.make_env("train", "left:red:blue")
    obs, _ = env.reset(seed=0)
    states = [obs]
    for a in range(0, 40, 3):
        states.append(env.step(a)[0])
    env.close()
    states = np.stack(states)
    want = [bool(clevr.success("left:red:blue", states[0], s)) for s in states]
    assert success_flags(clevr, "left:red:blue", states).tolist() == want
    track = SuccessTracker(clevr, "left:red:blue", states[0])
    assert [track.at_start, *(track(s) for s in states[1:])] == want


# ---- the paths -------------------------------------------------------------------------------


class ReplayEnv(gym.Env):
    """Resets to ``states[0]`` and steps through the rest; never says terminated, so any
    success seen comes from the caller's own rule."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (91,), np.float32)
    action_space = MW.action_space

    def __init__(self, states: np.ndarray):
        self.states, self.t = states, 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return self.states[0].copy(), {}

    def step(self, action):
        self.t = min(self.t + 1, len(self.states) - 1)
        return self.states[self.t].copy(), 0.0, False, self.t == len(self.states) - 1, {}


class CoffeeSuite:
    """The Meta-World suite with make-coffee as its one train task, its env replaying
    ``states``."""

    name = "metaworld"
    COMPOSITE_TASKS = MW.COMPOSITE_TASKS
    advance_stage = staticmethod(MW.advance_stage)
    success = staticmethod(MW.success)
    reward = staticmethod(MW.reward)
    action_space = MW.action_space
    layout = MW.layout
    max_episode_steps = 10

    def __init__(self, states: np.ndarray):
        self.states = states

    def tasks(self, level: str) -> list[str]:
        return [TASK]

    def instructions(self, level: str, task: str) -> list[str]:
        return ["make a cup of coffee"]

    def make_env(self, level, task=None, **kwargs):
        return ReplayEnv(self.states)


@pytest.mark.parametrize(("states", "ok"), [(IN_ORDER, True), (WRONG_ORDER, False)])
def test_imagined_labels(states, ok):
    from kalm_ray.llm.imagine.labels import label_rollout

    lab = label_rollout(MW, TASK, states, np.zeros((len(states) - 1, 4), np.float32))
    assert lab.terminated is ok and bool(lab.successes.any()) is ok


@pytest.mark.parametrize(("states", "ok"), [(IN_ORDER, True), (WRONG_ORDER, False)])
def test_collected_episode(states, ok):
    from kalm_ray.data.collect_actor import CollectSpec, EpisodeCollector

    spec = CollectSpec("metaworld", 5, seed=0, epsilon=0.0, fail_fraction=0.0, action_noise=0.0)
    collector = EpisodeCollector(spec)
    collector.suite = CoffeeSuite(states)
    collector._envs[TASK] = ReplayEnv(states)
    collector._policy = lambda task, rng: lambda env, info: np.zeros(4, np.float32)
    ep = collector.episode(TASK, 0, 0)
    assert ep.terminated is ok and bool(ep.successes.any()) is ok
    assert ep.truncated is not ok


@pytest.mark.parametrize(("states", "ok"), [(IN_ORDER, 1.0), (WRONG_ORDER, 0.0)])
def test_quick_eval(states, ok):
    from kalm_ray.rl.quick_eval import QuickEval

    class Zero:
        def act(self, obs):
            return np.zeros((len(obs), 4), np.float32)

    quick = QuickEval(
        CoffeeSuite(states),
        {"make a cup of coffee": np.zeros(3, np.float32)},
        episodes=2,
        max_steps=5,
        seed=0,
    )
    assert quick(Zero()) == ok


@pytest.mark.parametrize(("states", "ok"), [(IN_ORDER, 1.0), (WRONG_ORDER, 0.0)])
def test_grounding_metrics(states, ok, monkeypatch):
    """``generation_metrics`` on a held-out episode whose rollout decodes to ``states``."""
    from kalm_ray.llm import grammar
    from kalm_ray.llm.ground import metrics
    from kalm_ray.llm.prompts import EpisodeArrays

    class Row:
        @staticmethod
        def for_request(codec, start, max_steps):
            return Row()

        def max_tokens(self) -> int:
            return 4

    class Codec:
        def decode_rollout(self, start, text, *, max_steps):
            return states, np.zeros((len(states) - 1, 4), np.float32)

    class Tokenizer:
        eos_token_id = 0

        def decode(self, ids, skip_special_tokens=False):
            return "rollout"

    monkeypatch.setattr(grammar, "RowGrammar", Row)
    monkeypatch.setattr(metrics, "codec_token_ids", lambda tok, codec: [1, 2])
    monkeypatch.setattr(metrics, "rollout_prompt", lambda codec, instruction, start: "p")
    monkeypatch.setattr(metrics, "generate_ids", lambda model, tok, ps, **kw: [[5]] * len(ps))
    episode = EpisodeArrays("e0", TASK, "make a cup of coffee", states, np.zeros((2, 4)))
    out = metrics.generation_metrics(
        None, Tokenizer(), Codec(), MW, [episode], max_steps=5, batch_size=1, device="cpu"
    )
    assert out["rollout_decoded"] == 1.0
    assert out["rollout_success"] == ok and out["real_success"] == ok
