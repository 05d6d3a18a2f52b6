"""The per-worker grounding loop: a plain torch loop that runs in Ray Train or on its own.

``train_loop(config)`` is the ``train_loop_per_worker`` of a ``TorchTrainer`` and also a plain
function: inside Ray Train (``ray`` importable and a train context active) it shards the
examples by rank, wraps the model in DDP, reports checkpoints with ``ray.train.report`` and
resumes from ``ray.train.get_checkpoint()``; outside it trains in-process, checkpoints into
``config["checkpoint_dir"]`` and resumes from the newest one there. A plain loop (not the HF
Trainer) because it reads its shard straight from the Parquet examples written by the
ground stage (no Ray Data needed), puts the loss on target tokens only without computing
the output layer at prompt positions, and must run unchanged on a GPU box without Ray.

``config`` keys (all JSON-able):

- ``base``: model to start from (local dir, run-dir URI or hub name); ``tokenizer_dir``;
  ``codec_path`` (local paths or URIs: a URI is downloaded to this node first, see
  :mod:`kalm_ray.localcopy`, so workers never need the driver's disk);
- ``examples``: folder of example Parquet files, local or a URI (columns ``episode_id, task,
  input_ids, prompt_len, split``; rows with ``split == "train"`` are used);
- ``method`` (``lora``/``full``), ``lora`` (r, alpha, dropout, target_modules),
  ``train_codec_embeddings``, ``init_codec_rows``, ``trust_remote_code``;
- ``max_steps``, ``batch_size``, ``lr``, ``lr_decay_fraction`` (1.0 when absent), ``weight_decay``,
  ``task_mix``, ``seed``, ``checkpoint_every``, ``score_every`` (0 = off: see
  :func:`heldout_scorer`), ``use_gpu``, ``gradient_checkpointing`` (None = on GPU),
  ``cpu_threads`` (None = the CPUs Ray gave this worker, or outside Ray cores / workers);
- ``checkpoint_dir`` (outside Ray), ``output_dir`` (outside Ray: where the final model goes);
- ``info``: written to ``grounded.json`` beside the final model;
- ``progress_actor``: None, or the name of a
  :class:`kalm_ray.progress.ProgressBoard` that rank 0 posts
  ``step``/``loss``/``tokens_per_s`` to (the driver's progress bar);
- ``metrics``: None, or keyword arguments of :func:`kalm_ray.llm.ground.metrics.grounding_metrics`
  plus ``env``, ``heldout_real`` (Parquet of held-out transitions) and optionally
  ``seen_starts`` (training episodes' first rows, for the policy's seen starts) and
  ``seen_real`` (a sample of whole training episodes, for the action NLL on seen states);
  computed on rank 0 after training and written as ``grounding_metrics.json`` beside the model, with
  the ``curve`` of held-out scores taken every ``score_every`` steps.

The final model (merged full weights, ``adapter/`` for LoRA, tokenizer, ``codec.json``,
``generation_config.json``) is written by rank 0 into the last checkpoint's ``final/``
folder (Ray) or into ``output_dir``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kalm_ray.llm.prompts import IGNORE
from kalm_ray.progress import ProgressPoster

log = logging.getLogger("kalm_ray")

STATE_FILE = "train_state.pt"
FINAL_DIR = "final"


def ray_train_context() -> Any | None:
    """The Ray Train context when running as a Ray Train worker, else None."""
    try:
        import ray.train
    except ImportError:
        return None
    try:
        return ray.train.get_context()
    except (RuntimeError, AttributeError):
        return None


def batch_collator(tokenizer: Any) -> Any:
    """``rows -> batch``: ``rows`` are ``(input_ids, prompt_len)`` pairs; the batch holds
    right-padded ``input_ids``/``attention_mask``/``labels`` int64 tensors ``(B, L_max)``.

    Labels are ``-100`` on each prompt and on padding, so the loss sees targets only. The
    padding is transformers' ``DataCollatorForSeq2Seq`` on a right-padding copy of the
    tokenizer: Llama takes positions from the index, not the mask, so a left-padded batch
    (the generation tokenizers' side) would shift every position.
    """
    import copy

    from transformers import DataCollatorForSeq2Seq

    tok = copy.copy(tokenizer)
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    collate = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE, return_tensors="pt")

    def batch(rows: list[tuple[np.ndarray, int]]) -> dict[str, Any]:
        feats = [
            {"input_ids": x.tolist(), "labels": [IGNORE] * plen + x[plen:].tolist()}
            for x, plen in rows
        ]
        return {k: v.long() for k, v in collate(feats).items()}

    return batch


def param_groups(params: list[Any], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: ``weight_decay`` on the weight matrices (embeddings included,
    as GPT-2 does), never on the norms' scales. Without decay, one group, so that the
    optimizer state of checkpoints written before decay existed still loads."""
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def lr_schedule(
    opt: Any, *, peak: float, total: int, start: int = 0, decay_fraction: float = 1.0
) -> Any:
    """Linear warm-up over ``min(50, total / 20)`` steps, then cosine decay to 10% of ``peak``
    over the last ``decay_fraction`` of the remaining steps, holding ``peak`` before it
    (transformers' schedules); on a resume it starts at step ``start``.

    ``decay_fraction`` 1.0 is transformers' cosine-with-minimum, the schedule every grounding
    before the option had (its warm-up starts at 0); below 1 it is transformers'
    warmup-stable-decay, whose warm-up starts at 10% of ``peak`` (its minimum).
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule

    for g in opt.param_groups:
        g.setdefault("initial_lr", peak)
    warmup = max(1, min(50, total // 20))
    if decay_fraction >= 1.0:
        return get_cosine_with_min_lr_schedule_with_warmup(
            opt,
            num_warmup_steps=warmup,
            num_training_steps=total,
            min_lr_rate=0.1,
            last_epoch=start - 1,
        )
    decay = max(1, round((total - warmup) * decay_fraction))
    return get_wsd_schedule(
        opt,
        num_warmup_steps=warmup,
        num_stable_steps=max(0, total - warmup - decay),
        num_decay_steps=decay,
        min_lr_ratio=0.1,
        last_epoch=start - 1,
    )


def read_examples(path: str) -> tuple[list[str], list[str], list[list[int]], list[int]]:
    """``(episode_id, task, input_ids, prompt_len)`` lists of the training split of a folder,
    in a canonical order (see :func:`_canonical`).

    The folder holds Parquet files (the ground stage) or JSONL files (one example object per
    line; no pyarrow needed), with columns ``episode_id, task, input_ids, prompt_len, split``.
    """
    return _canonical(*_read_examples(path))


def _canonical(
    eps: list[str], tasks: list[str], ids: list[list[int]], plen: list[int]
) -> tuple[list[str], list[str], list[list[int]], list[int]]:
    """The examples sorted by (episode, task, prompt length, tokens).

    The ground stage writes examples with Ray Data, whose row and file order follow task
    completion; batches are drawn by position, so without a canonical order the same config
    and seed would train on different batches from run to run (and a resumed run would not
    match an uninterrupted one). Equal keys are equal examples, so ties cannot matter.
    """
    order = sorted(range(len(eps)), key=lambda i: (eps[i], tasks[i], plen[i], ids[i]))
    return (
        [eps[i] for i in order],
        [tasks[i] for i in order],
        [ids[i] for i in order],
        [plen[i] for i in order],
    )


def _read_examples(path: str) -> tuple[list[str], list[str], list[list[int]], list[int]]:
    local = Path(path) if "://" not in path else None
    if local is not None and local.is_dir() and any(local.glob("*.jsonl")):
        rows = [
            json.loads(line)
            for f in sorted(local.glob("*.jsonl"))
            for line in f.read_text().splitlines()
            if line.strip()
        ]
        rows = [r for r in rows if r.get("split", "train") == "train" and r["task"] != "dropped"]
        return (
            [r["episode_id"] for r in rows],
            [r["task"] for r in rows],
            [r["input_ids"] for r in rows],
            [int(r["prompt_len"]) for r in rows],
        )
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from kalm_ray.localcopy import filesystem_of

    fs, where = filesystem_of(path) if "://" in path else (None, path)
    table = pads.dataset(where, format="parquet", filesystem=fs).to_table(
        columns=["episode_id", "task", "input_ids", "prompt_len", "split"],
        filter=(pc.field("split") == "train") & (pc.field("task") != "dropped"),
    )
    return (
        table.column("episode_id").to_pylist(),
        table.column("task").to_pylist(),
        table.column("input_ids").to_pylist(),
        table.column("prompt_len").to_pylist(),
    )


class ExamplePool:
    """A worker's shard of the training examples, sampled task by task.

    Each step draws one task by ``task_mix`` weight (tasks without examples are left out,
    the others renormalised), then ``batch_size`` of its examples; one task per batch keeps
    lengths alike and padding low. Sampling depends only on (seed, rank, step), so a
    resumed run draws what the crashed one would have.
    """

    def __init__(self, path: str, *, rank: int, world: int, task_mix: dict[str, float], seed: int):
        eps, tasks, ids, plen = read_examples(path)
        mine = [i for i, e in enumerate(eps) if zlib.crc32(e.encode()) % world == rank]
        if not mine:  # fewer episodes than workers: share everything rather than train on nothing
            mine = list(range(len(eps)))
        self.rows = {i: (np.asarray(ids[i], np.int64), int(plen[i])) for i in mine}
        by_task: dict[str, list[int]] = {}
        for i in mine:
            by_task.setdefault(tasks[i], []).append(i)
        self.tasks = [t for t in task_mix if by_task.get(t) and task_mix[t] > 0]
        if not self.tasks:
            raise ValueError(f"{path}: no training examples for tasks {sorted(task_mix)}")
        w = np.asarray([task_mix[t] for t in self.tasks], np.float64)
        self.weights = w / w.sum()
        self.by_task = {t: np.asarray(by_task[t]) for t in self.tasks}
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int, batch_size: int) -> tuple[str, list[tuple[np.ndarray, int]]]:
        rng = np.random.default_rng([self.seed, self.rank, step])
        task = self.tasks[rng.choice(len(self.tasks), p=self.weights)]
        pool = self.by_task[task]
        pick = rng.choice(pool, size=batch_size, replace=len(pool) < batch_size)
        return task, [self.rows[int(i)] for i in pick]


def _target_loss_module(
    lm: Any, *, weighted_ids: list[int] | None = None, weight: float = 1.0
) -> Any:
    import torch
    import torch.nn.functional as F

    class TargetLoss(torch.nn.Module):
        """Cross-entropy on target tokens only; the output layer runs on those positions alone.

        Target tokens in ``weighted_ids`` (the codec's action tokens) weigh ``weight`` times
        the others. Why: a rollout step is one action and ten state tokens, so unweighted the
        actions, which make the model a policy, are ~2% of the loss.
        """

        def __init__(self, lm: Any):
            super().__init__()
            self.lm = lm
            ids = torch.tensor(sorted(set(weighted_ids or [])), dtype=torch.long)
            self.register_buffer("weighted", ids, persistent=False)

        def forward(self, input_ids, attention_mask, labels):  # noqa: ANN001 - torch tensors
            h = self.lm.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            tgt = labels[:, 1:]
            sel = tgt != IGNORE
            logits = self.lm.get_output_embeddings()(h[:, :-1][sel])
            if weight == 1.0 or not len(self.weighted):
                return F.cross_entropy(logits.float(), tgt[sel])
            ce = F.cross_entropy(logits.float(), tgt[sel], reduction="none")
            w = torch.where(torch.isin(tgt[sel], self.weighted), weight, 1.0)
            return (w * ce).sum() / w.sum()

    return TargetLoss(lm)


def build_model(config: dict[str, Any], tokenizer: Any, codec: Any, *, dtype: Any) -> Any:
    """The model to train: the base, codec rows ready, LoRA applied when ``method == lora``."""
    import torch
    from transformers import AutoModelForCausalLM

    from kalm_ray.llm.model import codec_token_ids, init_codec_rows

    torch.manual_seed(config.get("seed", 0))
    model = AutoModelForCausalLM.from_pretrained(
        config["base"], dtype=dtype, trust_remote_code=bool(config.get("trust_remote_code"))
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if config.get("init_codec_rows"):
        init_codec_rows(model, tokenizer, codec, seed=config.get("seed", 0))
    if config["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lc = config["lora"]
        extra = {}
        if config.get("train_codec_embeddings", True):
            extra["trainable_token_indices"] = codec_row_targets(
                model, codec_token_ids(tokenizer, codec)
            )
        model = get_peft_model(
            model,
            LoraConfig(
                r=lc["r"],
                lora_alpha=lc["alpha"],
                lora_dropout=lc["dropout"],
                target_modules=list(lc["target_modules"]),
                task_type="CAUSAL_LM",
                **extra,
            ),
        )
    return model


def codec_row_targets(model: Any, ids: list[int]) -> dict[str, list[int]]:
    """PEFT ``trainable_token_indices`` for the codec's rows: the input embedding, and the
    output layer too when it is a matrix of its own.

    NOTE: PEFT extends ``embed_tokens``' trainable tokens to ``lm_head`` only for tied weights
    (``tie_word_embeddings``); on an untied model (Llama-2) the added codec tokens' output rows
    would keep their initial values, so the model could read them but never learn to write them.
    """
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[id(emb)]: list(ids)}
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and (
        out is None or out.weight is emb.weight
    )
    if out is not None and not tied:
        targets[names[id(out)]] = list(ids)
    return targets


def worker_threads(config: dict[str, Any], *, in_ray: bool, world: int) -> int:
    """Torch CPU threads for this worker: ``cpu_threads`` if set; in Ray, the CPUs Ray gave this
    worker (``ground.num_cpus_per_worker``), which the driver's core count says nothing about
    on another node; else this machine's cores shared by ``world`` workers."""
    if config.get("cpu_threads"):
        return int(config["cpu_threads"])
    if in_ray:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1, int(cpus))
    return max(1, (os.cpu_count() or 1) // world)


def _trainable_state(model: Any) -> dict[str, Any]:
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def _save_state(
    folder: Path, *, model: Any, opt: Any, step: int, curve: list[dict[str, float]] | None = None
) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "step": step,
            "params": _trainable_state(model),
            "optimizer": opt.state_dict(),
            "curve": list(curve or []),
        },
        folder / STATE_FILE,
    )


