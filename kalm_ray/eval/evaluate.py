"""Machinery of the ``evaluate`` stage (:mod:`kalm_ray.stages.evaluate`): the policies to
evaluate (:func:`find_policies`, the LLM-as-policy and the random baseline), the work units
and pool size, the pass over the actor pool (:func:`evaluate_units`), the finished units a
stopped run leaves for its rerun (:class:`UnitStore`), and the episodes table.

Work units are (policy, chunk of episode specs), ordered policy by policy so an actor
mostly reuses the policy it has cached; results are keyed by (policy, spec index).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kalm_ray.artifacts import RunDir
from kalm_ray.config import ExperimentConfig
from kalm_ray.envs import get_suite
from kalm_ray.errors import InputError
from kalm_ray.eval.episodes import EpisodeResult, EpisodeSpec
from kalm_ray.eval.eval_actor import EvalPool, WorkUnit
from kalm_ray.eval.results import (
    LLM_ALGO,
    RANDOM_ALGO,
    RANDOM_DATA,
    PolicyId,
)

log = logging.getLogger("kalm_ray")

POLICY_INFO = "policy_info.json"
_NAME = re.compile(r"^(?P<algo>[a-z0-9]+)-(?P<data>.+)-seed(?P<seed>\d+)$")


def find_policies(run: RunDir, *, env: str) -> list[PolicyId]:
    """Every exported policy under ``policy/`` (folders holding ``policy_info.json``)."""
    found = []
    for name in run.list("policy"):
        if not run.exists("policy", name, POLICY_INFO):
            continue
        info = run.read_json("policy", name, POLICY_INFO)
        m = _NAME.match(name)
        try:
            algo = info.get("algo") or m["algo"]  # type: ignore[index]
            data = info.get("data") or m["data"]  # type: ignore[index]
            seed = int(info["seed"] if info.get("seed") is not None else m["seed"])  # type: ignore[index]
        except TypeError:
            raise InputError(
                f"{run.uri_of('policy', name, POLICY_INFO)}: no algo/data/seed"
            ) from None
        if info.get("env", env) != env:
            raise InputError(
                f"{run.uri_of('policy', name)}: a policy for env {info['env']!r}, not {env!r}"
            )
        found.append(PolicyId(name=name, algo=algo, data=data, seed=seed))
    if not found:
        raise InputError(
            f"{run.uri_of('policy')}: no exported policies; run `{run.command('train')}` first"
        )
    return found


def wording_embeddings(run: RunDir, specs: Sequence[EpisodeSpec]) -> dict[str, np.ndarray]:
    """Embedding of each wording the specs use, from ``data/instructions.parquet``."""
    from kalm_ray.data.text import load_instruction_table

    table = load_instruction_table(run)
    wanted = sorted({s.wording for s in specs})
    missing = [w for w in wanted if w not in table]
    if missing:
        raise InputError(
            f"{run.uri_of('data', 'instructions.parquet')}: no embedding for {len(missing)} "
            "evaluation "
            f"wordings (e.g. {missing[0]!r}): it was made for other wordings than this "
            "code's; collect into a new --run-dir (an up-to-date collect is skipped)"
        )
    return {w: np.asarray(table[w], dtype=np.float32) for w in wanted}


def pool_size(
    configured: int | None, *, available_cpus: float, num_cpus_per_worker: float, n_units: int
) -> int:
    """Evaluation actors to start: ``evaluate.num_workers``, or (None) as many as the cluster's
    available CPUs hold at ``num_cpus_per_worker`` each; never more than the work units (an
    actor without a unit only costs start-up) and at least one.
    """
    if configured is None:
        configured = int(available_cpus / num_cpus_per_worker + 1e-9)
    return max(1, min(configured, n_units))


def make_units(
    policies: Sequence[PolicyId], specs: Sequence[EpisodeSpec], *, run: RunDir, size: int
) -> list[WorkUnit]:
    """Policy-major work units of about ``size`` specs each (chunks of equal length)."""
    n_chunks = max(1, math.ceil(len(specs) / size))
    bounds = np.linspace(0, len(specs), n_chunks + 1).round().astype(int)
    units = []
    for p in policies:
        where = (
            LLM_POLICY_PREFIX + run.uri_of("model")
            if p.algo == LLM_ALGO
            else run.uri_of("policy", p.name)
        )
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            units.append(WorkUnit(len(units), p.name, where, tuple(specs[lo:hi])))
    return units


LLM_POLICY_PREFIX = "llm+"
"""A work unit's ``policy_dir`` for the LLM-as-policy: this prefix, then the model folder."""


