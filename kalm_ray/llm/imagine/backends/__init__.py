"""Generation backends behind one interface.

``generate(ds, backend=..., spec=..., icfg=...)`` takes the requests dataset
(:data:`kalm_ray.llm.imagine.requests.REQUEST_COLUMNS`) and returns a lazy dataset with the same
columns plus :data:`OUTPUT_COLUMNS`, whichever backend runs:

- ``hf``: Hugging Face ``generate`` (batched, KV cache, left padding) in an autoscaling Ray
  Data actor pool, CPU or GPU (:mod:`kalm_ray.llm.imagine.backends.hf`);
- ``vllm``: ``ray.data.llm``'s vLLM engine processor, GPU
  (:mod:`kalm_ray.llm.imagine.backends.vllm`).

:func:`resolve_backend` turns the config's choice (``auto``/``hf``/``vllm``) into one of
these, failing with one line (:class:`BackendUnavailable`) before any work when vLLM is
asked for where it cannot run.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kalm_ray.errors import BackendUnavailable
from kalm_ray.raysetup import gpu_visible

if TYPE_CHECKING:
    import ray.data

    from kalm_ray.config import ImagineConfig

BACKENDS: tuple[str, ...] = ("hf", "vllm")
OUTPUT_COLUMNS: tuple[str, ...] = ("generated_text", "num_generated_tokens", "num_input_tokens")
"""Columns every backend adds: the text after the prompt (up to and including the end
token when one was generated), and the generated/prompt token counts."""


@dataclass(frozen=True)
class GenerationSpec:
    """What every backend needs to know about one generation run.

    Attributes:
        model_dir: the grounded model folder (``run_dir/model``), local path or URI.
        max_new_tokens: token budget per request (codec step size x (max_steps + 1) + 1, so a
            rollout longer than the limit is seen as such, not cut silently).
        end_token: the codec's end-of-trajectory token; generation of a request stops there.
        temperature: 0 = greedy.
        top_p: nucleus mass when sampling.
        loader: ``module:function`` that loads ``(model, tokenizer, ...)`` from ``model_dir``
            (hf backend; tests point it at a plain Hugging Face folder loader).
        lora_rank: largest LoRA rank of the adapter (vllm ``max_lora_rank``).
        codec_tokens: every token string of the codec; when given, the hf backend stops a
            request at its first generated token that is none of these (nor whitespace): the
            text is already unparseable, so the filter's verdict is the same, and a batch of
            bad requests does not run to the token budget.
        grammar: constrain every generated position to the codec's grammar
            (:mod:`kalm_ray.llm.grammar`); the requests then need ``start_state`` (and
            ``level`` for per-level step limits).
        max_steps: steps a rollout may have (the grammar forces the end token there).
        level_max_steps: ``(level, steps)`` pairs for levels with their own limit (CLEVR
            ``easy``: one push; with ``compose``, ``max_steps`` per part of the level's goals).
        mode: ``rollout`` (the model continues the rollout prompt to the end token) or
            ``stepwise`` (policy prompt for each action, dynamics prompt for each next state;
            hf backend, :mod:`kalm_ray.llm.imagine.backends.stepwise`).
        env: the suite's name (``stepwise`` stops a request once its goal holds).
        candidates: ``stepwise``: rollouts per request, the shortest to its goal kept.
        compose: ``stepwise``: goals made of several training goals are imagined part by part
            (``imagine.compose``); ``max_steps`` is then the budget of each part.
        limits: ``stepwise``: the validity filter's limits; a rollout stops at its first
            step the filter would reject.
        state_retries, state_temperature: ``stepwise``: a next state the filter would reject
            is sampled again (at this temperature) up to this many times.
        action_retries: ``stepwise``: a step still rejected is imagined again with a newly
            sampled action up to this many times.
        consistency_draws, consistency_min: ``stepwise``: a success holds up when at least
            ``consistency_min`` of this many sampled re-imaginings of its actions also reach
            the goal; a request with none that does is ``doubtful`` (0 draws: no check).
    """

    model_dir: str
    max_new_tokens: int
    end_token: str
    temperature: float = 0.0
    top_p: float = 1.0
    loader: str = "kalm_ray.llm.model:load_grounded"
    lora_rank: int = 16
    codec_tokens: tuple[str, ...] = ()
    grammar: bool = True
    max_steps: int = 50
    level_max_steps: tuple[tuple[str, int], ...] = ()
    mode: str = "rollout"
    env: str = ""
    candidates: int = 1
    compose: bool = False
    limits: Any = None
    state_retries: int = 0
    state_temperature: float = 0.7
    action_retries: int = 0
    consistency_draws: int = 0
    consistency_min: float = 0.5

    def steps_for(self, level: str | None) -> int:
        """The step limit of a request of ``level``."""
        return dict(self.level_max_steps).get(level, self.max_steps)


def vllm_missing(*, gpus_on_demand: bool = False) -> str | None:
    """Why vLLM cannot run here (one phrase), or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install 'kalm_ray[gpu]')"
    if not gpu_visible(on_demand=gpus_on_demand):
        return (
            "no GPU is visible (none in the Ray cluster, none in its autoscaler's node types, "
            "none on this host; set ray.gpus_on_demand: true if GPU nodes come on demand)"
        )
    return None


def resolve_backend(choice: str, *, gpus_on_demand: bool = False, mode: str = "rollout") -> str:
    """``auto``/``hf``/``vllm`` -> ``hf`` or ``vllm``; ``auto`` picks vLLM when it can run,
    except under ``imagine.mode: stepwise``, which runs on hf only (the config refuses
    ``vllm`` with it; ``auto`` on a GPU host with vLLM must not fail after hours of grounding).

    ``auto`` falling back to ``hf`` where GPUs are to be had (vLLM not installed) says so
    in a warning: the hf pool then runs wherever ``imagine.num_gpus_per_actor`` puts it.

    Raises:
        BackendUnavailable: ``vllm`` was chosen and cannot run here.
    """
    if choice == "hf" or (choice == "auto" and mode == "stepwise"):
        return "hf"
    why = vllm_missing(gpus_on_demand=gpus_on_demand)
    if choice == "vllm":
        if why:
            raise BackendUnavailable(
                f"imagine.backend: vllm cannot run here: {why}; use imagine.backend: hf (or auto)"
            )
        return "vllm"
    if choice == "auto":
        if why and gpu_visible(on_demand=gpus_on_demand):
            logging.getLogger("kalm_ray").warning(
                "imagine.backend auto: GPUs are available but %s; using the hf backend", why
            )
        return "hf" if why else "vllm"
    raise BackendUnavailable(
        f"imagine.backend: unknown backend {choice!r}; valid: auto, {', '.join(BACKENDS)}"
    )


def generate(
    ds: ray.data.Dataset, *, backend: str, spec: GenerationSpec, icfg: ImagineConfig
) -> ray.data.Dataset:
    """Lazy generation over the requests dataset with the chosen backend."""
    if backend == "hf":
        from kalm_ray.llm.imagine.backends.hf import generate_hf

        return generate_hf(ds, spec=spec, icfg=icfg)
    if backend == "vllm":
        from kalm_ray.llm.imagine.backends.vllm import generate_vllm

        return generate_vllm(ds, spec=spec, icfg=icfg)
    raise BackendUnavailable(
        f"imagine.backend: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}"
    )
