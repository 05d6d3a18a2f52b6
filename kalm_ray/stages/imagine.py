"""The ``imagine`` stage: the grounded LLM writes rollouts for instructions never executed.

Reads ``model/`` (the grounded model and ``codec.json``) and ``data/real/`` (start states);
writes ``data/imagined/`` (transitions in the shared schema, ``source='imagined'``, the
generator as JSON), ``filter_report.json`` (what the validity filter kept and why), the
resolved config and ``manifest.json`` last.

``run_imagine(cfg, run_dir)`` reads top to bottom:

1. plan: return at once if ``data/imagined/`` is current.
2. build: the codec (a bad model folder fails before Ray starts), the backend, the request
   table (one wording + start state + seed each), the generation spec and filter limits.
3. run (Ray Data, streaming): requests -> generation (``hf`` actor pool or ``vllm``
   processor) -> decode, validity filter and labels -> the driver, which saves each judged
   batch for a resumed run (:class:`~kalm_ray.llm.imagine.store.JudgedStore`) and writes Parquet
   parts as batches arrive.
4. save: the filter report, the config, then the manifest.

The machinery (requests, judged batches, the writer) is in :mod:`kalm_ray.llm.imagine.store`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING

import pyarrow as pa

from kalm_ray.artifacts import Manifest, RunDir, stage_output, write_manifest
from kalm_ray.data.schema import transition_schema
from kalm_ray.llm.imagine.backends import GenerationSpec, generate, resolve_backend
from kalm_ray.llm.imagine.filter import FilterLimits, FilterTally
from kalm_ray.llm.imagine.labels import judge_batch
from kalm_ray.llm.imagine.replay import Replayer, ReplayTally
from kalm_ray.llm.imagine.requests import requests_dataset, wording_shortfall
from kalm_ray.llm.imagine.store import (
    JudgedStore,
    judged_once,
    level_step_limits,
    load_codec,
    log_summary,
    max_new_tokens,
    quiet_ray_progress,
    replay_report,
    stage_requests,
    token_budget,
    write_rollouts,
)
from kalm_ray.raysetup import init_ray
from kalm_ray.stage import plan_stage, print_resuming, require_stage_resources

if TYPE_CHECKING:
    import ray.data

    from kalm_ray.config import ExperimentConfig

log = logging.getLogger("kalm_ray")


def run_imagine(cfg: ExperimentConfig, run_dir: RunDir | str | None = None) -> Manifest:
    """Imagine rollouts for ``cfg.imagine.levels``; returns the stage's manifest."""
    plan = plan_stage("imagine", cfg, run_dir)
    if plan.current is not None:
        return plan.current
    icfg, run = cfg.imagine, plan.run
    t_start = time.perf_counter()

    # ---- build: backend, codec, requests ------------------------------------------------
    codec = load_codec(run, env=cfg.env.name)  # a bad model folder fails before Ray starts
    init_ray(cfg.ray)
    # A one-line BackendUnavailable before any work; GPU nodes may still be at zero.
    backend = resolve_backend(icfg.backend, gpus_on_demand=cfg.ray.gpus_on_demand, mode=icfg.mode)
    require_stage_resources(cfg, "imagine", backend=backend)
    from kalm_ray.envs import get_suite

    suite = get_suite(cfg.env.name)
    requests, max_steps = stage_requests(cfg, run, suite, codec)
    short = wording_shortfall(
        requests, suite, max_tasks_per_level=icfg.max_tasks_per_level, seed=cfg.seed
    )
    for level, (used, total, needed) in short.items():
        print(
            f"[kalm] imagine: {level}: {icfg.rollouts_per_level} requests use {used} of its "
            f"tasks' {total} wordings (imagine.rollouts_per_level: {needed} uses each)",
            flush=True,
        )
    level_steps = level_step_limits(suite, list(icfg.levels), max_steps, compose=icfg.compose)
    limits = FilterLimits.for_suite(
        suite,
        n_bins=codec.n_bins,
        bounds_tolerance=icfg.bounds_tolerance,
        step_tolerance=icfg.step_tolerance,
    )
    spec = GenerationSpec(
        model_dir=run.uri_of("model"),
        max_new_tokens=max_new_tokens(codec, max(level_steps.values(), default=max_steps)),
        end_token=codec.end_token,
        temperature=icfg.temperature,
        top_p=icfg.top_p,
        lora_rank=cfg.ground.lora.r,
        codec_tokens=tuple(codec.all_tokens),
        grammar=icfg.grammar,
        max_steps=max_steps,
        level_max_steps=tuple(sorted(level_steps.items())),
        mode=icfg.mode,
        env=suite.name,
        candidates=icfg.candidates,
        compose=icfg.compose,
        limits=limits,
        state_retries=icfg.state_retries,
        state_temperature=icfg.state_temperature,
        action_retries=icfg.action_retries,
        consistency_draws=icfg.consistency_draws,
        consistency_min=icfg.consistency_min,
    )
    t_built = time.perf_counter()
    log.info(
        "imagine: %d requests over levels %s, backend %s, max %d steps%s (%d new tokens)%s%s",
        requests.num_rows,
        list(icfg.levels),
        backend,
        max_steps,
        f" per part (compose; per level {level_steps})" if icfg.compose else "",
        spec.max_new_tokens,
        f"; a rejected next state drawn again up to {icfg.state_retries} times"
        if icfg.state_retries
        else "",
        f"; a rejected step imagined again with a new action up to {icfg.action_retries} times"
        if icfg.action_retries
        else "",
    )

    # ---- run: generate -> filter -> label, streamed into Parquet parts --------------------
    import ray.data

    writer_meta = {
        "model": cfg.ground.model.name,
        "model_output_id": plan.inputs.get("ground"),
        "backend": backend,
        "temperature": icfg.temperature,
        "top_p": icfg.top_p,
    }
    tally = FilterTally()
    replay = ReplayTally()
    replayer = Replayer(suite) if icfg.replay_check else None

    def judged(todo: pa.Table) -> ray.data.Dataset:
        ds = requests_dataset(todo, rows_per_block=icfg.batch_size)
        return generate(ds, backend=backend, spec=spec, icfg=icfg).map_batches(
            judge_batch,
            fn_kwargs={
                "decoder": codec,
                "env": suite.name,
                "limits": limits,
                "max_steps": max_steps,
                "level_max_steps": level_steps,
            },
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=0.5,  # light numpy work beside the generation actors
            # A few worker processes keep up with generation; more only cost memory/startup.
            compute=ray.data.TaskPoolStrategy(size=max(2, icfg.max_actors)),
        )

    # The staging folder is named by the fingerprint and kept if the stage is stopped; every
    # judged batch is saved there as it arrives, so a rerun of the same config generates only
    # the requests no saved batch holds (issue 19). The backend is in its name too: under
    # `auto` a rerun elsewhere may resolve to the other one, whose sampling differs, and one
    # output must come from one backend.
    resume_key = hashlib.sha256(f"{plan.fingerprint}/{backend}".encode()).hexdigest()
    with (
        quiet_ray_progress(),
        stage_output(run, plan.out_dir, resume_key=resume_key) as tmp,
    ):
        store = JudgedStore(run, tmp)
        resumed = store.resume()
        n_resumed = sum(b.num_rows for b in resumed)
        print_resuming(
            "imagine",
            done=n_resumed,
            total=requests.num_rows,
            what="requests",
            where=run.uri_of(tmp),
            how="judged",
        )
        stats = write_rollouts(
            store.all(resumed, judged_once(judged, store.todo(requests, resumed))),
            run=run,
            folder=tmp,
            tally=tally,
            total=requests.num_rows,
            schema=transition_schema(suite.layout.dim, suite.action_space),
            env=suite.name,
            generator=writer_meta,
            keep_failures=icfg.keep_failures,
            replayer=replayer,
            replay=replay,
        )
        if replayer is not None:
            replayer.close()
        stats["resumed_rollouts"] = n_resumed
        stats["generated_rollouts"] = requests.num_rows - n_resumed
        store.clear()
        verdict_counts = tally.report()
        report = {
            "backend": backend,
            "max_steps": max_steps,
            "max_new_tokens": spec.max_new_tokens,
            **verdict_counts,
            # Tokens of a step (the task's entities set it), of the longest legal rollout,
            # and generated per rollout, per level.
            "tokens": token_budget(codec, requests, level_steps, verdict_counts),
            "throughput": stats,
            "replay": replay_report(replayer, replay),
        }
        run.write_json(report, tmp, "filter_report.json")
        plan.save_config(tmp)
    t_done = time.perf_counter()

    # ---- save: manifest -------------------------------------------------------------------
    manifest = plan.manifest(
        counts={
            "requested": report["requested"],
            "accepted": report["accepted"],
            "accepted_fraction": report["accepted_fraction"],
            "successful": report["successful"],
            "episodes": stats["episodes_written"],
            "transitions": stats["transitions_written"],
            "repaired_rollouts": report["repaired_rollouts"],
            "resumed_rollouts": stats["resumed_rollouts"],
            "generated_rollouts": stats["generated_rollouts"],
            "per_level_accepted_fraction": {
                lv: c["accepted_fraction"] for lv, c in report["per_level"].items()
            },
            "rejected": {r: n for r, n in report["reasons"].items() if n},
            "backend": backend,
        },
        timings={
            "build_s": t_built - t_start,
            "generate_filter_write_s": t_done - t_built,
            "total_s": t_done - t_start,
            "tokens_per_s": stats["tokens_per_s"],
            "rollouts_per_s": stats["rollouts_per_s"],
        },
    )
    write_manifest(run, plan.out_dir, manifest)
    log_summary(report)
    return manifest
