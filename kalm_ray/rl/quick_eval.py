"""Quick train-level success checks during training: a handful of real env episodes, in-process.

All episodes step together: one batched ``Policy.act`` call per env step. Success is the
suite's success rule on the states stepped so far (:class:`kalm_ray.envs.success.SuccessTracker`:
composite tasks need their stages in order), the rule that labels the data, so the number
means what the dataset's success flags mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kalm_ray.envs.success import SuccessTracker
from kalm_ray.envs.suite import Suite
from kalm_ray.rl.dataset import make_obs
from kalm_ray.rl.policy import Policy


class QuickEval:
    """``episodes`` fixed (task, wording, start seed) triples of the ``train`` level, reused at
    every check so that successive numbers differ only by the policy."""

    def __init__(
        self,
        suite: Suite,
        embeddings: dict[str, np.ndarray],
        *,
        episodes: int,
        max_steps: int,
        seed: int,
    ):
        rng = np.random.default_rng(seed)
        tasks = suite.tasks("train")
        picks = rng.choice(len(tasks), size=episodes, replace=episodes > len(tasks))
        self.suite, self.max_steps = suite, max_steps
        self.tasks = [tasks[i] for i in picks]
        wordings = [suite.instructions("train", t) for t in self.tasks]
        texts = [w[int(rng.integers(len(w)))] for w in wordings]
        self.embeddings = np.stack([embeddings[t] for t in texts]).astype(np.float32)
        self.seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=episodes)]
        self._envs: dict[int, object] = {}

    def _env(self, i: int):
        """Episode ``i``'s own env (two episodes of one task must not share an env)."""
        if i not in self._envs:
            self._envs[i] = self.suite.make_env(
                "train", self.tasks[i], max_episode_steps=self.max_steps
            )
        return self._envs[i]

    def __call__(self, policy: Policy) -> float:
        """Success rate of ``policy`` over the fixed episodes."""
        n = len(self.tasks)
        states, trackers = [], []
        for i, seed in enumerate(self.seeds):
            obs, _ = self._env(i).reset(seed=seed)
            states.append(np.asarray(obs, np.float32))
            trackers.append(SuccessTracker(self.suite, self.tasks[i], states[-1].copy()))
        states_arr = np.stack(states)
        active = np.ones(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        for _ in range(self.max_steps):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            actions = policy.act(make_obs(states_arr[idx], self.embeddings[idx]))
            for j, i in enumerate(idx):
                obs, _, terminated, truncated, _ = self._env(i).step(actions[j])
                states_arr[i] = np.asarray(obs, np.float32)
                if trackers[i](states_arr[i]):
                    success[i], active[i] = True, False
                elif terminated or truncated:
                    active[i] = False
        return float(success.mean())

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


@dataclass(frozen=True)
class QuickEvalSpec:
    """What a task needs to build the train-level success check next to its learner."""

    env: str
    episodes: int
    max_steps: int
    seed: int

    def build(self, embeddings: Any) -> Any:
        """The :class:`QuickEval` this spec describes."""
        from kalm_ray.envs import get_suite

        return QuickEval(
            get_suite(self.env),
            embeddings,
            episodes=self.episodes,
            max_steps=self.max_steps,
            seed=self.seed,
        )