def llm_policy_id(run: RunDir, cfg: ExperimentConfig) -> PolicyId:
    """The LLM-as-policy row (``evaluate.llm_policy``); the grounded model must exist."""
    from kalm_ray.llm.codec import CODEC_FILE

    if not run.exists("model", CODEC_FILE):
        raise InputError(
            f"evaluate.llm_policy: {run.uri_of('model', CODEC_FILE)} missing; "
            f"run `{run.command('ground')}` first (or set evaluate.llm_policy: false)"
        )
    return PolicyId(name=LLM_ALGO, algo=LLM_ALGO, data="real", seed=cfg.seed)


def evaluate_units(
    units: Sequence[WorkUnit],
    worker_kwargs: dict[str, Any],
    *,
    num_workers: int,
    num_cpus: float = 1.0,
    done: dict[int, tuple[WorkUnit, list[EpisodeResult]]] | None = None,
    on_unit: Callable[[WorkUnit, list[EpisodeResult]], None] | None = None,
) -> tuple[dict[str, dict[int, EpisodeResult]], int]:
    """Run ``units`` on an actor pool with a progress bar; returns (outcomes, replaced actors).

    ``done``: units finished before (a resumed run), counted in without running;
    ``on_unit`` is called with each unit as it finishes (the resume store saves it).
    """
    from tqdm import tqdm

    done = done or {}
    outcomes: dict[str, dict[int, EpisodeResult]] = {}
    for u in [*units, *(u for u, _ in done.values())]:
        outcomes.setdefault(u.policy, {})
    for unit, results in done.values():
        for r in results:
            outcomes[unit.policy].setdefault(r.index, r)
    bar = tqdm(
        total=sum(len(u.specs) for u in units) + sum(len(r) for _, r in done.values()),
        initial=sum(len(r) for _, r in done.values()),
        unit="ep",
        desc="evaluate",
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,
        smoothing=0.1,
    )
    if not units:
        bar.close()
        return outcomes, 0
    pool = EvalPool(worker_kwargs, num_workers=num_workers, num_cpus=num_cpus)
    try:
        for unit, results in pool.run(units):
            for r in results:
                # setdefault: a unit re-run after its actor died never overwrites or double-counts.
                outcomes[unit.policy].setdefault(r.index, r)
            if on_unit is not None:
                on_unit(unit, results)
            bar.update(len(results))
    finally:
        bar.close()
        pool.close()
    return outcomes, pool.replaced


