"""Evaluation workers (one Ray role) and the driver-side pool that fans work out to them.

:class:`EvalWorker` owns ``n_envs`` environments and a cache of loaded policies; one call
runs one *work unit* (a policy and a chunk of episode specs) and returns its results. It
is a plain class, so the benchmark's in-process baseline runs exactly the same code; the
pool wraps it with ``ray.remote``.

:class:`EvalPool` keeps every actor busy with a few units in flight. When an actor dies
(crash, OOM, ``ray.kill``, lost node) it is replaced and its unfinished units are queued
again; a unit's results are yielded once, when it completes, so nothing is counted twice
or lost.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kalm_ray.errors import KalmError
from kalm_ray.eval.episodes import EpisodeResult, EpisodeSpec, ObsBuilder, Policy, run_episodes

log = logging.getLogger("kalm_ray")

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

    def ping(self) -> bool:
        return True


class EvalPool:
    """A fixed-size pool of :class:`EvalWorker` actors that replaces the ones that die.

    Args:
        worker_kwargs: :class:`EvalWorker` arguments (large values: pass an ObjectRef).
        num_workers: actors to keep alive.
        num_cpus: logical CPUs each actor asks for (what the scheduler/autoscaler sees).
        max_in_flight: units queued per actor, so an actor never waits for the driver.
        max_attempts: a unit whose actor died this many times aborts the evaluation (a
            policy or env that kills its process every time would loop forever otherwise).
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
        import ray

        # NOTE: max_restarts stays 0: a Ray-restarted actor would silently re-run tasks
        # (max_task_retries) whose results we may already hold; replacing it here keeps the
        # bookkeeping (which units are done) in one place. SPREAD (as collection does): on a
        # multi-node cluster the env-stepping actors go one per node first, not all on one.
        self._cls = ray.remote(num_cpus=num_cpus, max_restarts=0, scheduling_strategy="SPREAD")(
            EvalWorker
        )
        self._kwargs = worker_kwargs
        self._max_in_flight = max_in_flight
        self._max_attempts = max_attempts
        self.actors: list[Any] = [self._cls.remote(**worker_kwargs) for _ in range(num_workers)]
        self.replaced = 0
        """Actors replaced after dying (for logs and tests)."""

    def wait_ready(self) -> None:
        """Block until every actor is constructed (benchmarks time start-up apart)."""
        import ray

        ray.get([a.ping.remote() for a in self.actors])

    def run(self, units: Sequence[WorkUnit]) -> Iterator[tuple[WorkUnit, list[EpisodeResult]]]:
        """Yield ``(unit, results)`` once per unit, in completion order."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        pending: deque[WorkUnit] = deque(units)
        attempts: dict[int, int] = {}
        in_flight: dict[Any, tuple[int, Any, WorkUnit]] = {}
        load = [0] * len(self.actors)

        def fill() -> None:
            for i, actor in enumerate(self.actors):
                while pending and load[i] < self._max_in_flight:
                    unit = pending.popleft()
                    in_flight[actor.run.remote(unit)] = (i, actor, unit)
                    load[i] += 1

        fill()
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            i, actor, unit = in_flight.pop(ref)
            if actor is self.actors[i]:
                load[i] -= 1
            try:
                results = ray.get(ref)
            except (RayActorError, ActorUnavailableError) as e:
                if e.actor_init_failed:  # a bug or bad input: a new actor would fail alike
                    raise KalmError(f"an evaluation worker failed to start: {_last_line(e)}") from e
                attempts[unit.uid] = attempts.get(unit.uid, 0) + 1
                if attempts[unit.uid] >= self._max_attempts:
                    raise KalmError(
                        f"evaluation of policy {unit.policy!r} lost its worker "
                        f"{attempts[unit.uid]} times on the same episodes ({_last_line(e)})"
                    ) from e
                if actor is self.actors[i]:
                    self._replace(i)
                    load[i] = 0
                pending.appendleft(unit)
            else:
                yield unit, results
            fill()

    def _replace(self, i: int) -> None:
        import ray

        log.warning("evaluation actor %d died; replacing it and re-running its episodes", i)
        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._cls.remote(**self._kwargs)
        self.replaced += 1

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def _last_line(e: BaseException) -> str:
    """The last non-empty line of an error (Ray's carry the remote traceback above it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
