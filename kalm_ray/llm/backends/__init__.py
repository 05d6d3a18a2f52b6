"""Generation backends behind one interface.

``generate(ds, backend=..., spec=..., icfg=...)`` takes the requests dataset
(:data:`kalm_ray.llm.requests.REQUEST_COLUMNS`) and returns a lazy dataset with the same
columns plus :data:`OUTPUT_COLUMNS`, whichever backend runs:

- ``hf``: Hugging Face ``generate`` (batched, KV cache, left padding) in an autoscaling Ray
  Data actor pool, CPU or GPU (:mod:`kalm_ray.llm.backends.hf`);
- ``vllm``: ``ray.data.llm``'s vLLM engine processor, GPU (:mod:`kalm_ray.llm.backends.vllm`).

:func:`resolve_backend` turns the config's choice (``auto``/``hf``/``vllm``) into one of
these, failing with one line (:class:`BackendUnavailable`) before any work when vLLM is
asked for where it cannot run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kalm_ray.errors import BackendUnavailable

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
    """

    model_dir: str
    max_new_tokens: int
    end_token: str
    temperature: float = 0.0
    top_p: float = 1.0
    loader: str = "kalm_ray.llm.model:load_grounded"
    lora_rank: int = 16
    codec_tokens: tuple[str, ...] = ()


def gpu_visible() -> bool:
    """Whether a GPU is there to use: in the Ray cluster when Ray is up, else on this host."""
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except ImportError:
        pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def vllm_missing() -> str | None:
    """Why vLLM cannot run here (one phrase), or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install 'kalm_ray[gpu]')"
    if not gpu_visible():
        return "no GPU is visible (neither in the Ray cluster nor on this host)"
    return None


def resolve_backend(choice: str) -> str:
    """``auto``/``hf``/``vllm`` -> ``hf`` or ``vllm``; ``auto`` picks vLLM when it can run.

    Raises:
        BackendUnavailable: ``vllm`` was chosen and cannot run here.
    """
    if choice == "hf":
        return "hf"
    why = vllm_missing()
    if choice == "vllm":
        if why:
            raise BackendUnavailable(
                f"imagine.backend: vllm cannot run here: {why}; use imagine.backend: hf (or auto)"
            )
        return "vllm"
    if choice == "auto":
        return "hf" if why else "vllm"
    raise BackendUnavailable(
        f"imagine.backend: unknown backend {choice!r}; valid: auto, {', '.join(BACKENDS)}"
    )


def generate(
    ds: ray.data.Dataset, *, backend: str, spec: GenerationSpec, icfg: ImagineConfig
) -> ray.data.Dataset:
    """Lazy generation over the requests dataset with the chosen backend."""
    if backend == "hf":
        from kalm_ray.llm.backends.hf import generate_hf

        return generate_hf(ds, spec=spec, icfg=icfg)
    if backend == "vllm":
        from kalm_ray.llm.backends.vllm import generate_vllm

        return generate_vllm(ds, spec=spec, icfg=icfg)
    raise BackendUnavailable(
        f"imagine.backend: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}"
    )
