"""The collection role: actors that own environments and roll out behaviour policies.

- :class:`EpisodeCollector` runs work units in-process (plain class: the benchmark's
  single-worker baseline and the body of the actor).
- :class:`CollectorPool` is the driver-side wrapper: it fans units out to
  ``EpisodeCollector`` actors on the stages' one fault-tolerant pool
  (:mod:`kalm_ray.cluster.actor_pool`), which replaces an actor that dies, runs its units
  again and yields each unit's result exactly once (a retry cannot duplicate episodes).

Everything an episode does is drawn from its own seeds (see ``episode_seeds``), so the
data depend only on (config, seed, task, episode index), never on which actor ran it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa

from kalm_ray.cluster.actor_pool import ActorPool
from kalm_ray.data.schema import Episode, episodes_to_table, transition_schema
from kalm_ray.envs import get_suite
from kalm_ray.envs.success import SuccessTracker

SEED_DOMAIN_COLLECT = 0x636F6C6C  # "coll": keeps collect seeds apart from other stages' seeds
UNITS_IN_FLIGHT = 2
"""Units queued per actor, so an actor never waits on the driver between units."""

Policy = Callable[[gym.Env, dict], "int | np.ndarray"]
"""``policy(env, info) -> action``: the env itself, since the CLEVR pusher plans on its physics."""


def episode_seeds(seed: int, task_index: int, episode: int) -> tuple[int, int]:
    """``(env reset seed, policy seed)`` of one episode, a pure function of its identity.

    Args:
        seed: the experiment's master seed.
        task_index: position of the task in the suite's ``train`` task list.
        episode: episode index within the task (0-based).
    """
    ss = np.random.SeedSequence([SEED_DOMAIN_COLLECT, seed, task_index, episode])
    env_seed, policy_seed = ss.generate_state(2, dtype=np.uint32)
    return int(env_seed), int(policy_seed)


@dataclass(frozen=True)
class CollectSpec:
    """What every collection worker needs to know (small, picklable)."""

    env: str
    max_episode_steps: int
    seed: int
    epsilon: float
    fail_fraction: float
    action_noise: float
    lookahead: bool = False


@dataclass(frozen=True)
class WorkUnit:
    """Episodes ``[start, stop)`` of one train task: the unit of scheduling and of retry."""

    task: str
    task_index: int
    start: int
    stop: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.task_index, self.start)

    @property
    def episodes(self) -> int:
        return self.stop - self.start


@dataclass
class UnitResult:
    """The transitions of one unit's episodes (in episode order) and per-episode facts."""

    unit: WorkUnit
    table: pa.Table
    lengths: list[int] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)

    @property
    def env_steps(self) -> int:
        return int(sum(self.lengths))


