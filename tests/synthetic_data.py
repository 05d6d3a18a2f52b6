"""Small synthetic offline datasets in the project's schema, for tests and ``bench/train_units.py``.

A *toy task*: each instruction ``i`` (a random unit embedding) names the right action for a
state. Discrete: ``a* = (5 i + [s_0 > 0]) mod n``; continuous: ``a* = tanh(W s + b_i)``.
A step with the right action (continuous: within 0.25 in every dimension) ends the episode
with reward 1 (``terminated``); otherwise reward 0, until ``horizon`` steps (``truncated``).
The behaviour policy is the expert with probability ``1 - noise``, uniform otherwise.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kalm_ray.artifacts import Manifest, RunDir, write_manifest
from kalm_ray.data.schema import Episode, episodes_to_table, transition_schema


class ToyTask:
    """The task's rules; ``seed`` fixes the instruction embeddings and the continuous map."""

    def __init__(
        self,
        *,
        discrete: bool,
        state_dim: int = 10,
        emb_dim: int = 384,
        n_instructions: int = 8,
        n_actions: int = 40,
        act_dim: int = 4,
        seed: int = 0,
    ):
        rng = np.random.default_rng(seed)
        self.discrete, self.state_dim, self.emb_dim = discrete, state_dim, emb_dim
        self.instructions = [f"toy instruction {i}" for i in range(n_instructions)]
        emb = rng.normal(size=(n_instructions, emb_dim)).astype(np.float32)
        self.embeddings = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        self.action_space: gym.Space = (
            gym.spaces.Discrete(n_actions)
            if discrete
            else gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
        )
        self.w = rng.normal(size=(act_dim, state_dim)).astype(np.float32) / np.sqrt(state_dim)
        self.b = rng.uniform(-0.5, 0.5, size=(n_instructions, act_dim)).astype(np.float32)

    def expert(self, instr: np.ndarray, states: np.ndarray) -> np.ndarray:
        """Right actions for ``(B,)`` instruction ids and ``(B, state_dim)`` states."""
        if self.discrete:
            n = self.action_space.n
            return ((5 * instr + (states[:, 0] > 0)) % n).astype(np.int64)
        return np.tanh(states @ self.w.T + self.b[instr]).astype(np.float32)

    def correct(self, instr: np.ndarray, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """``(B,)`` bool: whether each action solves its step."""
        want = self.expert(instr, states)
        if self.discrete:
            return np.asarray(actions) == want
        return np.all(np.abs(np.asarray(actions) - want) < 0.25, axis=-1)

    def episodes(
        self,
        n: int,
        *,
        horizon: int = 5,
        noise: float = 0.5,
        seed: int = 0,
        source: str = "real",
        prefix: str = "ep",
    ) -> list[Episode]:
        rng = np.random.default_rng(seed)
        out = []
        for k in range(n):
            i = int(rng.integers(len(self.instructions)))
            states, actions, rewards, succ = [rng.uniform(-1, 1, self.state_dim)], [], [], []
            for _ in range(horizon):
                s = states[-1][None].astype(np.float32)
                if rng.random() < noise:
                    a = (
                        np.asarray(self.action_space.sample())
                        if not self.discrete
                        else np.int64(rng.integers(self.action_space.n))
                    )
                else:
                    a = self.expert(np.array([i]), s)[0]
                ok = bool(self.correct(np.array([i]), s, np.asarray(a)[None])[0])
                actions.append(a)
                rewards.append(1.0 if ok else 0.0)
                succ.append(ok)
                states.append(rng.uniform(-1, 1, self.state_dim))
                if ok:
                    break
            out.append(
                Episode(
                    episode_id=f"{prefix}{k}",
                    env="toy",
                    task=f"t{i}",
                    level="train",
                    instruction=self.instructions[i],
                    states=np.asarray(states, np.float32),
                    actions=np.asarray(actions),
                    rewards=np.asarray(rewards, np.float32),
                    successes=np.asarray(succ),
                    terminated=succ[-1],
                    truncated=not succ[-1],
                    source=source,
                    generator=None if source == "real" else '{"model": "toy"}',
                )
            )
        return out

    def table(self, episodes: list[Episode]) -> pa.Table:
        return episodes_to_table(episodes, transition_schema(self.state_dim, self.action_space))

    def instruction_table(self, *, drop: tuple[str, ...] = ()) -> pa.Table:
        """The ``data/instructions.parquet`` table (``drop`` leaves wordings out, for tests)."""
        keep = [i for i, t in enumerate(self.instructions) if t not in drop]
        emb = self.embeddings[keep].reshape(-1)
        return pa.table(
            {
                "text": [self.instructions[i] for i in keep],
                "env": ["toy"] * len(keep),
                "level": ["train"] * len(keep),
                "task": [f"t{i}" for i in keep],
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(emb, pa.float32()), self.emb_dim
                ),
            }
        )


def write_toy_run(
    run: RunDir,
    task: ToyTask,
    *,
    episodes: int,
    imagined: int = 0,
    horizon: int = 5,
    noise: float = 0.5,
    seed: int = 0,
    drop_embeddings: tuple[str, ...] = (),
) -> None:
    """Write ``data/real`` (+ ``data/imagined``) and ``data/instructions.parquet`` with manifests,
    as the collect and imagine stages would."""
    run.makedirs("data", "real")
    pq.write_table(
        task.instruction_table(drop=drop_embeddings),
        run.path("data", "instructions.parquet"),
        filesystem=run.fs,
    )
    eps = task.episodes(episodes, horizon=horizon, noise=noise, seed=seed)
    pq.write_table(task.table(eps), run.path("data", "real", "part-0.parquet"), filesystem=run.fs)
    write_manifest(
        run, "data/real", Manifest.new("collect", "toy", {}, counts={"episodes": episodes})
    )
    if imagined:
        run.makedirs("data", "imagined")
        ims = task.episodes(
            imagined, horizon=horizon, noise=noise, seed=seed + 1, source="imagined", prefix="im"
        )
        pq.write_table(
            task.table(ims), run.path("data", "imagined", "part-0.parquet"), filesystem=run.fs
        )
        write_manifest(
            run, "data/imagined", Manifest.new("imagine", "toy", {}, counts={"episodes": imagined})
        )
