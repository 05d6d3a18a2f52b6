"""What each stage depends on, and the plan a stage follows before doing any work.

Every ``run_<stage>(cfg, run_dir)`` starts with :func:`plan_stage`: it resolves the
run directory, checks that the inputs exist, computes the stage's fingerprint from
its config sections and its inputs' output ids, and says whether the stage is
already up to date (then the stage returns the existing manifest and does nothing).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

from kalm_ray.artifacts import (
    Manifest,
    RunDir,
    check_stage_files,
    fingerprint,
    require_intact,
)
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


def stage_needs(
    cfg: ExperimentConfig, stage: str, *, backend: str | None = None
) -> list[tuple[str, dict[str, float]]]:
    """``(key, resources)`` of each piece of work ``stage`` must place whole on Ray: one
    collection, generation or evaluation actor, the grounding's worker group, one training
    unit. Ray queues a piece larger than it can ever have forever, so the stages check these
    when Ray is up (:func:`~kalm_ray.raysetup.require_resources`) and ``kalm run`` before the
    first stage (:func:`~kalm_ray.plan.check_local`). ``backend``: imagine's, resolved (the
    config's when None)."""
    if stage == "collect":
        return [("collect.num_cpus_per_worker", {"CPU": cfg.collect.num_cpus_per_worker})]
    if stage == "ground":
        g = cfg.ground
        gpu = 1 if g.use_gpu else 0  # Ray Train: 1 CPU a worker unless told, 1 GPU under use_gpu
        group = {"CPU": g.num_workers * (g.num_cpus_per_worker or 1), "GPU": g.num_workers * gpu}
        # ground.use_gpu first: with no GPU at all it is the key to name
        return [("ground.use_gpu", {"GPU": 1})] * gpu + [("ground.num_workers", group)]
    if stage == "imagine":
        im = cfg.imagine
        if (backend or im.backend) == "vllm":
            return []  # the engine asks for tp x pp GPUs itself; the plan checks vLLM's needs
        gpus = [("imagine.num_gpus_per_actor", {"GPU": im.num_gpus_per_actor})]
        return gpus * bool(im.num_gpus_per_actor) + [
            ("imagine.num_cpus_per_actor", {"CPU": im.num_cpus_per_actor})
        ]
    if stage == "train":
        from kalm_ray.rl.unit_pool import unit_cpus

        t = cfg.train
        out = []
        if t.num_gpus_per_learner:
            # the unit's task (a local learner) or each of its learner actors holds them
            gpus = t.num_gpus_per_learner * max(1, t.num_learners)
            out.append(("train.num_gpus_per_learner", {"GPU": gpus}))
        in_driver = t.max_concurrent_units == 1
        for algo in t.algos:
            key = (
                f"train.num_learners ({algo} in the driver: its learners and PreLearner actors)"
                if in_driver
                else f"train.num_cpus_per_unit ({algo}: with its learners and PreLearner actors)"
            )
            out.append((key, {"CPU": unit_cpus(algo, t, in_driver=in_driver)}))
        return out
    if stage == "evaluate":
        return [("evaluate.num_cpus_per_worker", {"CPU": cfg.evaluate.num_cpus_per_worker})]
    raise ValueError(f"unknown stage {stage!r}")


def require_stage_resources(
    cfg: ExperimentConfig, stage: str, *, backend: str | None = None
) -> None:
    """:func:`~kalm_ray.raysetup.require_resources` for every piece of :func:`stage_needs`."""
    from kalm_ray.raysetup import require_resources

    for key, need in stage_needs(cfg, stage, backend=backend):
        require_resources(key, need, cfg.ray)


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
        # The LLM row plays the grounded model itself: a new grounding must be evaluated again
        # even where nothing else upstream changed (train.data: [real]).
        return ("train", "ground") if cfg.evaluate.llm_policy else ("train",)
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


def stage_states(cfg: ExperimentConfig, run: RunDir) -> dict[str, str]:
    """Each stage's state in ``run`` under ``cfg``, for the summary after ``kalm run``:
    ``done`` (a rerun skips it), ``out of date`` (made under other settings or from other
    inputs: a rerun redoes it) or ``not run``. Read-only: no checks, no claim."""
    out: dict[str, str] = {}
    manifests = {stage: run.manifest(OUTPUT_DIRS[stage]) for stage in STAGES}  # each read once
    for stage, m in manifests.items():
        if m is None:
            out[stage] = "not run"
            continue
        ups = {up: manifests[up] for up in stage_inputs(stage, cfg)}
        inputs = {up: u.output_id for up, u in ups.items() if u is not None}
        fp = fingerprint(stage, cfg.section_hash(*CONFIG_SECTIONS[stage]), inputs)
        current = len(inputs) == len(ups) and m.fingerprint == fp
        out[stage] = "done" if current else "out of date (the next run redoes it)"
    return out


_damaged: set[tuple[str, str]] = set()
"""(stage output folder, output id) found damaged by this process (said once)."""