def _load_state(
    folder: Path, *, model: Any, opt: Any, curve: list[dict[str, float]] | None = None
) -> int:
    """Restore ``model`` and ``opt`` (and refill ``curve`` with the scores taken so far);
    returns the step to resume at."""
    import torch

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    missing = set(_trainable_state(model)) - set(state["params"])
    if missing:
        raise RuntimeError(
            f"{folder}: checkpoint lacks {sorted(missing)[:3]}; not from this config"
        )
    model.load_state_dict(state["params"], strict=False)
    opt.load_state_dict(state["optimizer"])
    if curve is not None:  # checkpoints written before the curve existed have none
        curve[:] = state.get("curve", [])
    return int(state["step"])


def heldout_scorer(config: dict[str, Any], *, codec: Any, device: Any) -> Any | None:
    """``score(model) -> {"policy_action_nll": ..., "policy_action_nll_<part>": ...}``: the
    held-out demonstrator's actions teacher-forced under the policy prompt
    (:func:`kalm_ray.llm.ground.metrics.action_metrics`, the final metrics' own numbers), for
    rank 0 every ``score_every`` steps; None when that is 0 or nothing is held out.

    Deterministic and without sampling, so scoring leaves the training run's numbers as they
    are. Why during training: the final metrics say whether a grounding acts, the curve says
    when it learnt to (CLEVR: the direction term, docs/results.md).
    """
    mcfg = config.get("metrics") or {}
    if not int(config.get("score_every") or 0) or not mcfg.get("heldout_real"):
        return None
    from transformers import AutoTokenizer

    from kalm_ray.envs import get_suite
    from kalm_ray.llm.ground.metrics import action_metrics, read_episodes

    episodes = read_episodes(mcfg["heldout_real"])
    if not episodes or not codec.discrete:
        return None
    factors = tuple(getattr(get_suite(mcfg["env"]), "action_factors", ()))
    # Its own tokenizer: scoring pads on the left, the training batches on the right.
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_dir"])

    def score(model: Any) -> dict[str, float]:
        import torch

        model.eval()
        try:
            with torch.no_grad():
                m = action_metrics(
                    model,
                    tokenizer,
                    codec,
                    episodes,
                    batch_size=int(mcfg.get("batch_size", 32)),
                    device=str(device),
                    factors=factors,
                )
        finally:
            model.train()
        return {k: v for k, v in m.items() if k.startswith("policy_action_nll")}

    return score


