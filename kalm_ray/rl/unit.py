"""One training unit: one (algorithm, data mix, seed) -> one policy folder.

A unit reads only the prepared data of its mix and writes only its own folder, so units can
run one after another in the driver, or each as its own Ray task
(:mod:`kalm_ray.rl.unit_pool`). Folder contents: ``module/`` (exported inference RLModule),
``checkpoint/`` (full RLlib Algorithm checkpoint),
``policy_info.json`` and ``curve.csv`` (one row per iteration: loss terms, Q values, and
``quick_success`` every ``quick_eval_every`` iterations and at the last one).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import pyarrow.fs as pafs

from kalm_ray.artifacts import RunDir
from kalm_ray.config import UNIT_SEEDS, TrainConfig
from kalm_ray.rl.algos import build_config
from kalm_ray.rl.dataset import MixInfo
from kalm_ray.rl.policy import CHECKPOINT_DIR, CURVE_FILE, MODULE_DIR, POLICY_INFO, load_policy
from kalm_ray.rl.quick_eval import QuickEval

log = logging.getLogger("kalm_ray")


@dataclass(frozen=True)
class Unit:
    algo: str
    data: str
    seed: int

    @property
    def name(self) -> str:
        """Folder name under ``policy/``: ``<algo>-<data>-seed<k>``."""
        return f"{self.algo}-{self.data}-seed{self.seed}"


def plan_units(train: TrainConfig) -> list[Unit]:
    """The grid algos x data mixes x seeds, in config order."""
    return [Unit(a, d, s) for a in train.algos for d in train.data for s in train.seeds]


def learner_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Scalar loss terms and Q statistics of the default module from ``algo.train()``'s result."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.utils.metrics import LEARNER_RESULTS

    out = {}
    for key, value in sorted(result.get(LEARNER_RESULTS, {}).get(DEFAULT_MODULE_ID, {}).items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif hasattr(value, "item") and getattr(value, "size", 1) == 1:
            out[key] = float(value.item())
    return out


def curve_csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV; columns are the union of keys in first-seen order (missing = empty)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class ModuleExporter:
    """Saves the learner's current RLModule (inference version) as a standalone folder."""

    def __init__(self, algo: Any):
        self.algo = algo
        self.module = algo.config.get_rl_module_spec(inference_only=True).build()

    def save(self, dest: str) -> None:
        from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

        state = self.algo.learner_group.get_state(
            components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}", inference_only=True
        )[COMPONENT_LEARNER][COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]
        self.module.set_state(state)
        self.module.save_to_path(dest)

    def digest(self) -> str:
        """:func:`weights_digest` of the module as last saved."""
        return weights_digest(self.module.state_dict())


def weights_digest(state: dict[str, Any]) -> str:
    """SHA-256 over a module's tensors (name, dtype, shape and bytes, in name order): equal
    exactly when two trainings produced the same weights, whatever the files' metadata."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def close_iterators(algo: Any) -> None:
    """Close the Ray Data iterators RLlib keeps after ``algo.stop()``."""
    # NOTE: otherwise they are collected at interpreter exit, after Ray shut down, and each
    # prints a "Ray is not initialized" traceback (ray.data stats update in GeneratorExit).
    learner = getattr(algo.learner_group, "_learner", None)
    iterator = getattr(learner, "iterator", None)
    offline = getattr(algo, "offline_data", None)
    for gen in (
        getattr(iterator, "_epoch_iterator", None),
        getattr(offline, "batch_iterators", None),
    ):
        if hasattr(gen, "close"):
            gen.close()


def train_unit(
    unit: Unit,
    *,
    train: TrainConfig,
    run: RunDir,
    out_dir: str,
    mix: MixInfo,
    action_space: gym.Space,
    info: dict[str, Any],
    quick_eval: QuickEval | None,
    master_seed: int = 0,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Train ``unit`` and write ``<out_dir>/<unit.name>/`` on ``run``; returns its summary.

    Args:
        out_dir: the stage's (temporary) output folder, relative to the run dir.
        mix: the prepared data of ``unit.data``.
        info: fields shared by every unit's ``policy_info.json`` (env, dims, encoder).
        quick_eval: the train-level success check, or None to skip it.
        progress: told each finished iteration (a :class:`kalm_ray.progress.ProgressPoster`).
    """
    t0 = time.perf_counter()
    run.delete(out_dir, unit.name)  # what an interrupted attempt left, if anything
    tmp = None if run.is_local else tempfile.TemporaryDirectory(prefix=f"kalm-{unit.name}-")
    local = run.path(out_dir, unit.name) if tmp is None else tmp.name
    os.makedirs(local, exist_ok=True)
    policy_info = {
        **info,
        "algo": unit.algo,
        "data": unit.data,
        "seed": unit.seed,
        "obs_dim": mix.obs_dim,
        "state_dim": mix.state_dim,
        "emb_dim": mix.emb_dim,
        "module": MODULE_DIR,
        "checkpoint": CHECKPOINT_DIR,
    }
    with open(os.path.join(local, POLICY_INFO), "w") as f:
        json.dump(policy_info, f, indent=2)
    config = build_config(
        unit.algo,
        train=train,
        data_path=mix.path,
        filesystem=None if run.is_local else run.fs,
        obs_dim=mix.obs_dim,
        action_space=action_space,
        num_rows=sum(mix.rows.values()),
        seed=master_seed * UNIT_SEEDS + unit.seed,  # bounded in config: below 2**32
    )
    algo = config.build_algo()
    t_build = time.perf_counter() - t0
    exporter, rows, t_eval, success = ModuleExporter(algo), [], 0.0, None
    try:
        for it in range(1, train.iterations + 1):
            t_it = time.perf_counter()
            result = algo.train()
            row: dict[str, Any] = {
                "iteration": it,
                "updates": it * train.updates_per_iteration,
                "train_s": round(time.perf_counter() - t_it, 3),
                **learner_metrics(result),
            }
            every = train.quick_eval_every
            if quick_eval is not None and every and (it % every == 0 or it == train.iterations):
                t_q = time.perf_counter()
                exporter.save(os.path.join(local, MODULE_DIR))
                success = quick_eval(load_policy(local))
                row["quick_success"] = success
                t_eval += time.perf_counter() - t_q
            rows.append(row)
            with open(os.path.join(local, CURVE_FILE), "w") as f:
                f.write(curve_csv(rows))
            if progress is not None:
                progress({"source": unit.name, "step": it}, force=True)
            log.info(
                "train %s: iteration %d/%d %s",
                unit.name,
                it,
                train.iterations,
                "" if success is None else f"quick success {success:.2f}",
            )
        exporter.save(os.path.join(local, MODULE_DIR))
        digest = exporter.digest()
        algo.save_to_path(os.path.join(local, CHECKPOINT_DIR))
    finally:
        close_iterators(algo)
        algo.stop()
    if tmp is not None:
        pafs.copy_files(
            local,
            run.path(out_dir, unit.name),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=run.fs,
        )
        tmp.cleanup()
    wall = time.perf_counter() - t0
    return {
        "unit": unit.name,
        "quick_success": success,
        "iterations": train.iterations,
        "updates": train.iterations * train.updates_per_iteration,
        "build_s": round(t_build, 2),
        "quick_eval_s": round(t_eval, 2),
        "wall_s": round(wall, 2),
        "weights_sha256": digest,
        "final": rows[-1] if rows else {},
    }
