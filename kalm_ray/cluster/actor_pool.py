"""The one fault-tolerant pool of Ray actors, used by every stage that fans work out to its
own actors (collect's :class:`~kalm_ray.data.collect_actor.CollectorPool`, evaluate's
:class:`~kalm_ray.eval.eval_actor.EvalPool`).

One set of rules for every role:

- **start**: each actor asks for ``num_cpus`` with SPREAD placement (on a multi-node cluster
  the env-stepping actors go one per node first) and no Ray restarts (see the NOTE below).
- **work goes only to started actors**: an actor gets items once it has answered its
  start-up probe, so actors the cluster cannot place (more workers than CPUs) never hold
  work hostage; they join if they start later. A warning when none has started after
  :data:`STARTUP_WARN_S`.
- **an actor that fails to start** (its constructor raised) is one :class:`KalmError` at
  once, never a retry: a bug or bad input, a new actor would fail alike.
- **an actor that dies** (``ray.kill``, SIGKILL, OOM, node lost) is replaced and its
  unfinished items go back to the front of the queue; an item whose actor died
  ``max_attempts`` times aborts the stage (an item that kills its process every time would
  loop forever otherwise).
- **each item's result is yielded once**, in completion order, so nothing is lost or counted
  twice.

Ray's own ``ray.util.ActorPool`` does not serve here: it neither replaces a dead actor nor
says which item was lost with it (``get_next_unordered`` re-raises and puts the dead actor
back among the idle ones), and it queues one item per actor.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from kalm_ray.errors import KalmError

log = logging.getLogger("kalm_ray")

STARTUP_WARN_S = 60.0
"""Warn when no actor has started after this long (the cluster may lack the CPUs asked for)."""

MAX_ATTEMPTS = 3
"""Deaths of the actor holding a piece of work after which a stage gives up: the pool's rule,
and imagine's over Ray Data (:func:`kalm_ray.llm.imagine.store.judged_once`)."""


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error (Ray's carry the remote traceback above it)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


class ActorPool:
    """``num_workers`` actors of ``cls``, each with up to ``max_in_flight`` items queued.

    Args:
        cls: the role's plain class (its instances run in-process too).
        args, kwargs: constructor arguments of every actor (large values: pass ObjectRefs).
        num_workers: actors to keep alive (at least one).
        num_cpus: logical CPUs each actor asks for (what the scheduler/autoscaler sees).
        role: what the actors are, for messages (``collection``, ``evaluation``).
        method: the actor method that takes one item and returns its result.
        probe: the actor method answered once the actor is constructed (returns anything).
        max_in_flight: items queued per actor, so an actor never waits for the driver.
        max_attempts: deaths of an item's actor after which the stage gives up.
        describe: an item's name in messages (default: its position in the list).
    """

    def __init__(
        self,
        cls: type,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        num_workers: int,
        num_cpus: float,
        role: str,
        method: str = "run",
        probe: str = "ready",
        max_in_flight: int = 2,
        max_attempts: int = MAX_ATTEMPTS,
        describe: Callable[[Any], str] | None = None,
    ):
        import ray  # here, not at module level: importing a role's module needs no Ray

        if num_workers < 1:
            raise ValueError(f"an actor pool needs at least one worker, got {num_workers}")
        # NOTE: max_restarts stays 0: a Ray-restarted actor would silently re-run tasks
        # (max_task_retries) whose results may already be held here; replacing it in the
        # pool keeps the bookkeeping (which items are done) in one place.
        self._cls = ray.remote(num_cpus=num_cpus, max_restarts=0, scheduling_strategy="SPREAD")(cls)
        self._args, self._kwargs = tuple(args), dict(kwargs or {})
        self.num_cpus, self.role = num_cpus, role
        self._method, self._probe = method, probe
        self._max_in_flight, self._max_attempts = max_in_flight, max_attempts
        self._describe = describe
        self.actors: list[Any] = [self._start() for _ in range(num_workers)]
        self.replaced = 0
        """Actors replaced after dying (for the manifest, logs and tests)."""

    def _start(self) -> Any:
        return self._cls.remote(*self._args, **self._kwargs)

    def wait_ready(self) -> None:
        """Block until every actor is constructed (benchmarks time start-up apart from work)."""
        import ray

        ray.get([getattr(a, self._probe).remote() for a in self.actors])

    def imap_unordered(self, items: Sequence[Any]) -> Iterator[tuple[Any, Any]]:
        """Run every item once; yield ``(item, result)`` as each finishes (each exactly once).

        Raises KalmError when an actor fails to start, or when one item's actor died
        ``max_attempts`` times; errors raised by the role's own code propagate as they are.
        """
        import ray
        from ray.exceptions import RayActorError

        todo: deque[int] = deque(range(len(items)))
        # ref -> (slot, actor, item index); index None marks an actor's start-up probe.
        inflight: dict[Any, tuple[int, Any, int | None]] = {}
        load = [0] * len(self.actors)
        started: set[int] = set()
        attempts: Counter[int] = Counter()
        done: set[int] = set()

        def probe(slot: int) -> None:
            actor = self.actors[slot]
            inflight[getattr(actor, self._probe).remote()] = (slot, actor, None)

        def fill() -> None:
            for slot in sorted(started):
                actor = self.actors[slot]
                while todo and load[slot] < self._max_in_flight:
                    i = todo.popleft()
                    inflight[getattr(actor, self._method).remote(items[i])] = (slot, actor, i)
                    load[slot] += 1

        for slot in range(len(self.actors)):
            probe(slot)
        while len(done) < len(items):
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=STARTUP_WARN_S)
            if not ready:
                if not started:
                    log.warning(
                        "%s: no worker started in %ss (each asks for %s CPUs; cluster has %s)",
                        self.role,
                        STARTUP_WARN_S,
                        self.num_cpus,
                        ray.cluster_resources().get("CPU", 0),
                    )
                continue
            slot, actor, i = inflight.pop(ready[0])
            current = actor is self.actors[slot]
            if current and i is not None:
                load[slot] -= 1
            try:
                result = ray.get(ready[0])
            except RayActorError as e:  # ActorDiedError, ActorUnavailableError
                if getattr(e, "actor_init_failed", False):
                    raise KalmError(f"{self.role} worker failed to start: {last_line(e)}") from e
                if i is not None:
                    attempts[i] += 1
                    if attempts[i] >= self._max_attempts:
                        raise KalmError(
                            f"{self.role} of {self._name(items, i)} lost its worker "
                            f"{attempts[i]} times on the same work ({last_line(e)})"
                        ) from e
                    todo.appendleft(i)
                if current:  # the first failure seen from this actor: replace it
                    self._replace(slot, e)
                    load[slot] = 0
                    started.discard(slot)
                    probe(slot)
            else:
                if current:
                    started.add(slot)
                if i is not None and i not in done:
                    done.add(i)
                    yield items[i], result
            fill()

    def _name(self, items: Sequence[Any], i: int) -> str:
        return self._describe(items[i]) if self._describe else f"work item {i}"

    def _replace(self, slot: int, err: BaseException) -> None:
        import ray

        log.warning(
            "%s: worker %d died (%s); starting a replacement and running its work again",
            self.role,
            slot,
            type(err).__name__,
        )
        ray.kill(self.actors[slot], no_restart=True)  # may be merely unreachable: make sure
        self.actors[slot] = self._start()
        self.replaced += 1

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
