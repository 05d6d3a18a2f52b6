"""What is evaluated (episode specs) and how a batch of episodes is stepped.

Episode specs are fixed up front from the config and its seed alone, so every policy
being compared meets exactly the same (level, task, wording, start seed) list: the
comparison of data mixes is *paired*. :func:`run_episodes` steps several environments
together and calls the policy once per step on the stacked observations; it knows
nothing of Ray, so the in-process benchmark baseline and the actors share it.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from kalm_ray.config import ExperimentConfig
from kalm_ray.envs.suite import Suite

_STREAM = 0x5EED_E7A1
"""Salt that keeps evaluation seeds apart from every other stage's (same master seed)."""


@dataclass(frozen=True)
class EpisodeSpec:
    """One evaluation episode, the same for every policy.

    Attributes:
        index: position in the spec list; results are keyed by it (never counted twice).
        level: ``train``/``rephrase``/``easy``/``hard``.
        task: the suite's task id.
        wording: the instruction text the policy is given (its embedding is in the obs).
        seed: ``env.reset(seed=...)`` seed, which fixes the start state.
    """

    index: int
    level: str
    task: str
    wording: str
    seed: int


@dataclass(frozen=True)
class EpisodeResult:
    """Outcome of one episode: ``success`` at any step, ``length`` in env steps, summed reward."""

    index: int
    success: bool
    length: int
    ret: float


class Policy(Protocol):
    """What evaluation needs from a policy (``kalm_ray.rl.policy.Policy``)."""

    info: dict[str, Any]

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic actions for ``(B, obs_dim)`` float32 observations."""


def _seed_of(master: int, *parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([master, _STREAM, *parts])


def _task_key(task: str) -> int:
    # crc32, not hash(): stable across processes and Python runs.
    return zlib.crc32(task.encode())


def build_episode_specs(cfg: ExperimentConfig, suite: Suite) -> list[EpisodeSpec]:
    """Every evaluation episode, from ``cfg.evaluate``, ``cfg.seed`` and the suite's task lists.

    Per level (in ``cfg.evaluate.levels`` order): a stable sample of at most
    ``max_tasks_per_level`` tasks (kept in the suite's order), then ``episodes_per_task``
    episodes per task (``episodes_per_task_by_level`` for a level that overrides it). Each
    task's episodes take consecutive wordings from a seeded offset and their own start seeds;
    seeds depend on (master seed, level, task id, k) only, so capping tasks or adding levels
    does not change the other episodes.
    """
    ev = cfg.evaluate
    specs: list[EpisodeSpec] = []
    for level in ev.levels:
        level_key = _task_key(level)
        tasks = list(suite.tasks(level))
        if ev.max_tasks_per_level is not None and len(tasks) > ev.max_tasks_per_level:
            rng = np.random.default_rng(_seed_of(cfg.seed, level_key))
            keep = np.sort(rng.choice(len(tasks), size=ev.max_tasks_per_level, replace=False))
            tasks = [tasks[i] for i in keep]
        per_task = ev.episodes_per_task_by_level.get(level, ev.episodes_per_task)
        for task in tasks:
            wordings = suite.instructions(level, task)
            ss = _seed_of(cfg.seed, level_key, _task_key(task))
            offset, *seeds = ss.generate_state(1 + per_task)
            for k, seed in enumerate(seeds):
                wording = wordings[(int(offset) + k) % len(wordings)]
                specs.append(EpisodeSpec(len(specs), level, task, wording, int(seed) & 0x7FFF_FFFF))
    return specs


def specs_digest(specs: Sequence[EpisodeSpec]) -> str:
    """sha256 of the spec list: equal digests mean two evaluations are paired."""
    blob = json.dumps([asdict(s) for s in specs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


EnvGetter = Callable[[int, EpisodeSpec], Any]
"""``(slot, spec) -> gymnasium.Env`` ready to be reset for ``spec`` (the caller caches)."""
ObsBuilder = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``make_obs(state (B, D), embedding (B, E)) -> obs (B, obs_dim)``."""


@dataclass
class _Running:
    spec: EpisodeSpec
    env: Any
    state: np.ndarray
    steps: int = 0
    ret: float = 0.0
    success: bool = False


def run_episodes(
    policy: Policy,
    specs: Sequence[EpisodeSpec],
    *,
    get_env: EnvGetter,
    embeddings: Mapping[str, np.ndarray],
    make_obs: ObsBuilder,
    n_envs: int,
    max_steps: int,
    start_states: Mapping[int, np.ndarray] | None = None,
) -> list[EpisodeResult]:
    """Run ``specs`` on ``n_envs`` environments stepped together; one ``policy.act`` per step.

    A slot whose episode ends takes the next spec at once, so the batch stays full until
    the queue runs dry. A policy with ``wants_instructions`` (the LLM-as-policy) gets
    ``act_instructed(states, wordings)`` instead of observations. An episode ends when the
    env says terminated/truncated or after ``max_steps`` steps; it succeeds if any step
    reports ``info["success"]`` (or, for an env without that key, ends terminated).
    Results come back in ``specs`` order. ``start_states`` (spec index -> state) places an
    episode's start exactly (``reset(options={"state": ...})``, CLEVR) instead of sampling
    it from the seed: the grounding stage replays held-out real starts this way.
    """
    queue = deque(specs)
    slots: list[_Running | None] = [None] * max(1, n_envs)
    done: dict[int, EpisodeResult] = {}

    def start(slot: int) -> _Running | None:
        if not queue:
            return None
        spec = queue.popleft()
        env = get_env(slot, spec)
        options = {"task": spec.task, "instruction": spec.wording}
        if start_states is not None and spec.index in start_states:
            options["state"] = np.asarray(start_states[spec.index], np.float64)
        state, _ = env.reset(seed=spec.seed, options=options)
        return _Running(spec, env, np.asarray(state, dtype=np.float32))

    for i in range(len(slots)):
        slots[i] = start(i)
    while any(s is not None for s in slots):
        live = [i for i, s in enumerate(slots) if s is not None]
        states = np.stack([slots[i].state for i in live])  # type: ignore[union-attr]
        wordings = [slots[i].spec.wording for i in live]  # type: ignore[union-attr]
        if getattr(policy, "wants_instructions", False):  # the LLM reads the text itself
            actions = np.asarray(policy.act_instructed(states, wordings))  # type: ignore[attr-defined]
        else:
            embs = np.stack([embeddings[w] for w in wordings])
            actions = np.asarray(policy.act(make_obs(states, embs)))
        for j, i in enumerate(live):
            run = slots[i]
            assert run is not None
            state, reward, terminated, truncated, info = run.env.step(actions[j])
            run.state = np.asarray(state, dtype=np.float32)
            run.steps += 1
            run.ret += float(reward)
            run.success |= bool(info.get("success", terminated))
            if terminated or truncated or run.success or run.steps >= max_steps:
                done[run.spec.index] = EpisodeResult(
                    run.spec.index, run.success, run.steps, run.ret
                )
                slots[i] = start(i)
    return [done[s.index] for s in specs]