def score_note(score: dict[str, float]) -> str:
    """``"2.31 (ball 0.88, direction 1.43) at 4000"``: a curve point in one short phrase."""
    key = "policy_action_nll_"
    parts = [f"{k.removeprefix(key)} {v:.2f}" for k, v in score.items() if k.startswith(key)]
    return (
        f"{score['policy_action_nll']:.2f}"
        + (f" ({', '.join(parts)})" if parts else "")
        + f" at {int(score['step'])}"
    )


def _latest_local(ckpt_dir: str | None) -> Path | None:
    if not ckpt_dir or not Path(ckpt_dir).is_dir():
        return None
    done = sorted(p for p in Path(ckpt_dir).glob("step_*") if (p / STATE_FILE).exists())
    return done[-1] if done else None


_CPU_ID_KEYS = (
    *("cpu family", "model", "stepping", "microcode", "cache size"),  # x86
    *("CPU implementer", "CPU architecture", "CPU variant", "CPU part", "CPU revision"),  # Arm
)
"""The ``/proc/cpuinfo`` fields of :func:`trained_on`'s ``cpu_id``, in order."""


def trained_on(device: Any) -> dict[str, Any]:
    """Where this process trained on ``device`` (the loop's ``torch.device``): device, CPU
    model and identity, the SIMD level torch's CPU kernels use, torch's thread count, and the
    kernel release.

    Why: the same config, data, code and pins ground another model on another day's machine
    (docs/results.md, "One grounding, two machines"): on one machine a grounding repeats to
    the digit. A virtual machine's CPU name is often just the vendor's ("AMD EPYC"), so the
    family, model, stepping, microcode and cache size (Arm: implementer, part, revision) are
    what tells two hosts apart.
    """
    import platform

    import torch

    cpu, ident = platform.processor() or platform.machine(), {}
    try:  # Linux: platform.processor() is often empty there
        with open("/proc/cpuinfo") as f:
            for ln in f:
                key, _, val = ln.partition(":")
                key = key.strip()
                if not key:  # the first processor's block ends here
                    break
                ident.setdefault(key, val.strip())
        cpu = ident.get("model name", cpu)
    except OSError:
        pass
    out = {
        "device": str(device),
        "cpu": cpu,
        "cpu_id": " ".join(
            f"{k.replace('cpu ', '')} {ident[k]}" for k in _CPU_ID_KEYS if k in ident
        ),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "kernel": platform.release(),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def save_final(
    model: Any,
    tokenizer: Any,
    codec: Any,
    out: Path,
    *,
    config: dict[str, Any],
    machine: dict[str, Any] | None = None,
) -> Any:
    """Write the grounded model: merged full weights, ``adapter/`` (LoRA), tokenizer, codec,
    and ``grounded.json`` (the run's ``info``, with ``trained_on``: ``machine``, when given).

    Returns the merged model (a LoRA model is merged in place: call this after training).
    """
    from kalm_ray.llm.model import INFO_FILE, set_generation_stops

    out.mkdir(parents=True, exist_ok=True)
    if config["method"] == "lora":
        model.save_pretrained(str(out / "adapter"))
        model = model.merge_and_unload()
        info = config.get("info") or {}
        if info.get("base") == "base" and Path(config["base"]).is_dir():
            shutil.copytree(config["base"], out / "base", dirs_exist_ok=True)
        # The adapter must name a base that outlives the work folder: the hub name or ../base.
        acfg = out / "adapter" / "adapter_config.json"
        meta = json.loads(acfg.read_text())
        meta["base_model_name_or_path"] = (
            "../base" if info.get("base") == "base" else info.get("base", config["base"])
        )
        acfg.write_text(json.dumps(meta, indent=2))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    codec.save(out)
    set_generation_stops(out, tokenizer, codec)
    info = dict(config.get("info") or {"method": config["method"]})
    if machine:
        info["trained_on"] = machine
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return model


def train_loop(config: dict[str, Any]) -> dict[str, float]:
    """Ground a model on the examples in ``config["examples"]`` (see the module docstring).

    Returns the last step's metrics (``loss``, ``step``, ``tokens_per_s``).
    """
    import torch
    from transformers import AutoTokenizer

    from kalm_ray.llm.codec import Codec
    from kalm_ray.localcopy import is_uri, local_copy

    # Inputs in the run dir (a URI on a cluster) are read from there, never from the driver.
    config = {
        **config,
        **{
            k: local_copy(config[k])
            for k in ("base", "tokenizer_dir", "codec_path")
            if is_uri(str(config.get(k, "")))
        },
    }
    ctx = ray_train_context()
    rank, world = (ctx.get_world_rank(), ctx.get_world_size()) if ctx else (0, 1)
    use_gpu = bool(config.get("use_gpu")) and torch.cuda.is_available()
    if ctx is not None and use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda" if use_gpu else "cpu")
    if device.type == "cpu":
        # NOTE: Ray sets OMP_NUM_THREADS=1 in a 1-CPU worker; give torch the cores this worker owns.
        torch.set_num_threads(worker_threads(config, in_ray=ctx is not None, world=world))
    # bf16 on GPU (LoRA: frozen base in bf16; full FT: fp32 master weights), fp32 on CPU.
    load_dtype = (
        torch.bfloat16 if (device.type == "cuda" and config["method"] == "lora") else torch.float32
    )
    autocast = device.type == "cuda"

    codec = Codec.load(config["codec_path"])
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_dir"])
    collate = batch_collator(tokenizer)
    model = build_model(config, tokenizer, codec, dtype=load_dtype)
    model.to(device)
    checkpointing = config.get("gradient_checkpointing")
    if checkpointing or (checkpointing is None and device.type == "cuda"):
        # Activations of one layer at a time instead of all (see kalm_ray.plan's estimate).
        # NOTE: non-reentrant: reentrant checkpointing with PEFT under DDP fails (#43296).
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if config["method"] == "lora":
        for p in model.parameters():  # adapters and trainable token rows train in fp32
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(params, float(config.get("weight_decay", 0.0)))
    opt = torch.optim.AdamW(groups, lr=config["lr"], betas=(0.9, 0.95))
    total = int(config["max_steps"])

    start = 0
    curve: list[dict[str, float]] = []  # held-out scores every score_every steps
    if ctx is not None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = _load_state(Path(d), model=model, opt=opt, curve=curve)
    elif (latest := _latest_local(config.get("checkpoint_dir"))) is not None:
        start = _load_state(latest, model=model, opt=opt, curve=curve)
    if start:
        log.info("ground: resuming at step %d", start)

    wrapped = _target_loss_module(
        model,
        weighted_ids=[int(i) for i in tokenizer.convert_tokens_to_ids(codec.action_tokens)],
        weight=float(config.get("action_loss_weight", 1.0)),
    ).to(device)
    if ctx is not None and world > 1:
        import ray.train.torch

        wrapped = ray.train.torch.prepare_model(wrapped, move_to_device=False)
    pool = ExamplePool(
        config["examples"],
        rank=rank,
        world=world,
        task_mix=config["task_mix"],
        seed=int(config.get("seed", 0)),
    )
    schedule = lr_schedule(
        opt,
        peak=config["lr"],
        total=total,
        start=start,
        decay_fraction=float(config.get("lr_decay_fraction", 1.0)),
    )
    every = int(config.get("checkpoint_every") or total)
    score_every = int(config.get("score_every") or 0)
    scorer = heldout_scorer(config, codec=codec, device=device) if rank == 0 else None
    heldout = score_note(curve[-1]) if curve else None  # the bar's last score
    log_every = max(1, total // 10)
    metrics: dict[str, float] = {"step": float(start), "resumed_from": float(start)}
    tokens, t0, losses = 0, time.perf_counter(), []
    by_task: dict[str, list[float]] = {}  # this log window's losses, by the batch's task
    task_s: dict[str, float] = {}  # seconds per task since this run (or resume) started
    post = ProgressPoster(config.get("progress_actor") if ctx is not None and rank == 0 else None)
    smooth: float | None = None
    checkpoint = functools.partial(
        _checkpoint,
        config,
        ctx=ctx,
        rank=rank,
        model=model,
        opt=opt,
        tokenizer=tokenizer,
        codec=codec,
        device=device,
        curve=curve,
    )
    model.train()
    for step in range(start, total):
        t_step = time.perf_counter()
        task, rows = pool.batch(step, int(config["batch_size"]))
        b = {k: v.to(device) for k, v in collate(rows).items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = wrapped(b["input_ids"], b["attention_mask"], b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
        losses.append(float(loss.detach()))
        by_task.setdefault(task, []).append(losses[-1])
        task_s[task] = task_s.get(task, 0.0) + time.perf_counter() - t_step
        done = step + 1
        smooth = losses[-1] if smooth is None else 0.9 * smooth + 0.1 * losses[-1]
        if scorer is not None and done % score_every == 0:
            curve.append({"step": float(done), **scorer(model)})
            heldout = score_note(curve[-1])
            log.info("ground: step %d/%d held-out action NLL %s", done, total, heldout)
        post(
            {
                "step": done,
                "total": total,
                "loss": smooth,
                "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
                "heldout": heldout,
            },
            force=done == total or bool(scorer and done % score_every == 0),
        )
        if done % log_every == 0 or done == total:
            dt = time.perf_counter() - t0
            task_loss = {t: float(np.mean(v)) for t, v in sorted(by_task.items())}
            timed = sum(task_s.values())
            metrics = {
                "step": float(done),
                "loss": float(np.mean(losses)),
                "tokens_per_s": tokens / max(dt, 1e-9),
                "resumed_from": float(start),
                # Why by task: the total hides which skill is learnt when; acting (the policy
                # task's loss) is learnt last and by some groundings much later than others.
                **{f"loss_{t}": v for t, v in task_loss.items()},
                # Why: a task's share of the batches is not its share of the time (a whole
                # rollout is ~3x a policy example's tokens), and the time is what a mix costs.
                **{f"time_share_{t}": v / timed for t, v in sorted(task_s.items())},
            }
            if rank == 0:
                log.info(
                    "ground: step %d/%d loss %.4f (%s) (%.0f tok/s)",
                    done,
                    total,
                    metrics["loss"],
                    ", ".join(f"{t} {v:.3f}" for t, v in task_loss.items()),
                    metrics["tokens_per_s"],
                )
            losses, by_task = [], {}
        if done % every == 0 or done == total:
            checkpoint(step=done, metrics=metrics, final=done == total)
    if start >= total:  # nothing left to train: still produce the final model
        checkpoint(step=total, metrics=metrics, final=True)
    return metrics


def _checkpoint(
    config: dict[str, Any],
    *,
    ctx: Any,
    rank: int,
    model: Any,
    opt: Any,
    step: int,
    metrics: dict[str, float],
    final: bool,
    tokenizer: Any,
    codec: Any,
    device: Any,
    curve: list[dict[str, float]],
) -> None:
    """Save a resume point (and, at the end, the final model with its metrics)."""
    with tempfile.TemporaryDirectory(prefix="kalm-ckpt-") as tmp:
        folder = Path(tmp)
        if rank == 0:
            _save_state(folder, model=model, opt=opt, step=step, curve=curve)
            if final:
                _finish(
                    config,
                    model=model,
                    tokenizer=tokenizer,
                    codec=codec,
                    out=folder / FINAL_DIR,
                    device=device,
                    curve=curve,
                )
        if ctx is not None:
            import ray.train

            # NOTE: ray.train.report is a barrier: every worker calls it; rank 0 attaches files.
            ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report({**metrics, "step": float(step)}, checkpoint=ckpt)
            return
        ckpt_dir = Path(config["checkpoint_dir"])
        target = ckpt_dir / f"step_{step:08d}"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        staging = ckpt_dir / f".tmp-{target.name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(tmp, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        for old in sorted(ckpt_dir.glob("step_*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        if final and config.get("output_dir"):
            out = Path(config["output_dir"])
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(target / FINAL_DIR, out)


def _finish(
    config: dict[str, Any],
    *,
    model: Any,
    tokenizer: Any,
    codec: Any,
    out: Path,
    device: Any,
    curve: list[dict[str, float]],
) -> None:
    """Rank 0 at the end: save the final model, then measure it on the held-out split."""
    import torch
    from transformers import AutoTokenizer

    merged = save_final(model, tokenizer, codec, out, config=config, machine=trained_on(device))
    mcfg = dict(config.get("metrics") or {})
    if not mcfg:
        return
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.ground.metrics import grounding_metrics, read_episodes

    t0 = time.perf_counter()
    suite = get_suite(mcfg.pop("env"))
    episodes = read_episodes(mcfg.pop("heldout_real"))
    # Optional: without them (or in a work folder built before they were written) no seen
    # cells, no seen action NLL.
    seen, seen_sample = (
        read_episodes(p) if (p := mcfg.pop(k, None)) else [] for k in ("seen_starts", "seen_real")
    )
    gen_tok = AutoTokenizer.from_pretrained(str(out))
    gen_tok.padding_side = "left"
    merged.eval()
    with torch.no_grad():
        mx = grounding_metrics(
            merged,
            gen_tok,
            codec,
            suite,
            episodes,
            seen=seen,
            seen_sample=seen_sample,
            device=str(device),
            **mcfg,
        )
    mx["seconds"] = time.perf_counter() - t0
    if curve:
        mx["curve"] = curve
    (out / "grounding_metrics.json").write_text(json.dumps(mx, indent=1))
