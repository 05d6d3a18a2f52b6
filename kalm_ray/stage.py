"""What each stage depends on, and the plan a stage follows before doing any work.

Every ``run_<stage>(cfg, run_dir)`` starts with :func:`plan_stage`: it resolves the
run directory, checks that the inputs exist, computes the stage's fingerprint from
its config sections and its inputs' fingerprints, and says whether the stage is
already up to date (then the stage returns the existing manifest and does nothing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kalm_ray.artifacts import Manifest, RunDir, fingerprint
from kalm_ray.config import ExperimentConfig, dump_config
from kalm_ray.errors import InputError

log = logging.getLogger("kalm_ray")

STAGES: tuple[str, ...] = ("collect", "ground", "imagine", "train", "evaluate")

OUTPUT_DIRS: dict[str, str] = {
    "collect": "data/real",
    "ground": "model",
    "imagine": "data/imagined",
    "train": "policy",
    "evaluate": "eval",
}

# Upstream stages whose outputs are folders of episode Parquet files.
EPISODE_INPUTS: frozenset[str] = frozenset({"collect", "imagine"})

# Config sections whose values change a stage's output.
CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "collect": ("env", "collect", "text"),
    "ground": ("env", "ground"),
    "imagine": ("env", "ground", "imagine"),
    "train": ("env", "train"),
    "evaluate": ("env", "evaluate"),
}


def stage_inputs(stage: str, cfg: ExperimentConfig) -> tuple[str, ...]:
    """Upstream stages whose outputs ``stage`` reads under this config."""
    if stage == "collect":
        return ()
    if stage == "ground":
        return ("collect",)
    if stage == "imagine":
        return ("collect", "ground")
    if stage == "train":
        return ("collect", "imagine") if "real+imagined" in cfg.train.data else ("collect",)
    if stage == "evaluate":
        return ("train",)
    raise ValueError(stage)


def as_run_dir(cfg: ExperimentConfig, run_dir: RunDir | str | None) -> RunDir:
    if isinstance(run_dir, RunDir):
        return run_dir
    return RunDir(run_dir or cfg.run_dir)


@dataclass
class StagePlan:
    stage: str
    run: RunDir
    out_dir: str
    config_hash: str
    inputs: dict[str, str]
    fingerprint: str
    current: Manifest | None
    cfg: ExperimentConfig

    def manifest(self, **kw) -> Manifest:
        return Manifest(stage=self.stage, config_hash=self.config_hash, inputs=self.inputs,
                        fingerprint=self.fingerprint, **kw)

    def save_config(self, folder: str) -> None:
        """The resolved config, saved beside the stage's outputs."""
        self.run.write_text(dump_config(self.cfg), folder, "config.yaml")


def plan_stage(stage: str, cfg: ExperimentConfig, run_dir: RunDir | str | None) -> StagePlan:
    """Resolve inputs and fingerprint for ``stage``; raises InputError if an input is missing."""
    run = as_run_dir(cfg, run_dir)
    run.claim(cfg.name)
    inputs: dict[str, str] = {}
    for up in stage_inputs(stage, cfg):
        m = run.manifest(OUTPUT_DIRS[up])
        if m is None:
            raise InputError(
                f"stage {stage!r} needs the output of {up!r} at {run.uri_of(OUTPUT_DIRS[up])}; "
                f"run `kalm {up} CONFIG` (or `kalm run CONFIG`) first"
            )
        inputs[up] = m.output_id
    config_hash = cfg.section_hash(*CONFIG_SECTIONS[stage])
    fp = fingerprint(stage, config_hash, inputs)
    out = OUTPUT_DIRS[stage]
    current = run.is_current(out, fp)
    if current is None:
        # A truncated or foreign episode file fails here, one line naming it, before Ray
        # starts (inside a Ray Data read it would surface as a task error much later).
        from kalm_ray.data import check_parquet_files

        for up in inputs:
            if up in EPISODE_INPUTS:
                check_parquet_files(run, OUTPUT_DIRS[up])
    return StagePlan(stage=stage, run=run, out_dir=out, config_hash=config_hash, inputs=inputs,
                     fingerprint=fp, current=current, cfg=cfg)
