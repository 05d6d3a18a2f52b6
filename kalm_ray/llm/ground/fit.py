"""Machinery of the ``ground`` stage (:mod:`kalm_ray.stages.ground`): the codec, tokenizer
and (``tiny``) base model prepared in the work folder (:func:`prepare_shared`), the grounding
examples built with Ray Data (:func:`build_examples`), and the Ray Train run over
:func:`kalm_ray.llm.ground.train_fn.train_loop` that resumes from its latest checkpoint
(:func:`fit`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from kalm_ray.artifacts import RunDir
from kalm_ray.config import ExperimentConfig
from kalm_ray.errors import InputError
from kalm_ray.llm.codec import Codec

PREP_DONE = "prep.done"


def _local(run: RunDir, *parts: str) -> Path:
    """A local folder for work files: inside the run dir when local, else a temp dir (which
    :func:`prepare_shared` uploads to the run dir: workers never read the driver's disk)."""
    if run.is_local:
        return Path(run.path(*parts))
    return Path(tempfile.mkdtemp(prefix="kalm-ground-"))


def prepare_shared(cfg: ExperimentConfig, suite: Any, run: RunDir, work: str) -> dict[str, Any]:
    """:func:`_prepare`, with every path in the result readable from any node.

    A local run dir is one every node mounts (``kalm submit`` refuses it otherwise), so its
    paths serve as they are. With a remote run dir (``s3://``...) the prepared folder is
    built in a driver temp dir, uploaded to ``work/prep`` and its paths become URIs; the
    workers download what they need (:func:`kalm_ray.localcopy.local_copy`).
    """
    if run.is_local:
        return _prepare(cfg, suite, run, work)
    if run.exists(work, "prep", PREP_DONE):
        return run.read_json(work, "prep", PREP_DONE)
    prep = _prepare(cfg, suite, run, work)
    local = Path(prep["codec_path"]).parent
    run.delete(work, "prep")
    pafs.copy_files(
        str(local),
        run.path(work, "prep"),
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=run.fs,
    )
    for key in ("base", "tokenizer_dir", "codec_path"):
        p = Path(str(prep[key]))
        if p.is_absolute() and p.is_relative_to(local):
            prep[key] = run.uri_of(work, "prep", *p.relative_to(local).parts)
    run.write_json(prep, work, "prep", PREP_DONE)  # last: its presence means prep is complete
    shutil.rmtree(local, ignore_errors=True)
    return prep


def _prepare(cfg: ExperimentConfig, suite: Any, run: RunDir, work: str) -> dict[str, Any]:
    """Codec, tokenizer and (tiny) base model in ``work/prep``; reused when already complete.

    Returns paths and facts the train loop needs (``base``, ``tokenizer_dir``, ``codec_path``,
    ``init_codec_rows``, ``info``, ``params``).
    """
    g = cfg.ground
    name = g.model.name
    # A local path that is not there would reach the Hub as a malformed repo id (a confusing
    # message); say what it is, before any work folder is made.
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise InputError(f"ground.model.name: no such model folder {name!r}")
    prep = _local(run, work, "prep")
    done = prep / PREP_DONE
    if done.exists():
        return json.loads(done.read_text())
    prep.mkdir(parents=True, exist_ok=True)
    tiny = g.model.name == "tiny"
    if tiny:
        from kalm_ray.llm.model import build_tiny, count_params, vocabulary_texts

        codec = Codec.for_suite(suite, g.n_bins, state_coding=g.state_coding)
        texts = vocabulary_texts(suite, g.tiny_vocabulary)
        model, tok = build_tiny(
            codec,
            texts,
            init_from_encoder=g.tiny_init_from_encoder,
            seed=cfg.seed,
            overrides=dict(g.model.tiny),
        )
        model.save_pretrained(str(prep / "base"))
        tok.save_pretrained(str(prep / "base"))
        base, tok_dir, init_rows, params = (
            str(prep / "base"),
            str(prep / "base"),
            False,
            count_params(model),
        )
        servable = g.method == "lora" and not g.train_codec_embeddings
        info_base = "base"
    else:
        from transformers import AutoConfig, AutoTokenizer

        from kalm_ray.llm.model import make_codec_tokens_atomic

        try:
            tok = AutoTokenizer.from_pretrained(
                g.model.name, trust_remote_code=g.model.trust_remote_code
            )
            mcfg = AutoConfig.from_pretrained(
                g.model.name, trust_remote_code=g.model.trust_remote_code
            )
        except (OSError, ValueError) as e:
            # transformers raises ValueError (multi-line) for a folder with no tokenizer files.
            why = " ".join(str(e).split())[:300]
            raise InputError(f"ground.model.name: cannot load {g.model.name!r} ({why})") from None
        codec = Codec.for_suite(suite, g.n_bins, vocab=tok.get_vocab(), state_coding=g.state_coding)
        make_codec_tokens_atomic(tok, codec)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(str(prep / "tokenizer"))
        base, tok_dir = g.model.name, str(prep / "tokenizer")
        untouched = (
            codec.token_source == "reserved" and g.method == "lora" and not g.train_codec_embeddings
        )
        init_rows, servable, info_base = not untouched, untouched, g.model.name
        params = int(getattr(mcfg, "num_parameters", 0) or 0)
    codec_path = str(codec.save(prep))
    info = {
        "method": g.method,
        "model": g.model.name,
        "base": info_base,
        "adapter_servable": servable,
        "codec_token_source": codec.token_source,
    }
    out = {
        "base": base,
        "tokenizer_dir": tok_dir,
        "codec_path": codec_path,
        "init_codec_rows": init_rows,
        "info": info,
        "params": params,
    }
    done.write_text(json.dumps(out))
    return out


def check_relabel_wordings(run: RunDir, copies: int) -> None:
    """Before any Ray work: ``ground.relabel_copies`` maps each episode's wording to the same
    template's wording of the renamed goal, so every real episode must carry one of its
    task's current training wordings (data collected before the wordings file changed may
    not)."""
    import pyarrow.dataset as pads

    from kalm_ray.data import episode_files
    from kalm_ray.envs.clevr.wordings import instructions

    table = pads.dataset(
        episode_files(run, "data/real"), format="parquet", filesystem=run.fs
    ).to_table(columns=["task", "instruction"])
    for task, text in sorted(set(zip(*table.to_pydict().values(), strict=True))):
        if text not in instructions("train", task):
            raise InputError(
                f"ground.relabel_copies: {copies}: the real episodes of {task!r} carry the "
                f"wording {text!r}, which is not one of its training wordings now; collect "
                "again, or set ground.relabel_copies: 0"
            )


def build_examples(
    cfg: ExperimentConfig, run: RunDir, work: str, prep: dict[str, Any]
) -> dict[str, Any]:
    """Examples (token ids) and held-out transitions with Ray Data; returns counts."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import ray.data

    from kalm_ray.data import episode_files
    from kalm_ray.llm.prompts import ExampleBuilder, is_heldout, source_episode

    g = cfg.ground
    ex_uri, held_uri = run.uri_of(work, "examples"), run.uri_of(work, "heldout_real")
    seen_uri, sample_uri = run.uri_of(work, "seen_starts"), run.uri_of(work, "seen_real")
    if not run.exists(work, "examples.done"):
        if not run.exists("data", "real"):
            raise InputError(
                f"{run.uri_of('data', 'real')}: no real episodes; run `{run.command('collect')}` "
                "first"
            )
        if g.lookahead_pushes and not all(
            "lookahead" in pq.read_schema(p, filesystem=run.fs).names
            for p in episode_files(run, "data/real")
        ):
            raise InputError(
                f"ground.lookahead_pushes: {run.uri_of('data', 'real')} has no lookahead "
                "column; collect again with collect.lookahead: true"
            )
        if g.relabel_copies:
            check_relabel_wordings(run, g.relabel_copies)
        for part in ("examples", "heldout_real", "seen_starts", "seen_real"):
            run.delete(work, part)
        real = ray.data.read_parquet(run.uri_of("data", "real"), file_extensions=["parquet"])
        # A hash shuffle's default partition count spawns dozens of tasks; small data needs one.
        parts = max(1, min(64, real.count() // 50_000 + 1))
        examples = real.groupby("episode_id", num_partitions=parts).map_groups(
            ExampleBuilder,
            batch_format="pyarrow",
            # Up to 2 builder actors, scaled to the groups there are (one partition: one actor).
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
            fn_constructor_kwargs={
                "codec_path": prep["codec_path"],
                "tokenizer_dir": prep["tokenizer_dir"],
                "max_seq_len": g.max_seq_len,
                "rollout_starts": g.rollout_starts,
                "lookahead_pushes": g.lookahead_pushes,
                "heldout_fraction": g.heldout_fraction,
                "relabel_copies": g.relabel_copies,
                "seed": cfg.seed,
            },
        )
        examples.write_parquet(ex_uri)

        def split(batch: Any, *, part: str) -> Any:
            import numpy as np

            ids = batch.column("episode_id").to_pylist()
            held = np.array([is_heldout(e, g.heldout_fraction, cfg.seed) for e in ids], bool)
            if part == "heldout_real":
                return batch.filter(held)
            if part == "seen_starts":  # the training episodes' first rows: the policy's starts
                return batch.filter(~held & (batch.column("t").to_numpy() == 0))
            # seen_real: whole training episodes, a sample about the held-out split's size
            # (another stream of the same hash), for the action NLL on states it trained on
            sample = np.array([is_heldout(e, g.heldout_fraction, cfg.seed + 1) for e in ids])
            return batch.filter(~held & sample)

        for part, uri in (
            ("heldout_real", held_uri),
            ("seen_starts", seen_uri),
            ("seen_real", sample_uri),
        ):
            real.map_batches(split, fn_kwargs={"part": part}, batch_format="pyarrow").write_parquet(
                uri
            )
        run.write_text("ok", work, "examples.done")
    meta = pads.dataset(run.path(work, "examples"), format="parquet", filesystem=run.fs).to_table(
        columns=["episode_id", "task", "split", "dropped"]
    )
    split = meta.column("split").to_pylist()
    episode = meta.column("episode_id").to_pylist()
    by = Counter(zip(split, meta.column("task").to_pylist(), strict=True))
    eps = {  # relabelled copies count as their source episode
        s: len({source_episode(e) for e, sp in zip(episode, split, strict=True) if sp == s})
        for s in ("train", "heldout")
    }
    counts: dict[str, Any] = {
        f"examples_{s}_{t}": n for (s, t), n in sorted(by.items()) if t != "dropped"
    }
    counts["examples_train"] = sum(n for (s, t), n in by.items() if s == "train" and t != "dropped")
    counts["examples_dropped_too_long"] = int(sum(meta.column("dropped").to_pylist()))
    counts["episodes_train"], counts["episodes_heldout"] = eps["train"], eps["heldout"]
    return counts


def train_config(
    cfg: ExperimentConfig, run: RunDir, work: str, prep: dict[str, Any]
) -> dict[str, Any]:
    """The ``train_loop_config`` of the grounding run (see :mod:`kalm_ray.llm.ground.train_fn`)."""
    g = cfg.ground
    return {
        "base": prep["base"],
        "tokenizer_dir": prep["tokenizer_dir"],
        "codec_path": prep["codec_path"],
        "examples": run.uri_of(work, "examples"),
        "method": g.method,
        "lora": g.lora.model_dump(),
        "train_codec_embeddings": g.train_codec_embeddings,
        "init_codec_rows": prep["init_codec_rows"],
        "trust_remote_code": g.model.trust_remote_code,
        "max_steps": g.max_steps,
        "batch_size": g.batch_size,
        "lr": g.lr,
        "lr_decay_fraction": g.lr_decay_fraction,
        "weight_decay": g.weight_decay,
        "task_mix": dict(g.task_mix),
        "action_loss_weight": g.action_loss_weight,
        "seed": cfg.seed,
        "checkpoint_every": g.checkpoint_every,
        "score_every": g.score_every,
        "use_gpu": g.use_gpu,
        # Each worker sets its threads from the CPUs Ray gives it, not from this machine's.
        "cpu_threads": None,
        "gradient_checkpointing": g.gradient_checkpointing,
        "info": prep["info"],
        "metrics": {
            "env": cfg.env.name,
            "heldout_real": run.uri_of(work, "heldout_real"),
            "seen_starts": run.uri_of(work, "seen_starts"),
            "seen_real": run.uri_of(work, "seen_real"),
            "max_examples": g.eval_examples,
            "max_rollouts": g.eval_rollouts,
            "seed": cfg.seed,
        },
    }


def fit(cfg: ExperimentConfig, run: RunDir, work: str, prep: dict[str, Any]) -> Any:
    """Run the TorchTrainer; a rerun with the same work folder resumes from its checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kalm_ray.llm.ground.train_fn import train_loop
    from kalm_ray.progress import show_progress

    g = cfg.ground
    # The workers' output does not reach this console: rank 0 posts its progress to a board
    # that this process shows as a bar while fit() blocks.
    with show_progress("ground", total=g.max_steps, unit="step") as board:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={**train_config(cfg, run, work, prep), "progress_actor": board},
            scaling_config=ScalingConfig(
                num_workers=g.num_workers,
                use_gpu=g.use_gpu,
                resources_per_worker=(
                    None
                    if g.num_cpus_per_worker is None
                    else {"CPU": g.num_cpus_per_worker, **({"GPU": 1} if g.use_gpu else {})}
                ),
            ),
            run_config=RunConfig(
                name="train",
                storage_path=run.uri_of(work, "ray"),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=1),
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise InputError(f"{run.uri_of(work, 'ray')}: training reported no checkpoint")
    return result


MEMORISING_GAP = 0.25
"""Action NLL (nats) by which the states a model trained on must beat held-out ones for
:func:`acting_note` to call it memorising. Measured on the quick budget, seed 0: 1.14 where
it memorises the collected episodes (2.21 against 3.35), under 0.1 with 16 relabelled
copies (2.85 against 2.94, 3,300 steps), where it fits neither any better."""


def factor_note(m: dict[str, Any], prefix: str = "") -> str:
    """``"; by part: ball 0.93 (uniform 1.61), then direction 2.04 (uniform 2.08)"``: the
    action NLL's parts (:func:`kalm_ray.llm.ground.metrics.action_metrics`), or ``""``;
    ``prefix="seen_"`` for the states the model trained on."""
    key = prefix + "policy_action_uniform_nll_"
    names = [k.removeprefix(key) for k in m if k.startswith(key)]
    parts = [
        f"{n} {m[prefix + 'policy_action_nll_' + n]:.2f} (uniform {m[key + n]:.2f})" for n in names
    ]
    return "; by part: " + ", then ".join(parts) if parts else ""


def policy_line(m: dict[str, Any]) -> str:
    """Success from held-out and from seen starts, with the goals' own and rephrased wordings."""
    parts = []
    for prefix, starts in (("policy", "held-out"), ("policy_seen", "training")):
        if f"{prefix}_llm_success" not in m:
            continue
        reworded = m.get(f"{prefix}_llm_rephrase_success")
        parts.append(
            f"{m[prefix + '_llm_success']:.2f} from {m[prefix + '_n']} {starts} starts"
            + (f" ({reworded:.2f} rephrased)" if reworded is not None else "")
            + f" vs random {m[prefix + '_random_success']:.2f}"
        )
    return "; ".join(parts)


def acting_note(m: dict[str, Any]) -> str | None:
    """A warning when the LLM reaches its goals from held-out starts no more often than random
    actions do, else None.

    Why: imagination rests on an LLM that acts. One that does not writes rollouts that reach
    their goals by chance, and teaching them under novel wordings costs a policy there
    (the quick preset, whose LLM acts below random on four master seeds: BC on rephrase
    -6.6 pp over them, the interval below 0; docs/results.md).

    The actions' NLL on states it trained on (``seen_policy_action_nll``) against held-out
    ones says which way it failed: memorised the training states' actions
    (:data:`MEMORISING_GAP`), or fits them no better than unseen ones (it may still have
    learnt something general, e.g. which ball to push: see the NLL's parts).
    """
    llm, rnd = m.get("policy_llm_success"), m.get("policy_random_success")
    if llm is None or rnd is None or llm > rnd:
        return None
    held, seen = m.get("policy_action_nll"), m.get("seen_policy_action_nll")
    how = ""
    if held is not None and seen is not None:
        how = (
            f"; it has memorised the actions of the states it trained on (NLL {seen:.2f} "
            f"there, {held:.2f} on held-out ones)"
            if held - seen > MEMORISING_GAP
            else f"; it fits the actions of the states it trained on no better than held-out "
            f"ones (NLL {seen:.2f} there, {held:.2f} held out)"
        )
    return (
        f"the LLM as a policy ({llm:.2f}) is not ahead of random actions ({rnd:.2f}): it has "
        f"not learnt to act{how}. Its imagined rollouts reach their goals by chance and can "
        "cost the policies on novel instructions (CLEVR: configs/cpu.yaml grounds 6x as long "
        "and acts)"
    )


def curve_line(curve: list[dict[str, float]]) -> str:
    """``"held-out action NLL by step (direction): 1000 3.10 (2.07), 2000 ..."``: the scores
    taken during training (``ground.score_every``), with the last part of the action."""
    key = "policy_action_nll_"
    parts = [k.removeprefix(key) for k in curve[0] if k.startswith(key)]
    last = parts[-1] if parts else None
    return f"held-out action NLL by step{f' ({last})' if last else ''}: " + ", ".join(
        f"{int(c['step'])} {c['policy_action_nll']:.2f}"
        + (f" ({c[key + last]:.2f})" if last else "")
        for c in curve
    )


def print_summary(
    m: dict[str, Any], timings: dict[str, float], *, time_shares: dict[str, float] | None = None
) -> None:
    """The stage's closing lines: held-out metrics, timings and each task's share of them."""
    if "dynamics_mae" in m:
        print(
            f"[kalm] ground: held-out dynamics MAE {m['dynamics_mae']:.4f} vs copy-the-state "
            f"{m['copy_baseline_mae']:.4f}"
            + (
                f" (the filter rejects {m['dynamics_rejected']:.2f} of its one-step predictions, "
                f"{m['dynamics_rejected_real']:.2f} of the real ones)"
                if "dynamics_rejected" in m
                else ""
            )
            + "; explanation exact "
            f"{m.get('explain_exact_match', 0):.2f}, "
            f"token acc {m.get('explain_token_accuracy', 0):.2f}; rollouts decode "
            f"{m.get('rollout_decoded', 0):.2f}, reach goal {m.get('rollout_success', 0):.2f}",
            flush=True,
        )
    if m.get("policy_n"):
        print(f"[kalm] ground: LLM as policy on train-level goals: {policy_line(m)}", flush=True)
        if note := acting_note(m):
            print(f"[kalm] ground: warning: {note}", flush=True)
    if "policy_action_nll" in m:
        print(
            f"[kalm] ground: demonstrator's actions on {m['policy_action_n']} held-out states: "
            f"NLL {m['policy_action_nll']:.2f} (uniform {m['policy_action_uniform_nll']:.2f}), "
            f"the model's first choice {m['policy_action_match']:.2f}" + factor_note(m),
            flush=True,
        )
    if "seen_policy_action_nll" in m:
        print(
            f"[kalm] ground: and on {m['seen_policy_action_n']} states it trained on: NLL "
            f"{m['seen_policy_action_nll']:.2f}, first choice {m['seen_policy_action_match']:.2f}"
            + factor_note(m, "seen_"),
            flush=True,
        )
    if m.get("curve"):
        print(f"[kalm] ground: {curve_line(m['curve'])}", flush=True)
    by_task = ", ".join(
        f"{t} {v:.0%}" for t, v in sorted((time_shares or {}).items(), key=lambda kv: -kv[1])
    )
    print(
        f"[kalm] ground: done in {timings['total_s']:.0f}s (train {timings['train_s']:.0f}s"
        + (f"; by task: {by_task}" if by_task else "")
        + ")",
        flush=True,
    )
