"""Evaluation workers (one Ray role) and the driver-side pool that fans work out to them.

:class:`EvalWorker` owns ``n_envs`` environments and a cache of loaded policies; one call
runs one *work unit* (a policy and a chunk of episode specs) and returns its results. It
is a plain class, so the benchmark's in-process baseline runs exactly the same code; the
pool wraps it with ``ray.remote``.

:class:`EvalPool` keeps every actor busy with a few units in flight, on the stages' one
fault-tolerant pool (:mod:`kalm_ray.cluster.actor_pool`): when an actor dies (crash, OOM,
``ray.kill``, lost node) it is replaced and its unfinished units are queued again; a unit's
results are yielded once, when it completes, so nothing is counted twice or lost.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kalm_ray.cluster.actor_pool import ActorPool
from kalm_ray.eval.episodes import EpisodeResult, EpisodeSpec, ObsBuilder, Policy, run_episodes

EnvFactory = Callable[[str, str], Any]
"""``(level, task) -> gymnasium.Env``."""
PolicyLoader = Callable[[str], Policy]
"""``policy_dir -> Policy``."""


@dataclass(frozen=True)
class WorkUnit:
    """One policy on a chunk of episode specs; ``uid`` is unique within one evaluation."""

    uid: int
    policy: str
    policy_dir: str
    specs: tuple[EpisodeSpec, ...]


class EvalWorker:
    """Runs work units on its own environments; one instance per Ray actor (or in-process).

    Args:
        make_env: builds an environment for ``(level, task)``; each of the ``n_envs`` slots
            keeps one env per level and is reset to each episode's task through ``options``.
        load_policy: loads an exported policy from its folder (cached, ``policy_cache`` most
            recently used kept, so one pass over many policies loads each once per actor).
        make_obs: ``(state (B, D), embedding (B, E)) -> obs``, the same as in training.
        embeddings: wording -> embedding ``(E,)`` float32 for every wording in the specs.
        n_envs: environments stepped together (one batched policy call per step).
        max_steps: episode step limit.
    """

    def __init__(
        self,
        *,
        make_env: EnvFactory,
        load_policy: PolicyLoader,
        make_obs: ObsBuilder,
        embeddings: Mapping[str, np.ndarray],
        n_envs: int,
        max_steps: int,
        policy_cache: int = 16,
    ):
        self._make_env = make_env
        self._load_policy = load_policy
        self._make_obs = make_obs
        self._embeddings = {k: np.asarray(v, dtype=np.float32) for k, v in embeddings.items()}
        self._n_envs = n_envs
        self._max_steps = max_steps
        self._cache_size = policy_cache
        self._policies: OrderedDict[str, Policy] = OrderedDict()
        self._envs: dict[tuple[int, str], Any] = {}

    def _policy(self, policy_dir: str) -> Policy:
        if policy_dir in self._policies:
            self._policies.move_to_end(policy_dir)
        else:
            self._policies[policy_dir] = self._load_policy(policy_dir)
            # One thread per worker: the pool is the parallelism, and torch's default of one
            # thread per core oversubscribes the machine as soon as there are two workers.
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(1)
            while len(self._policies) > self._cache_size:
                self._policies.popitem(last=False)
        return self._policies[policy_dir]

    def _env(self, slot: int, spec: EpisodeSpec) -> Any:
        key = (slot, spec.level)
        if key not in self._envs:
            self._envs[key] = self._make_env(spec.level, spec.task)
        return self._envs[key]

    def run(self, unit: WorkUnit) -> list[EpisodeResult]:
        """Results of ``unit.specs`` (same order) under ``unit``'s policy."""
        return run_episodes(
            self._policy(unit.policy_dir),
            unit.specs,
            get_env=self._env,
            embeddings=self._embeddings,
            make_obs=self._make_obs,
            n_envs=self._n_envs,
            max_steps=self._max_steps,
        )

    def ready(self) -> bool:
        """Called once after start-up so the driver knows the actor is alive."""
        return True


class EvalPool:
    """The evaluation role on the stages' one fault-tolerant actor pool
    (:class:`~kalm_ray.cluster.actor_pool.ActorPool`: its rules for start failures, dead
    actors and retries).

    Args:
        worker_kwargs: :class:`EvalWorker` arguments (large values: pass an ObjectRef).
        num_workers: actors to keep alive.
        num_cpus: logical CPUs each actor asks for (what the scheduler/autoscaler sees).
        max_in_flight: units queued per actor, so an actor never waits for the driver.
        max_attempts: a unit whose actor died this many times aborts the evaluation.
    """

    def __init__(
        self,
        worker_kwargs: dict[str, Any],
        *,
        num_workers: int,
        num_cpus: float = 1.0,
        max_in_flight: int = 2,
        max_attempts: int = 3,
    ):
        self._pool = ActorPool(
            EvalWorker,
            kwargs=worker_kwargs,
            num_workers=num_workers,
            num_cpus=num_cpus,
            role="evaluation",
            method="run",
            max_in_flight=max_in_flight,
            max_attempts=max_attempts,
            describe=lambda u: f"policy {u.policy!r}",
        )

    @property
    def actors(self) -> list[Any]:
        return self._pool.actors

    @property
    def replaced(self) -> int:
        """Actors replaced after dying (for the manifest, logs and tests)."""
        return self._pool.replaced

    def wait_ready(self) -> None:
        """Block until every actor is constructed (benchmarks time start-up apart)."""
        self._pool.wait_ready()

    def run(self, units: Sequence[WorkUnit]) -> Iterator[tuple[WorkUnit, list[EpisodeResult]]]:
        """Yield ``(unit, results)`` once per unit, in completion order."""
        return self._pool.imap_unordered(units)

    def close(self) -> None:
        self._pool.close()