def plan_stage(stage: str, cfg: ExperimentConfig, run_dir: RunDir | str | None) -> StagePlan:
    """Resolve inputs and fingerprint for ``stage``; raises InputError if an input is missing."""
    run = as_run_dir(cfg, run_dir)
    run.claim(cfg.name, seed=cfg.seed, write=False)  # written below, once inputs pass
    inputs: dict[str, str] = {}
    upstream: dict[str, Manifest] = {}
    for up in stage_inputs(stage, cfg):
        m = run.manifest(OUTPUT_DIRS[up])
        if m is None:
            raise InputError(
                f"stage {stage!r} needs the output of {up!r} at {run.uri_of(OUTPUT_DIRS[up])}; "
                f"run `{run.command(up)}` (or `{run.command('run')}`) first"
            )
        inputs[up] = m.output_id
        upstream[up] = m
    config_hash = cfg.section_hash(*CONFIG_SECTIONS[stage])
    fp = fingerprint(stage, config_hash, inputs)
    out = OUTPUT_DIRS[stage]
    current = run.is_current(out, fp)
    # Judged once per process (`kalm run` plans the stage, then the stage plans itself); an
    # output made again has another output id, and is judged afresh.
    damaged = (run.uri_of(out), current.output_id if current is not None else "")
    if current is not None and (damaged in _damaged or not check_stage_files(run, out, current)):
        # Damaged output of this very stage: make it again (the damaged folder is moved
        # aside, not deleted) rather than skip it as up to date.
        if damaged not in _damaged:
            print(f"[kalm] {stage}: its output is damaged; running it again", file=sys.stderr)
            _damaged.add(damaged)
        current = None
    if current is None:
        # Inputs are checked before any work, before Ray starts (inside a Ray Data read a
        # damaged file would surface as a task error much later): episode files' footers
        # first (the most specific message), then every file against its manifest checksum
        # (one line naming the file and the stage to rerun).
        from kalm_ray.data import check_parquet_files

        for up in inputs:
            if up in EPISODE_INPUTS:
                check_parquet_files(run, OUTPUT_DIRS[up])
        for up, m in upstream.items():
            require_intact(run, OUTPUT_DIRS[up], m)
        if "ground" in inputs:
            check_model_config(run, OUTPUT_DIRS["ground"])
        if stage == "ground" and os.path.isdir(cfg.ground.model.name):
            check_model_config(RunDir(cfg.ground.model.name), "", where="ground.model.name: ")
    # Inputs passed: the run dir is this experiment's and seed's from now on (a command
    # refused above must not claim it, or the right seed's next command would be refused).
    run.claim(cfg.name, seed=cfg.seed)
    # A note, not an error: on stdout with the stage's progress, once the inputs passed
    # their checks (a refused command's stderr stays its one line).
    for up, m in upstream.items():
        if note := made_under_other_settings(run, stage, up, m, cfg):
            print(note, flush=True)
    return StagePlan(stage=stage, run=run, out_dir=out, config_hash=config_hash, inputs=inputs,
                     fingerprint=fp, current=current, cfg=cfg)


_said_other_settings: set[tuple[str, str]] = set()


def made_under_other_settings(
    run: RunDir, stage: str, up: str, m: Manifest, cfg: ExperimentConfig
) -> str | None:
    """One line (once per process) when the input ``up`` was made under other settings of
    the sections it depends on than ``cfg``'s, naming the keys that differ; else None.

    Why: inputs are chained by identity, not by config, so ``kalm ground CONFIG`` after an
    edit of ``collect`` uses the data already there (that is how ``--from`` reuses work);
    without a word the user would read the new settings in ``model/config.yaml`` and take
    them for the data's.
    """
    sections = CONFIG_SECTIONS[up]
    key = (run.uri, up)  # once per input: not again for each stage after it
    if m.config_hash == cfg.section_hash(*sections) or key in _said_other_settings:
        return None
    _said_other_settings.add(key)
    import yaml

    from kalm_ray.eval.compare import config_defaults, config_differences

    keys: list[str] = []
    try:
        made = yaml.safe_load(run.read_bytes(OUTPUT_DIRS[up], "config.yaml"))
        now = yaml.safe_load(dump_config(cfg))
        keys = [
            k
            for k in config_differences([made, now], config_defaults(now))
            if k.split(".")[0] in sections
            # sizing keys (workers, CPUs) change no output and no fingerprint
            and k.split(".")[1] not in getattr(cfg, k.split(".")[0])._placement_only
        ]
    except Exception:  # noqa: BLE001 - a note: whatever the config beside it holds (none, null
        pass  # sections, an older schema), the line says less, never stops the stage
    shown = f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""
    return (
        f"[kalm] {stage}: {run.uri_of(OUTPUT_DIRS[up])} was made under other "
        f"{'/'.join(sections)} settings than this config's{shown}; used as it is "
        f"(`{run.command('run', '--from', up)}` makes it again)"
    )


def print_resuming(
    stage: str, *, done: int, total: int, what: str, where: str, how: str = "finished"
) -> None:
    """The one line a stage prints when it takes back the work a stopped run of the same
    config left in its staging folder ``where`` (issue 19); nothing when there is none."""
    if done:
        print(
            f"[kalm] {stage}: resuming; {done} of {total} {what} already {how} in {where}",
            flush=True,
        )


def check_model_config(run: RunDir, folder: str, *, where: str = "") -> None:
    """A model folder's ``config.json`` (and a LoRA ``adapter_config.json``), when there, must
    be a JSON object; checked before Ray starts (transformers would fail later, at length)."""
    # Absent files are left to the stage's own, more specific, messages.
    for name in [n for n in ("config.json", "adapter_config.json") if run.exists(folder, n)]:
        try:
            obj = json.loads(run.read_bytes(folder, name))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = f"{e.msg}, line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not text"
            raise InputError(f"{where}{run.uri_of(folder, name)}: corrupt JSON ({why})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}{run.uri_of(folder, name)}: not a JSON object")