class EpisodeCollector:
    """Owns one environment per task it has seen and rolls out the behaviour policy."""

    def __init__(self, spec: CollectSpec):
        self.spec = spec
        self.suite = get_suite(spec.env)
        self.schema = transition_schema(
            self.suite.layout.dim, self.suite.action_space, lookahead=spec.lookahead
        )
        self._envs: dict[str, gym.Env] = {}
        self._scripted: Any = None  # the episode's CLEVR pusher (its lookahead is recorded)

    def ready(self) -> bool:
        """Called once after start-up so the driver knows the actor is alive."""
        return True

    def run_unit(self, unit: WorkUnit) -> UnitResult:
        episodes = [
            self.episode(unit.task, unit.task_index, k) for k in range(unit.start, unit.stop)
        ]
        return UnitResult(
            unit=unit,
            table=episodes_to_table(episodes, self.schema),
            lengths=[len(e) for e in episodes],
            successes=[bool(e.terminated) for e in episodes],
        )

    def episode(self, task: str, task_index: int, k: int) -> Episode:
        """Episode ``k`` of ``task``: ends when the task's predicate holds or at the step limit."""
        suite, limit = self.suite, self.spec.max_episode_steps
        env_seed, policy_seed = episode_seeds(self.spec.seed, task_index, k)
        rng = np.random.default_rng(policy_seed)
        wordings = suite.instructions("train", task)
        instruction = wordings[int(rng.integers(len(wordings)))]
        policy = self._policy(task, rng)
        env = self._env(task)
        obs, info = env.reset(seed=env_seed)
        start = np.asarray(obs, dtype=np.float32)
        goal = SuccessTracker(suite, task, start)
        states, actions, rewards, successes, looks = [start], [], [], [], []
        terminated = truncated = False
        for t in range(limit):
            action = policy(env, info)
            if self.spec.lookahead:
                looks.append(self.lookahead())
            obs, _, env_terminated, env_truncated, info = env.step(action)
            state = np.asarray(obs, dtype=np.float32)
            # Rewards and success come from the suite's state predicates (not the env's own
            # signals) so that real and imagined data are labelled by the very same functions
            # (kalm_ray.envs.success: composite tasks need their stages in order).
            ok = goal(state)
            rewards.append(float(suite.reward(task, start, states[-1], state)))
            states.append(state)
            actions.append(action)
            successes.append(ok)
            if ok:
                terminated = True
                break
            if env_terminated:
                raise RuntimeError(
                    f"{self.spec.env} env terminated task {task!r} at t={t} "
                    "but its success predicate is false"
                )
            if env_truncated or t + 1 == limit:
                truncated = True
                break
        discrete = isinstance(suite.action_space, gym.spaces.Discrete)
        return Episode(
            episode_id=f"real/{task}/{k}",
            env=self.spec.env,
            task=task,
            level="train",
            instruction=instruction,
            states=np.stack(states),
            actions=np.asarray(actions, dtype=np.int64 if discrete else np.float32),
            rewards=np.asarray(rewards, dtype=np.float32),
            successes=np.asarray(successes, dtype=bool),
            terminated=terminated,
            truncated=truncated,
            lookahead=np.stack(looks) if looks else None,
        )

    def lookahead(self) -> np.ndarray:
        """The pusher's simulated next states of every action from the state it just acted
        in; NaN when it did not simulate them (an epsilon push, a random-policy episode)."""
        got = None if self._scripted is None else self._scripted.lookahead
        if got is None:
            shape = (int(self.suite.action_space.n), self.suite.layout.dim)
            return np.full(shape, np.nan, np.float32)
        return got

    def _env(self, task: str) -> gym.Env:
        if task not in self._envs:
            self._envs[task] = self.suite.make_env(
                "train", task, max_episode_steps=self.spec.max_episode_steps
            )
        return self._envs[task]

    def _policy(self, task: str, rng: np.random.Generator) -> Policy:
        """The behaviour policy of one episode (all its randomness drawn from ``rng``)."""
        spec = self.spec
        self._scripted = None
        if spec.env == "clevr":
            n_actions = int(self.suite.action_space.n)
            if rng.random() < spec.fail_fraction:
                return lambda env, info: int(rng.integers(n_actions))
            from kalm_ray.envs.clevr.scripted import ScriptedPolicy

            scripted = self._scripted = ScriptedPolicy(task, spec.epsilon, rng)
            return lambda env, info: int(scripted.act(env))
        if spec.env == "metaworld":
            expert = self.suite.expert_policy(task)
            low, high = self.suite.action_space.low, self.suite.action_space.high

            def act(env: gym.Env, info: dict) -> np.ndarray:
                with warnings.catch_warnings():
                    # metaworld.policies warns when its gains leave the [-1, 1] box; the env
                    # clips (and so do we), as in Meta-World's own evaluation.
                    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
                    a = np.asarray(self.suite.expert_action(expert, info), dtype=np.float64)
                a = a + spec.action_noise * rng.standard_normal(a.shape)
                return np.clip(a, low, high).astype(np.float32)

            return act
        raise ValueError(f"no behaviour policy for env {spec.env!r}")

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


class CollectorPool:
    """The collection role on the stages' one fault-tolerant actor pool
    (:class:`~kalm_ray.cluster.actor_pool.ActorPool`: its rules for start failures, dead
    actors and retries).

    Each actor (an :class:`EpisodeCollector`) has up to ``UNITS_IN_FLIGHT`` units queued;
    errors raised by the collection code itself propagate.
    """

    def __init__(
        self,
        spec: CollectSpec,
        *,
        num_workers: int,
        num_cpus_per_worker: float,
    ):
        self.spec = spec
        self._pool = ActorPool(
            EpisodeCollector,
            args=(spec,),
            num_workers=num_workers,
            num_cpus=num_cpus_per_worker,
            role="collection",
            method="run_unit",
            max_in_flight=UNITS_IN_FLIGHT,
            describe=lambda u: f"task {u.task!r} episodes {u.start}-{u.stop - 1}",
        )

    @property
    def actors(self) -> list:
        return self._pool.actors

    @property
    def restarts(self) -> int:
        """Actors replaced after dying (the manifest's ``worker_restarts``)."""
        return self._pool.replaced

    def wait_ready(self) -> None:
        """Block until every actor has started (for timing start-up apart from work)."""
        self._pool.wait_ready()

    def imap_unordered(self, units: list[WorkUnit]) -> Iterator[UnitResult]:
        """Run every unit once; yield results as they finish (each unit exactly once)."""
        for _, result in self._pool.imap_unordered(units):
            yield result

    def shutdown(self) -> None:
        self._pool.close()
