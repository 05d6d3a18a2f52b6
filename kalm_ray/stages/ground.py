"""The ``ground`` stage: fine-tune a causal LM on the four grounding tasks, with Ray Train.

Reads ``data/real/`` (the real episodes) and ``cfg.ground`` (base model, method, steps);
writes ``model/``: the final model (merged weights, ``adapter/`` for LoRA, tokenizer),
``codec.json``, ``grounding_metrics.json`` (held-out metrics), the resolved config and
``manifest.json`` last.

``run_ground(cfg, run_dir)`` reads top to bottom:

1. plan: return at once if ``model/`` is current.
2. build (driver, into the work folder ``model.work/<fingerprint>/``, which survives a
   crash so training resumes): the codec, the tokenizer (codec tokens made atomic), and
   for ``tiny`` the base model; then the examples of the four tasks with Ray Data
   (``data/real/`` grouped by episode -> token ids, split by episode) as Parquet, plus the
   held-out episodes' transitions for the metrics.
3. run: a ``TorchTrainer`` over :func:`kalm_ray.llm.ground.train_fn.train_loop` (ScalingConfig from
   ``ground.num_workers``/``use_gpu``); checkpoints go to the work folder and a rerun
   after a crash resumes from the latest (``ray.train.get_checkpoint``). Rank 0 saves the
   final model and scores it on the held-out split.
4. save: the final model into ``model/`` atomically, the config, then the manifest; the
   work folder is removed.

The machinery (preparation, examples, the trainer) is in :mod:`kalm_ray.llm.ground.fit`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.fs as pafs

from kalm_ray.artifacts import Manifest, RunDir, stage_output, write_manifest
from kalm_ray.config import ExperimentConfig
from kalm_ray.envs import get_suite
from kalm_ray.errors import InputError
from kalm_ray.llm.codec import CODEC_FILE
from kalm_ray.llm.ground.fit import build_examples, fit, prepare_shared, print_summary
from kalm_ray.raysetup import init_ray
from kalm_ray.stage import plan_stage, require_stage_resources


def run_ground(cfg: ExperimentConfig, run_dir: RunDir | str | None = None) -> Manifest:
    """Ground ``cfg.ground.model`` on ``data/real/`` into ``model/`` (see the module docstring)."""
    plan = plan_stage("ground", cfg, run_dir)
    run, g = plan.run, cfg.ground
    if plan.current is not None:
        print(f"[kalm] ground: {run.uri_of(plan.out_dir)} is up to date; nothing to do", flush=True)
        return plan.current
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    suite = get_suite(cfg.env.name)
    work = f"{plan.out_dir}.work/{plan.fingerprint[:12]}"

    # ---- build: codec, tokenizer, base; examples with Ray Data ----------------------------------
    prep = prepare_shared(cfg, suite, run, work)
    timings["prepare_s"] = time.perf_counter() - t0
    init_ray(cfg.ray)
    require_stage_resources(cfg, "ground")
    t1 = time.perf_counter()
    counts = build_examples(cfg, run, work, prep)
    timings["examples_s"] = time.perf_counter() - t1
    print(
        f"[kalm] ground: {counts['examples_train']} training examples from "
        f"{counts['episodes_train']} episodes"
        f"{f' and {g.relabel_copies} relabelled copies of each' if g.relabel_copies else ''} "
        f"({counts['episodes_heldout']} held out); "
        f"training {g.model.name} ({g.method}) for {g.max_steps} steps on {g.num_workers} "
        f"worker(s)",
        flush=True,
    )

    # ---- run: Ray Train ------------------------------------------------------------------
    t2 = time.perf_counter()
    result = fit(cfg, run, work, prep)
    timings["train_s"] = time.perf_counter() - t2

    # ---- save ---------------------------------------------------------------------------------
    with stage_output(run, plan.out_dir) as tmp, result.checkpoint.as_directory() as d:
        final = Path(d) / "final"
        if not (final / CODEC_FILE).exists():
            raise InputError(f"{result.checkpoint.path}: the last checkpoint holds no final model")
        pafs.copy_files(
            str(final),
            run.path(tmp),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=run.fs,
        )
        plan.save_config(tmp)
        metrics = (
            json.loads((final / "grounding_metrics.json").read_text())
            if (final / "grounding_metrics.json").exists()
            else {}
        )
    timings["total_s"] = time.perf_counter() - t0
    shares = {
        k.removeprefix("time_share_"): v
        for k, v in result.metrics.items()
        if k.startswith("time_share_")
    }
    counts.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
    counts.update(
        {
            "params": prep["params"],
            "max_steps": g.max_steps,
            "final_loss": result.metrics.get("loss"),
            "tokens_per_s": result.metrics.get("tokens_per_s"),
            **{
                f"final_{k}": v
                for k, v in result.metrics.items()
                if k.startswith("loss_") and isinstance(v, float)
            },
            **{f"time_share_{t}": v for t, v in shares.items()},
        }
    )
    manifest = plan.manifest(counts=counts, timings=timings)
    write_manifest(run, plan.out_dir, manifest)
    run.delete(f"{plan.out_dir}.work")
    print_summary(metrics, timings, time_shares=shares)
    return manifest