class UnitStore:
    """Finished work units of a resumable evaluation, in its staging folder: one
    ``unit-NNNNN.json`` per unit (its policy, its spec indices, each episode's outcome),
    marked finished (:class:`~kalm_ray.artifacts.Staging`) once written."""

    PREFIX = "unit-"

    def __init__(self, run: RunDir, folder: str):
        from kalm_ray.artifacts import Staging

        self.run, self.folder, self.staging = run, folder, Staging(run, folder)

    def _name(self, unit: WorkUnit) -> str:
        return f"{self.PREFIX}{unit.uid:05d}.json"

    def save(self, unit: WorkUnit, results: list[EpisodeResult]) -> None:
        body = {
            "policy": unit.policy,
            "policy_dir": unit.policy_dir,
            "indices": [s.index for s in unit.specs],
            "results": [
                {"index": int(r.index), "success": bool(r.success), "length": int(r.length),
                 "ret": float(r.ret)}
                for r in results
            ],
        }
        self.run.write_json(body, self.folder, self._name(unit))
        self.staging.mark_finished(self._name(unit), {"policy": unit.policy})

    def resume(self, units: Sequence[WorkUnit]) -> dict[int, tuple[WorkUnit, list[EpisodeResult]]]:
        """``uid -> (unit, results)`` of the units saved by a stopped run of this same stage
        (same fingerprint, so the same policies and specs); any mismatch is redone."""
        marked = self.staging.finished()
        out = {}
        for u in units:
            if self._name(u) not in marked:
                continue
            try:
                body = json.loads(self.run.read_bytes(self.folder, self._name(u)))
                results = [EpisodeResult(**r) for r in body["results"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            same = body.get("policy") == u.policy and body.get("indices") == [
                s.index for s in u.specs
            ]
            if same and sorted(r.index for r in results) == sorted(body["indices"]):
                out[u.uid] = (u, results)
        return out

    def clear(self) -> None:
        self.staging.remove(self.PREFIX)


def episodes_parquet(
    specs: Sequence[EpisodeSpec], outcomes: dict[str, list[EpisodeResult]]
) -> bytes:
    """One row per (policy, episode): the spec and its outcome, as Parquet bytes."""
    cols: dict[str, list] = {
        k: []
        for k in (
            "policy",
            "index",
            "level",
            "task",
            "wording",
            "seed",
            "success",
            "length",
            "return",
        )
    }
    for name, results in outcomes.items():
        for s, r in zip(specs, results, strict=True):
            for k, v in (
                ("policy", name),
                ("index", s.index),
                ("level", s.level),
                ("task", s.task),
                ("wording", s.wording),
                ("seed", s.seed),
                ("success", r.success),
                ("length", r.length),
                ("return", r.ret),
            ):
                cols[k].append(v)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


RANDOM_POLICY = PolicyId(name="random", algo=RANDOM_ALGO, data=RANDOM_DATA, seed=0)
"""The uniform-random baseline (``evaluate.random_baseline``); it has no folder."""


class RandomPolicy:
    """Uniform random actions, each drawn from a hash of its observation.

    A function of the observation (not of a generator's state), so its episodes are the same
    whichever worker runs them and in whatever order: the baseline is paired and reproducible
    like every other policy. (Pushing into a wall leaves the state, hence the action, unchanged:
    such an episode repeats that push to the step limit; with 40 actions that is rare.)
    """

    info = {"algo": "random", "data": "none", "seed": 0}

    def __init__(self, action_space: Any):
        self._space = action_space

    def act(self, obs: np.ndarray) -> np.ndarray:
        out = []
        for row in np.ascontiguousarray(obs, dtype=np.float32):
            digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(digest, "little"))
            if hasattr(self._space, "n"):
                out.append(rng.integers(int(self._space.n)))
            else:
                out.append(rng.uniform(self._space.low, self._space.high).astype(np.float32))
        return np.asarray(out)


def load_policy_or_random(policy_dir: str, *, loader: Any, action_space: Any) -> Any:
    """``loader(policy_dir)``, the random baseline for its (folder-less) name, or the
    LLM-as-policy for a ``llm+<model dir>`` unit."""
    if policy_dir.startswith(LLM_POLICY_PREFIX):
        from kalm_ray.llm.policy import LLMPolicy

        return LLMPolicy(policy_dir[len(LLM_POLICY_PREFIX) :], device="cpu")
    if policy_dir.rstrip("/").rsplit("/", 1)[-1] == RANDOM_POLICY.name:
        return RandomPolicy(action_space)
    return loader(policy_dir)


def make_suite_env(env_name: str, max_steps: int, level: str, task: str) -> Any:
    """An env of suite ``env_name`` for ``(level, task)`` (module level, so actors unpickle it).

    Envs of both suites switch task at ``reset(options={"task": ...})`` within their level,
    so a worker keeps one per (slot, level).
    """
    return get_suite(env_name).make_env(level, task, max_episode_steps=max_steps)


def policy_loader() -> Any:
    """``load_policy`` (imported here: the driver needs it only to hand it to the actors)."""
    from kalm_ray.rl.policy import load_policy

    return load_policy


def obs_builder() -> Any:
    """``make_obs``, the observation the policies were trained on (imported here, as above)."""
    from kalm_ray.rl.dataset import make_obs

    return make_obs
