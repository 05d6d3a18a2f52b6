"""``kalm run``: every stage in order, each skipped when its manifest is current."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable

from kalm_ray.artifacts import Manifest, RunDir
from kalm_ray.config import ExperimentConfig
from kalm_ray.errors import KalmError
from kalm_ray.plan import check_local
from kalm_ray.raysetup import check_address
from kalm_ray.stage import (
    OUTPUT_DIRS,
    STAGES,
    as_run_dir,
    plan_stage,
    stage_inputs,
    stage_states,
)

log = logging.getLogger("kalm_ray")

_ENTRY: dict[str, str] = {
    "collect": "kalm_ray.stages.collect:run_collect",
    "ground": "kalm_ray.stages.ground:run_ground",
    "imagine": "kalm_ray.stages.imagine:run_imagine",
    "train": "kalm_ray.stages.train:run_train",
    "evaluate": "kalm_ray.stages.evaluate:run_evaluate",
}

StageFn = Callable[[ExperimentConfig, RunDir], Manifest]


def stage_fn(stage: str) -> StageFn:
    """The ``run_<stage>`` function (imports its module)."""
    if stage not in _ENTRY:
        raise KalmError(f"unknown stage {stage!r}; valid choices: {', '.join(STAGES)}")
    mod_name, fn_name = _ENTRY[stage].split(":")
    return getattr(importlib.import_module(mod_name), fn_name)


def run_stage(stage: str, cfg: ExperimentConfig, run_dir: RunDir | str | None = None) -> Manifest:
    """Run one stage (skipped inside when up to date), holding its output folder's lease."""
    run = as_run_dir(cfg, run_dir)
    fn = stage_fn(stage)
    with run.lease(OUTPUT_DIRS[stage], stage=stage):
        return fn(cfg, run)


def stages_to_run(cfg: ExperimentConfig, run: RunDir, todo: list[str]) -> list[str]:
    """The stages of ``todo`` that will run: not up to date, or reading a stage that will."""
    states, runs = stage_states(cfg, run), []
    for stage in todo:
        if states[stage] != "done" or set(stage_inputs(stage, cfg)) & set(runs):
            runs.append(stage)
    return runs


def run_pipeline(
    cfg: ExperimentConfig,
    run_dir: RunDir | str | None = None,
    *,
    start: str | None = None,
    only: str | None = None,
) -> dict[str, Manifest]:
    """Run stages in order from ``start`` (or just ``only``); returns each stage's manifest."""
    for name, value in (("--from", start), ("--only", only)):
        if value is not None and value not in STAGES:
            raise KalmError(f"{name} {value!r}: valid stages are {', '.join(STAGES)}")
    todo = [only] if only else list(STAGES[STAGES.index(start) :] if start else STAGES)
    run = as_run_dir(cfg, run_dir)
    # `kalm plan`'s refusals of the stages that will run (not of those up to date, which are
    # skipped whatever this machine lacks), and the Ray address, before any stage starts.
    check_local(cfg, stages_to_run(cfg, run, todo))
    check_address(cfg.ray)
    done: dict[str, Manifest] = {}
    for stage in todo:
        t0 = time.perf_counter()
        # The lease comes first: a second writer is refused before any check or Ray start.
        with run.lease(OUTPUT_DIRS[stage], stage=stage):
            plan = plan_stage(stage, cfg, run)
            if plan.current is not None:
                print(
                    f"[kalm] {stage}: up to date ({run.uri_of(OUTPUT_DIRS[stage])}), skipped",
                    flush=True,
                )
                done[stage] = plan.current
                continue
            print(f"[kalm] {stage}: running", flush=True)
            done[stage] = run_stage(stage, cfg, run)
        print(f"[kalm] {stage}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return done
