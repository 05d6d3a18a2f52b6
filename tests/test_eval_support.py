"""Stand-ins for evaluation tests (no tests here): a toy 1-D env suite and scripted policies.

Registered with cloudpickle *by value*, so Ray actors can unpickle them without the
``tests/`` folder on their path.

Toy task ``t<k>``: the agent at ``x`` (start uniform in [0, 10) from the reset seed) must
reach ``target = k + 0.25``; actions 0 = -1, 1 = +1, 2 = stay; success when within 0.5.
State = ``(x, target)``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
from ray import cloudpickle

from kalm_ray.artifacts import Manifest, RunDir, write_manifest

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TASKS = {
    "train": ["t1", "t3", "t5", "t7"],
    "rephrase": ["t1", "t3", "t5", "t7"],
    "easy": ["t2", "t8"],
    "hard": ["t9"],
}
EMB_DIM = 3


class ToyEnv:
    def __init__(self, level: str, task: str):
        self.level, self.task = level, task
        self.x, self.target = 0.0, 0.0

    def reset(self, *, seed=None, options=None):
        task = (options or {}).get("task", self.task)
        self.task = task
        self.target = int(task[1:]) + 0.25
        self.x = float(np.random.default_rng(seed).uniform(0, 10))
        return np.array([self.x, self.target], np.float32), {}

    def step(self, action):
        self.x += {0: -1.0, 1: 1.0, 2: 0.0}[int(action)]
        ok = abs(self.x - self.target) < 0.5
        return np.array([self.x, self.target], np.float32), float(ok), ok, False, {"success": ok}


class ToySuite:
    name = "clevr"
    max_episode_steps = 12
    action_space = SimpleNamespace(n=3)  # what RandomPolicy reads of a Discrete space

    def tasks(self, level: str) -> list[str]:
        return list(TASKS[level])

    def instructions(self, level: str, task: str) -> list[str]:
        return [f"{level} {task} wording {i}" for i in range(3)]

    def make_env(self, level: str, task: str | None = None, **kw):
        return ToyEnv(level, task or TASKS[level][0])


def toy_make_env(level: str, task: str) -> ToyEnv:
    return ToyEnv(level, task)


def toy_suite_env(env_name: str, max_steps: int, level: str, task: str) -> ToyEnv:
    """Stand-in for ``evaluate.make_suite_env``."""
    return ToyEnv(level, task)


def toy_make_obs(state: np.ndarray, emb: np.ndarray) -> np.ndarray:
    return np.concatenate([state, emb], axis=1).astype(np.float32)


def toy_embeddings(suite: ToySuite | None = None) -> dict[str, np.ndarray]:
    suite = suite or ToySuite()
    out = {}
    for level, tasks in TASKS.items():
        for t in tasks:
            for i, w in enumerate(suite.instructions(level, t)):
                out[w] = np.array([len(w), i, 1.0], np.float32)
    return out


class ScriptedPolicy:
    """``smart``: walks to the target; otherwise always +1 (succeeds only from the left).

    ``delay`` seconds per act() keep units in flight long enough to kill an actor mid-run.
    """

    def __init__(self, smart: bool, delay: float = 0.0, info: dict | None = None):
        self.smart, self.delay = smart, delay
        self.info = info or {}
        self.calls: list[int] = []

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.calls.append(len(obs))
        if self.delay:
            time.sleep(self.delay)
        x, target = obs[:, 0], obs[:, 1]
        if not self.smart:
            return np.ones(len(obs), np.int64)
        return np.where(target > x, 1, 0).astype(np.int64)


def load_scripted(policy_dir: str) -> ScriptedPolicy:
    """Stand-in for ``load_policy``: the folder name picks the policy (``imagined`` = smart)."""
    name = Path(policy_dir).name
    delay = 0.01 if "slow" in name else 0.0
    return ScriptedPolicy("imagined" in name, delay=delay, info={"name": name})


def write_toy_run(root: Path, policies: list[str]) -> RunDir:
    """A run dir holding what evaluation reads: a train manifest, policy folders, instructions."""
    import json

    from kalm_ray.data.text import instruction_schema, write_instruction_table

    run = RunDir(str(root))
    run.claim("toy")
    for name in policies:
        algo, rest = name.split("-", 1)
        data, seed = rest.rsplit("-seed", 1)
        d = root / "policy" / name
        d.mkdir(parents=True)
        (d / "policy_info.json").write_text(
            json.dumps({"algo": algo, "data": data, "seed": int(seed), "env": "clevr"})
        )
        (d / "progress.csv").write_text(
            "iteration,loss,quick_success\n0,1.0,0.1\n1,0.5,0.3\n2,0.4,0.5\n"
        )
    write_manifest(run, "policy", Manifest.new("train", "toy", {}))
    emb = toy_embeddings()
    texts = sorted(emb)
    schema = instruction_schema(EMB_DIM, encoder="toy", env="clevr")
    flat = pa.array(np.stack([emb[t] for t in texts]).reshape(-1), pa.float32())
    table = pa.Table.from_arrays(
        [
            pa.array(texts),
            pa.array(["clevr"] * len(texts)),
            pa.array(["?"] * len(texts)),
            pa.array(["?"] * len(texts)),
            pa.FixedSizeListArray.from_arrays(flat, EMB_DIM),
        ],
        schema=schema,
    )
    write_instruction_table(run, table)
    return run


def test_random_baseline_is_a_function_of_the_observation():
    import gymnasium as gym

    from kalm_ray.eval.evaluate import RandomPolicy, load_policy_or_random

    p = load_policy_or_random("/x/policy/random", loader=None, action_space=gym.spaces.Discrete(40))
    obs = np.random.default_rng(0).normal(size=(64, 394)).astype(np.float32)
    a = p.act(obs)
    assert a.shape == (64,) and a.min() >= 0 and a.max() < 40 and len(set(a.tolist())) > 10
    assert np.array_equal(a, RandomPolicy(gym.spaces.Discrete(40)).act(obs[::-1])[::-1])
    box = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    c = RandomPolicy(box).act(obs[:5])
    assert c.shape == (5, 4) and np.all(np.abs(c) <= 1.0)
