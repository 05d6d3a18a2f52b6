"""Training units as concurrent Ray tasks: one task per unit, each with its resource request.

Every (algorithm, data mix, seed) unit is independent (see :mod:`kalm_ray.rl.unit`), so the
train stage hands them to :class:`UnitPool`, which submits one Ray task per unit asking for
``train.num_cpus_per_unit`` CPUs (and the learner's GPUs). Ray places the tasks wherever
those resources are free, so a cluster of N such slots trains N units at once, and the
pending tasks are the demand an autoscaling cluster grows for. ``train.max_concurrent_units``
caps the tasks in flight. A unit whose algorithm starts Ray work of its own (MARWIL's
PreLearner actors, remote learners) also needs those CPUs free while it runs; those units
are held back in the driver until the cluster's CPUs hold them, since a task occupying the
last CPUs would wait forever for its own actors.

A unit's failure is its own: :meth:`UnitPool.imap_unordered` yields each unit with its
summary or its exception, and the other units go on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np

from kalm_ray.artifacts import RunDir
from kalm_ray.config import TrainConfig
from kalm_ray.rl.dataset import MixInfo
from kalm_ray.rl.quick_eval import QuickEvalSpec
from kalm_ray.rl.unit import Unit

log = logging.getLogger("kalm_ray")


def nested_cpus(algo: str, train: TrainConfig) -> float:
    """Logical CPUs of the Ray actors a unit of ``algo`` starts itself (0: none)."""
    cpus = 0.0
    if algo == "marwil":  # RLlib's PreLearner actor pool (see kalm_ray.rl.algos)
        cpus += (train.prelearner_actors or max(1, train.num_learners)) * (
            train.num_cpus_per_prelearner
        )
    if train.num_learners > 0:
        per = train.num_cpus_per_learner
        cpus += train.num_learners * (
            per if per is not None else (0 if train.num_gpus_per_learner else 1)
        )
    return cpus


def unit_cpus(algo: str, train: TrainConfig, *, in_driver: bool = False) -> float:
    """Logical CPUs one unit of ``algo`` holds while it runs: its Ray task (none when it trains
    in the driver) and the actors it starts itself (:func:`nested_cpus`)."""
    return (0.0 if in_driver else train.num_cpus_per_unit) + nested_cpus(algo, train)


def _train_remote(
    unit: Unit,
    *,
    train: TrainConfig,
    run_uri: str,
    out_dir: str,
    mix: MixInfo,
    action_space: gym.Space,
    info: dict[str, Any],
    embeddings: dict[str, np.ndarray],
    quick: QuickEvalSpec | None,
    master_seed: int,
    progress: str | None = None,
) -> dict[str, Any]:
    """Body of a unit's Ray task: the same :func:`train_unit` the driver would run."""
    import torch

    from kalm_ray.progress import ProgressPoster
    from kalm_ray.raysetup import configure_console
    from kalm_ray.rl.unit import train_unit

    configure_console(False)
    # The CPUs asked for are the learner's threads (Ray sets OMP_NUM_THREADS only when a
    # worker starts, and a pooled worker may have started for another request).
    torch.set_num_threads(max(1, int(train.num_cpus_per_unit)))
    quick_eval = quick.build(embeddings) if quick is not None else None
    try:
        return train_unit(
            unit,
            train=train,
            run=RunDir(run_uri),
            out_dir=out_dir,
            mix=mix,
            action_space=action_space,
            info=info,
            quick_eval=quick_eval,
            master_seed=master_seed,
            progress=ProgressPoster(progress),
        )
    finally:
        if quick_eval is not None:
            quick_eval.close()


class UnitPool:
    """Submits units as Ray tasks and yields them as they finish (see the module doc)."""

    def __init__(
        self,
        *,
        train: TrainConfig,
        run: RunDir,
        out_dir: str,
        mixes: dict[str, MixInfo],
        action_space: gym.Space,
        info: dict[str, Any],
        embeddings: dict[str, np.ndarray],
        quick: QuickEvalSpec | None,
        master_seed: int,
        progress: str | None = None,
    ):
        import ray

        self.train = train
        self.mixes = mixes
        # Local run dirs by absolute path: a worker's cwd need not be the driver's.
        self.common = {
            "train": train,
            "run_uri": run.root if run.is_local else run.uri,
            "out_dir": out_dir,
            "action_space": action_space,
            "info": info,
            "embeddings": ray.put(embeddings),
            "quick": quick,
            "master_seed": master_seed,
            "progress": progress,
        }
        gpus = train.num_gpus_per_learner if train.num_learners == 0 else 0.0
        self.task = ray.remote(_train_remote).options(
            num_cpus=train.num_cpus_per_unit,
            num_gpus=gpus,
            max_retries=1,  # a lost worker (node gone, OOM-killed): the unit starts over once
            name="kalm-train-unit",
        )
        self.inflight: dict[Any, Unit] = {}

    def _fits(self, unit: Unit) -> bool:
        """Whether one more unit may be submitted now."""
        import ray

        cap = self.train.max_concurrent_units
        if cap is not None and len(self.inflight) >= cap:
            return False
        if nested_cpus(unit.algo, self.train) == 0 or not self.inflight:
            return True
        held = sum(unit_cpus(u.algo, self.train) for u in self.inflight.values())
        return held + unit_cpus(unit.algo, self.train) <= ray.cluster_resources().get("CPU", 0.0)

    def imap_unordered(
        self, units: list[Unit]
    ) -> Iterator[tuple[Unit, dict[str, Any] | BaseException]]:
        """``(unit, summary)`` or ``(unit, exception)`` for every unit, in finishing order."""
        import ray

        queue = list(units)
        try:
            while queue or self.inflight:
                while queue and self._fits(queue[0]):
                    unit = queue.pop(0)
                    ref = self.task.remote(unit, mix=self.mixes[unit.data], **self.common)
                    self.inflight[ref] = unit
                (ref,), _ = ray.wait(list(self.inflight), num_returns=1)
                unit = self.inflight.pop(ref)
                try:
                    outcome: dict[str, Any] | BaseException = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a unit's failure is reported, not raised
                    outcome = getattr(e, "cause", None) or e
                yield unit, outcome
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the units still running (Ctrl-C, SIGTERM, an error in the driver)."""
        import ray

        for ref in list(self.inflight):
            ray.cancel(ref, force=True)
        self.inflight.clear()
