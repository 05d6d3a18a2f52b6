"""``kalm plan CONFIG``: what a config runs where, and whether it can, before anything starts.

:func:`make_plan` reads the config, the runtime_env YAML ``kalm submit`` would ship, the base
model's shape (its ``config.json`` when it is on this machine, else :data:`KNOWN_MODELS`) and
the codec of the env suite; it starts no Ray and downloads nothing. :func:`check` raises
:class:`PlanError` (one line naming the config key) for a config that cannot fit or run;
``kalm submit`` calls it before reaching the cluster.

Grounding memory per GPU (DDP: every worker holds a whole copy; ``P`` parameters, ``T``
trainable ones, ``b`` = ``ground.batch_size``, ``L`` = ``ground.max_seq_len``, ``H`` hidden,
``I`` MLP width, ``n`` layers, ``V`` vocabulary, ``e`` = 2 bytes on GPU (bf16), 4 on CPU)::

    weights      lora: P*e (frozen base)         full: 4P (fp32 master weights)
    trainable    lora: 4T (fp32 adapters + codec rows)
    grads        4T                              (full: T = P)
    AdamW        8T (two fp32 moments)
    activations  checkpointing: n*b*L*H*e (layer inputs) + b*L*(6H + 4I)*e (one layer)
                 without:       n*b*L*(6H + 4I)*e
    logits       8*b*L*V (fp32 logits and their gradient, target positions only)
    overhead     1 GiB (CUDA context, allocator)

The activation count (6H + 4I elements per token and layer: norms, q/k/v/o, the MLP's
gate/up/product) assumes SDPA attention (no L^2 term). It is an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kalm_ray.config import ExperimentConfig
from kalm_ray.errors import ConfigError, KalmError

GIB = 1024**3
OVERHEAD_GIB = 1.0
"""CUDA context and allocator slack per GPU."""
TEXT_CHARS_PER_TOKEN = 2.0
"""Conservative BPE rate for prompt words (English BPE is nearer 4 characters a token)."""

KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-chat-hf": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}
"""Shapes of models the shipped configs and tests name, from their published config.json."""
KNOWN_MODELS["meta-llama/Llama-2-7b-hf"] = KNOWN_MODELS["meta-llama/Llama-2-7b-chat-hf"]


class PlanError(ConfigError):
    """A config that cannot fit or cannot run; the message names the config key."""


# ---- facts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """The base model's shape, as far as it can be known without downloading it."""

    name: str
    source: str
    """Where the shape came from: a local ``config.json``, the known-models table, or unknown."""
    shape: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return bool(self.shape)

    @property
    def context(self) -> int | None:
        return self.shape.get("max_position_embeddings")

    def params(self, extra_vocab: int = 0) -> int:
        """Parameter count (Llama layout) with ``extra_vocab`` rows added to the vocabulary."""
        s = self.shape
        h, n, i = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
        heads = s["num_attention_heads"]
        kv = s.get("num_key_value_heads") or heads
        hd = h // heads
        v = s["vocab_size"] + extra_vocab
        attn = h * heads * hd * 2 + h * kv * hd * 2
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if s.get("tie_word_embeddings") else 2) + n * layer + h

    def lora_params(self, r: int, targets: list[str]) -> int:
        """Trainable adapter parameters of rank ``r`` on the named projections, every layer."""
        s = self.shape
        h, i = s["hidden_size"], s["intermediate_size"]
        heads = s["num_attention_heads"]
        kv_out = (s.get("num_key_value_heads") or heads) * (h // heads)
        dims = {
            "q_proj": (h, h),
            "k_proj": (h, kv_out),
            "v_proj": (h, kv_out),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        per_layer = sum(r * sum(dims.get(t, (h, h))) for t in targets)
        return s["num_hidden_layers"] * per_layer


def model_facts(name: str, tiny: dict[str, int] | None = None) -> ModelFacts:
    """The shape of ``ground.model.name``: ``tiny`` (with ``ground.model.tiny`` overrides), a
    local folder or a cached Hub model's ``config.json``, else :data:`KNOWN_MODELS`, else
    unknown. Never downloads."""
    if name == "tiny":
        from kalm_ray.llm.model import N_FREQUENT_WORDS, TINY

        # The tokenizer is built at ground time; its size is about the kept words + codec.
        shape = {**TINY, **(tiny or {}), "vocab_size": N_FREQUENT_WORDS + 1000}
        return ModelFacts(name, "built locally", shape)
    local = Path(name).expanduser() / "config.json"
    if not local.is_file():
        local = _cached_config(name)
    if local is not None and local.is_file():
        try:
            cfg = json.loads(local.read_text())
        except (ValueError, OSError) as e:
            raise ConfigError(f"ground.model.name: {local} is not readable JSON ({e})") from None
        cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if all(isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool) for k in keys):
            return ModelFacts(name, f"{local}", cfg)
    if name in KNOWN_MODELS:
        return ModelFacts(name, "known-models table", KNOWN_MODELS[name])
    return ModelFacts(name, "unknown")


def _cached_config(name: str) -> Path | None:
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - a cache lookup only; no answer means "not here"
        return None
    return Path(got) if isinstance(got, str) else None


@dataclass(frozen=True)
class RuntimeEnvFacts:
    """What the runtime_env YAML that ``kalm submit`` ships installs."""

    path: str
    pip: list[str]
    """Its pip packages; empty = it installs nothing (the nodes' own environment)."""
    pip_options: list[str]
    env_vars: dict[str, str]

    @property
    def installs(self) -> bool:
        return bool(self.pip)

    def pin(self, package: str) -> str | None:
        for p in self.pip:
            base = p.split(";")[0].strip()
            head = base.split("[")[0]
            for sep in ("==", ">=", "<=", "~=", ">", "<", "@", " "):
                head = head.split(sep)[0]
            if head.strip().lower().replace("_", "-") == package:
                return base
        return None

    @property
    def cpu_torch(self) -> bool:
        """It installs a CPU-only torch (a ``+cpu`` wheel, or the CPU wheel index)."""
        torch = self.pin("torch")
        return torch is not None and (
            "+cpu" in torch or any("/whl/cpu" in o for o in self.pip_options)
        )


def runtime_env_facts(cfg: ExperimentConfig) -> RuntimeEnvFacts:
    """The runtime_env named by ``ray.runtime_env``, resolved as ``kalm submit`` does."""
    from kalm_ray.cluster.submit import project_root

    path = Path(cfg.ray.runtime_env)
    path = path if path.is_absolute() else project_root() / path
    if not path.is_file():
        raise PlanError(f"ray.runtime_env: no such file {path}")
    try:
        env = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise PlanError(
            f"ray.runtime_env: {path}{line} is not valid YAML ({getattr(e, 'problem', e)})"
        ) from None
    if not isinstance(env, dict):
        raise PlanError(f"ray.runtime_env: {path}: a runtime_env must be a mapping")
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise PlanError(f"ray.runtime_env: {path}: env_vars must be a mapping")
    pip = env.get("pip") or []
    opts: list[str] = []
    if isinstance(pip, dict):
        opts = [str(o) for o in pip.get("pip_install_options") or []]
        pip = pip.get("packages") or []
    if isinstance(pip, str):
        pip = []  # a requirements file on the nodes: its pins are not ours to read
    return RuntimeEnvFacts(
        path=cfg.ray.runtime_env,
        pip=[str(p) for p in pip],
        pip_options=opts,
        env_vars={k: str(v) for k, v in env_vars.items()},
    )


# ---- estimates ----------------------------------------------------------------------------


def grounding_memory(cfg: ExperimentConfig, model: ModelFacts, *, codec_tokens: int) -> dict:
    """Bytes per GPU (or per CPU worker) of one grounding worker, by part (module docstring)."""
    g = cfg.ground
    s = model.shape
    added = 0 if cfg.ground.model.name == "tiny" else codec_tokens
    p = model.params(added)
    e = 2 if g.use_gpu else 4
    h, n, i = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    v = s["vocab_size"] + added
    b, seq = g.batch_size, g.max_seq_len
    tied = bool(s.get("tie_word_embeddings"))
    if g.method == "lora":
        t = model.lora_params(g.lora.r, list(g.lora.target_modules))
        if g.train_codec_embeddings:
            t += codec_tokens * h * (1 if tied else 2)
        weights, trainable = p * e, 4 * t
    else:
        t = p
        weights, trainable = 4 * p, 0
    checkpointing = g.use_gpu if g.gradient_checkpointing is None else g.gradient_checkpointing
    layer = b * seq * (6 * h + 4 * i) * e
    acts = n * b * seq * h * e + layer if checkpointing else n * layer
    parts = {
        "weights": weights,
        "trainable": trainable,
        "grads": 4 * t,
        "adamw": 8 * t,
        "activations": acts,
        "logits": 8 * b * seq * v,
        "overhead": OVERHEAD_GIB * GIB if g.use_gpu else 0,
    }
    return {
        "params": p,
        "trainable_params": t,
        "checkpointing": checkpointing,
        "parts": parts,
        "total": sum(parts.values()),
    }


def prompt_tokens(codec: Any, longest_instruction: int) -> int:
    """Upper estimate of a rollout prompt's tokens: every codec token is one token, the words
    at :data:`TEXT_CHARS_PER_TOKEN`, plus BOS."""
    state = codec.max_step_tokens() - (1 if codec.discrete else 1 + codec.n_actions)
    words = len("instruction: \nstart: \nplan:") + longest_instruction
    return state + math.ceil(words / TEXT_CHARS_PER_TOKEN) + 1


# ---- the plan -----------------------------------------------------------------------------


@dataclass
class Plan:
    """The printed plan (``lines``) and the refusals (each a one-line message naming a key)."""

    lines: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    stage_of: dict[str, str] = field(default_factory=dict)
    """Each refusal's stage (the one that would fail on it), or ``submit`` for those about the
    runtime_env ``kalm submit`` ships: :func:`check_local` takes only the stages a local
    command runs."""

    def refuse(self, stage: str, message: str) -> None:
        self.refusals.append(message)
        self.stage_of[message] = stage

    def add(self, head: str, text: str) -> None:
        self.lines.append(f"{head:<12}{text}")

    def more(self, text: str) -> None:
        self.lines.append(f"{'':<12}{text}")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def make_plan(cfg: ExperimentConfig, *, local: bool = False) -> Plan:
    """Everything ``kalm plan`` prints and refuses for ``cfg`` (no Ray, no downloads).

    ``local``: for a run in this process (:func:`check_local`), which ships no runtime_env:
    its file is not needed, and ``imagine.backend: auto`` is resolved on this machine (vLLM
    where it is installed and a GPU is visible), not from what the runtime_env installs.
    """
    from kalm_ray.envs import LEVELS, get_suite
    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.imagine.backends import vllm_missing
    from kalm_ray.llm.imagine.backends.vllm import VLLM_LORA_RANKS, vllm_lora_rank
    from kalm_ray.llm.imagine.store import level_step_limits, max_new_tokens

    plan = Plan()
    g, im = cfg.ground, cfg.imagine
    try:
        env = runtime_env_facts(cfg)
    except PlanError:
        if not local:
            raise
        env = RuntimeEnvFacts(path=cfg.ray.runtime_env, pip=[], pip_options=[], env_vars={})
    suite = get_suite(cfg.env.name)
    codec = Codec.for_suite(suite, g.n_bins, state_coding=g.state_coding)
    model = model_facts(g.model.name, dict(g.model.tiny))
    ctx = model.context

    # ---- where it runs, and with what -----------------------------------------------------
    plan.add("config", f"{cfg.name}: env {cfg.env.name}, run_dir {cfg.run_dir}")
    if env.installs:
        torch = env.pin("torch") or "no torch pin"
        kind = "CPU" if env.cpu_torch else "CUDA"
        vllm = env.pin("vllm") or "no vllm"
        plan.add("runtime_env", f"{env.path}: {torch} ({kind}), {vllm}")
    else:
        plan.add("runtime_env", f"{env.path}: code only; packages from the node image (unchecked)")
    offline = env.env_vars.get("HF_HUB_OFFLINE", "unset")
    plan.more(f"HF_HUB_OFFLINE={offline}; shipped env vars: {', '.join(env.env_vars) or 'none'}")
    shape = (
        f"{_count(model.params(0))} params, context {ctx}, "
        f"{'tied' if model.shape.get('tie_word_embeddings') else 'untied'} output layer"
        if model.known
        else "shape unknown (no local config.json, not in the known-models table)"
    )
    plan.add("model", f"{g.model.name}: {shape} [{model.source}]")
    if (
        g.model.name.startswith(("/", "./", "../", "~"))
        and not Path(g.model.name).expanduser().exists()
    ):
        # A path: the ground stage's own refusal where it runs here; a cluster's nodes may
        # hold it, so `kalm plan`/`kalm submit` only say so.
        if local:
            plan.refuse("ground", f"ground.model.name: no such model folder {g.model.name!r}")
        else:
            plan.more(f"note: {g.model.name} is not on this machine; the nodes must have it")
    plan.more(
        f"codec: {len(codec.all_tokens)} tokens, at most {codec.max_step_tokens()} tokens per "
        f"step ({g.n_bins} bins, {g.state_coding} states)"
    )

    c = cfg.collect
    plan.add("collect", f"{c.num_workers} actors x {c.num_cpus_per_worker:g} CPU, no GPU")

    per = "1 GPU" if g.use_gpu else "no GPU"
    cpus = g.num_cpus_per_worker or 1
    plan.add(
        "ground",
        f"Ray Train: {g.num_workers} worker{'s' if g.num_workers != 1 else ''} x ({per}, "
        f"{cpus:g} CPU), {g.method}"
        + (f" r={g.lora.r}" if g.method == "lora" else "")
        + f", {'bf16' if g.use_gpu else 'fp32'}, {g.max_steps} steps x batch {g.batch_size}",
    )
    eps = cfg.env.max_episode_steps or suite.max_episode_steps
    words = max(len(w) for lv in LEVELS for t in suite.tasks(lv) for w in suite.instructions(lv, t))
    prompt = prompt_tokens(codec, words)
    full_rollout = prompt + codec.max_step_tokens() * eps + 1
    plan.more(
        f"longest example: {g.max_seq_len} tokens (ground.max_seq_len) vs model context {ctx}; "
        f"a full {eps}-step rollout example is ~{full_rollout} tokens"
        + (" (shortened from the front to fit)" if full_rollout > g.max_seq_len else "")
    )
    if ctx is not None and g.max_seq_len > ctx:
        plan.refuse(
            "ground",
            f"ground.max_seq_len: {g.max_seq_len} is above {g.model.name}'s context of "
            f"{ctx} tokens",
        )
    if model.known:
        mem = grounding_memory(cfg, model, codec_tokens=len(codec.all_tokens))
        parts = mem["parts"]
        where = "GPU" if g.use_gpu else "CPU worker"
        plan.more(
            f"memory per {where}: ~{_gib(mem['total'])} GiB = weights {_gib(parts['weights'])}"
            f" + trainable {_gib(parts['trainable'])} + grads {_gib(parts['grads'])} + AdamW "
            f"{_gib(parts['adamw'])} + activations {_gib(parts['activations'])} (checkpointing "
            f"{'on' if mem['checkpointing'] else 'off'}) + logits {_gib(parts['logits'])} + "
            f"overhead {_gib(parts['overhead'])}"
        )
        # The limit is a GPU's: a CPU worker's memory is the node's, which Ray schedules.
        limit = f"; limit ground.gpu_memory_gib {g.gpu_memory_gib:g}" if g.use_gpu else ""
        plan.more(
            f"  ({mem['trainable_params'] / 1e6:.1f}M trainable; formula: kalm_ray/plan.py"
            f"{limit})"
        )
        if g.use_gpu and mem["total"] > g.gpu_memory_gib * GIB:
            need = f"~{_gib(mem['total'])} GiB per GPU > ground.gpu_memory_gib {g.gpu_memory_gib:g}"
            if g.method == "full":
                plan.refuse(
                    "ground",
                    f"ground.method: full fine-tuning of {g.model.name} needs {need} (16 bytes "
                    "a parameter on every GPU: DDP, no FSDP sharding); use method: lora",
                )
            else:
                plan.refuse(
                    "ground",
                    f"ground.batch_size: LoRA grounding at batch {g.batch_size} x "
                    f"{g.max_seq_len} tokens needs {need}; lower ground.batch_size or max_seq_len",
                )
    else:
        plan.more("memory per GPU: unknown (model shape unknown)")

    backend = _backend(cfg, local=local)
    if local and backend == "vllm":
        # The imagine stage's own refusal, ahead of collect and ground. Joining a cluster,
        # its GPUs are Ray's to count once it is up: only the package is checked here.
        joins = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        why = vllm_missing(gpus_on_demand=cfg.ray.gpus_on_demand or joins)
        if why:
            plan.refuse("imagine", f"imagine.backend: vllm, but {why}; or use backend: hf")
    vllm_possible = backend == "vllm" or (
        backend == "auto" and (env.pin("vllm") is not None or not env.installs)
    )
    kw = dict(im.vllm_engine_kwargs)
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len"):
        # free-form engine arguments: the ones read here must be counts, said in one line
        value = kw.get(name)
        bad = value is not None and (isinstance(value, bool) or not isinstance(value, int))
        if bad and vllm_possible:
            raise ConfigError(f"imagine.vllm_engine_kwargs.{name}: {value!r} is not an integer")
        if bad:
            kw.pop(name)  # the hf backend never reads them
    steps = level_step_limits(suite, list(im.levels), im.max_steps or eps, compose=im.compose)
    longest = max(steps.values(), default=im.max_steps or eps)
    new = max_new_tokens(codec, longest)
    if backend == "hf":
        plan.add(
            "imagine",
            f"hf: {im.min_actors}..{im.max_actors} actors x ({im.num_cpus_per_actor:g} CPU, "
            f"{im.num_gpus_per_actor:g} GPU)",
        )
        limit, limit_key = ctx, "model context"
    else:
        tp = int(kw.get("tensor_parallel_size", 1)) * int(kw.get("pipeline_parallel_size", 1))
        plan.add(
            "imagine",
            f"{backend}: {im.min_actors}..{im.max_actors} vLLM engine replicas x {tp} GPU"
            + (f" ({im.accelerator_type})" if im.accelerator_type else "")
            + (", else hf" if backend == "auto" else ""),
        )
        if im.grammar:
            # Not built for vLLM (its structured-output path and the codec's added tokens are
            # untested without a GPU here): its malformed rollouts are the filter's to reject.
            plan.more(
                "vLLM decodes without imagine.grammar (hf only): the filter rejects malformed "
                "rollouts (filter_report.json: unparseable, wrong_step_shape)"
            )
        limit = kw.get("max_model_len") or ctx
        limit_key = (
            "imagine.vllm_engine_kwargs.max_model_len"
            if "max_model_len" in kw
            else ("model context")
        )
    if im.mode == "stepwise":
        # Each step is its own prompt (instruction + state -> action; state + action -> next
        # state): the context holds one step, however long the rollout.
        prompt += codec.max_step_tokens()
        new = codec.max_step_tokens()
        plan.more(
            f"stepwise, {longest} steps: each prompt ~{prompt} tokens + {new} generated vs "
            f"{limit_key} {limit}"
        )
    else:
        plan.more(
            f"longest rollout: {longest} steps: prompt ~{prompt} + {codec.max_step_tokens()} x "
            f"({longest} + 1) + 1 = ~{prompt + new} tokens vs {limit_key} {limit}"
        )
    mml = kw.get("max_model_len")
    if (
        mml is not None
        and ctx is not None
        and mml > ctx
        and env.env_vars.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1"
    ):
        plan.refuse(
            "imagine",
            f"imagine.vllm_engine_kwargs.max_model_len: {mml} is above {g.model.name}'s "
            f"context of {ctx} tokens (vLLM refuses to start)",
        )
    elif limit is not None and prompt + new > limit and im.mode == "stepwise":
        plan.refuse(
            "imagine",
            f"imagine: a stepwise prompt needs ~{prompt + new} tokens > {limit_key} {limit}",
        )
    elif limit is not None and prompt + new > limit:
        plan.refuse(
            "imagine",
            f"imagine.max_steps: rollouts of {longest} steps need ~{prompt + new} tokens "
            f"(prompt ~{prompt} + {codec.max_step_tokens()} per step) > {limit_key} {limit}; "
            f"at most {max(0, (limit - prompt - 1) // codec.max_step_tokens() - 1)} steps fit",
        )
    if vllm_possible and g.method == "lora":
        if g.lora.r > VLLM_LORA_RANKS[-1]:
            plan.refuse(
                "imagine",
                f"ground.lora.r: {g.lora.r} is above vLLM's largest max_lora_rank "
                f"{VLLM_LORA_RANKS[-1]} (allowed: {', '.join(map(str, VLLM_LORA_RANKS))})",
            )
        else:
            plan.more(f"LoRA served at vLLM max_lora_rank {vllm_lora_rank(g.lora.r)}")
        user = kw.get("max_lora_rank")
        if user is not None and (user not in VLLM_LORA_RANKS or user < g.lora.r):
            plan.refuse(
                "imagine",
                f"imagine.vllm_engine_kwargs.max_lora_rank: {user!r} must be one of "
                f"{', '.join(map(str, VLLM_LORA_RANKS))} and >= ground.lora.r ({g.lora.r})",
            )

    t = cfg.train
    from kalm_ray.rl.algos import algo_params_refusals

    for msg in algo_params_refusals(t):  # imports RLlib, only for algorithms given params
        plan.refuse("train", msg)
    n_pol = len(t.algos) * len(t.data) * len(t.seeds)
    if t.max_concurrent_units == 1:
        units, home = "one after another in the driver", "the driver"
    else:
        cap = "as many at once as the CPUs hold"
        if t.max_concurrent_units:
            cap = f"at most {t.max_concurrent_units} at once"
        units = f"each a Ray task of {t.num_cpus_per_unit:g} CPU, {cap}"
        home = "each unit's process"
    learners = (f"in {home}" if t.num_learners == 0 else f"{t.num_learners} learner actors") + (
        f" x {t.num_gpus_per_learner:g} GPU" if t.num_gpus_per_learner else ", no GPU"
    )
    plan.add(
        "train",
        f"RLlib: {n_pol} policies ({'/'.join(t.algos)}), {units}; learners {learners}",
    )
    e = cfg.evaluate
    actors = (
        f"{e.num_workers} actor{'s' if e.num_workers != 1 else ''}"
        if e.num_workers
        else "as many actors as free CPUs allow at start"
    )
    plan.add(
        "evaluate",
        f"{actors} x {e.num_cpus_per_worker:g} CPU x {e.envs_per_worker} envs, levels "
        f"{', '.join(e.levels)}",
    )

    # ---- what the runtime_env must provide ----------------------------------------------------
    gpu_keys = [
        k
        for k, on in (
            ("ground.use_gpu", g.use_gpu),
            ("imagine.num_gpus_per_actor", backend == "hf" and im.num_gpus_per_actor > 0),
            ("imagine.backend: vllm", backend == "vllm"),
            ("train.num_gpus_per_learner", cfg.train.num_gpus_per_learner > 0),
        )
        if on
    ]
    if env.installs and env.cpu_torch and gpu_keys:
        key = gpu_keys[0]
        plan.refuse(
            "submit",
            f"ray.runtime_env: {env.path} ships CPU-only torch ({env.pin('torch')}) but {key} "
            "needs GPUs; use ray.runtime_env: jobs/runtime_env_gpu.yaml",
        )
    if backend == "vllm" and env.installs and env.pin("vllm") is None:
        plan.refuse(
            "submit",
            f"imagine.backend: vllm, but ray.runtime_env {env.path} installs no vllm; use "
            "jobs/runtime_env_gpu.yaml or imagine.backend: hf",
        )
    if g.model.name != "tiny" and offline == "1" and model.source != "built locally":
        if not Path(g.model.name).expanduser().exists():
            plan.more(
                f"note: HF_HUB_OFFLINE=1 in {env.path}: {g.model.name} must be in the nodes' cache"
            )
    if cfg.ray.num_cpus and not local:
        # A local Ray gets ray.num_cpus (check_local refuses what it cannot place); a cluster
        # ignores it, so here it is a note, not a refusal that would stop `kalm submit`.
        from kalm_ray.stage import STAGES, stage_needs

        for stage in STAGES:
            for key, need in stage_needs(cfg, stage, backend=backend):
                if need.get("CPU", 0) > cfg.ray.num_cpus:
                    plan.more(
                        f"note: {key} needs {need['CPU']:g} CPUs at once, more than "
                        f"ray.num_cpus ({cfg.ray.num_cpus:g}): a local run refuses it"
                    )
    plan.add("verdict", "refused" if plan.refusals else "ok: nothing refused")
    return plan


def check(cfg: ExperimentConfig) -> Plan:
    """The plan, or :class:`PlanError` with the first refusal (``kalm submit`` runs this)."""
    plan = make_plan(cfg)
    if plan.refusals:
        more = f" [+{len(plan.refusals) - 1} more: kalm plan]" if len(plan.refusals) > 1 else ""
        raise PlanError(plan.refusals[0] + more)
    return plan


def _count(n: float) -> str:
    """1.35B, 134.5M, 0.7M: a parameter count at a scale that shows it."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _backend(cfg: ExperimentConfig, *, local: bool) -> str:
    """Imagine's backend: stepwise runs on hf only; ``auto`` is resolved on this machine for a
    run in this process (as the stage does), and left ``auto`` for a cluster's plan."""
    from kalm_ray.llm.imagine.backends import resolve_backend

    backend = "hf" if cfg.imagine.mode == "stepwise" else cfg.imagine.backend
    if local and backend == "auto":
        return resolve_backend("auto", gpus_on_demand=cfg.ray.gpus_on_demand)
    return backend


def check_local(cfg: ExperimentConfig, stages: Sequence[str]) -> None:
    """:func:`check` for ``stages`` run in this process (``kalm run``, ``kalm <stage>``, a
    submitted job's driver): the refusals of those stages, not those about the runtime_env,
    which only ``kalm submit`` ships. Why: a context too short or a GPU too small otherwise
    shows only inside a stage, after the stages before it have run (hours of grounding before
    vLLM refuses a LoRA rank).

    Raises:
        PlanError: the first refusal, naming its key.
    """
    from kalm_ray.raysetup import local_resources, shortfall
    from kalm_ray.stage import stage_needs

    # Work Ray could never place (an actor, worker group or unit larger than the local Ray):
    # the stage would refuse it only once it starts, after the stages before it.
    have = local_resources(cfg.ray)
    backend = _backend(cfg, local=True) if have is not None else None
    for stage in stages if have is not None else ():
        for key, need in stage_needs(cfg, stage, backend=backend):
            refusal = shortfall(key, need, have)
            if refusal is not None:
                raise refusal
    if not set(stages) & {"ground", "imagine", "train"}:
        return  # collect and evaluate have no other refusals; and no RLlib import for them
    try:
        plan = make_plan(cfg, local=True)
    except KalmError:
        # A value the plan cannot read (the base model's config.json, vLLM's engine
        # arguments): ground's and imagine's to read, so theirs to refuse.
        if set(stages) & {"ground", "imagine"}:
            raise
        return
    except Exception:  # noqa: BLE001 - a check ahead of the stages, not a gate of its own
        # What stops the plan itself (a model folder whose config.json the ground stage's own
        # check names in one line) is the stage's to say.
        return
    local = [r for r in plan.refusals if plan.stage_of[r] in stages]
    if local:
        more = f" [+{len(local) - 1} more: kalm plan]" if len(local) > 1 else ""
        raise PlanError(local[0] + more)


def cli_plan(args: argparse.Namespace) -> int:
    """``kalm plan CONFIG [--run-dir DIR]``: print the plan; exit 2 with one line if refused."""
    from kalm_ray.config import load_config

    cfg = load_config(
        args.config, run_dir=getattr(args, "run_dir", None), seed=getattr(args, "seed", None)
    )
    plan = make_plan(cfg)
    print("\n".join(plan.lines), flush=True)
    if plan.refusals:
        more = f" [+{len(plan.refusals) - 1} more]" if len(plan.refusals) > 1 else ""
        raise PlanError(plan.refusals[0] + more)
    return 0
