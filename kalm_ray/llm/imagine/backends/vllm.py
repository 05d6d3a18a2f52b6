"""The ``vllm`` backend: ``ray.data.llm``'s vLLM engine processor (GPU).

The processor config is built from our :class:`~kalm_ray.config.ImagineConfig` by
:func:`processor_config` (constructible without vLLM installed; only building and running
the processor import it). Prompts are raw text (no chat template): the codec's tokens are
the model's vocabulary, and the prompt is exactly what grounding trained on. A LoRA adapter
is served per request (``model`` column = the adapter folder, vLLM ``enable_lora``) unless
the model folder holds a merged model, which then is the ``model_source``.

Output columns are the hf backend's: ``generated_text`` (up to and including the end token),
``num_generated_tokens``, ``num_input_tokens``, with the request columns kept. Our
``request_id`` crosses the engine stage as :data:`ID_COLUMN` (the stage overwrites
``request_id`` with its own counter) and is restored by the postprocess.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from kalm_ray.llm.imagine.backends import GenerationSpec
from kalm_ray.llm.imagine.requests import REQUEST_COLUMNS

if TYPE_CHECKING:
    import ray.data
    from ray.data.llm import vLLMEngineProcessorConfig

    from kalm_ray.config import ImagineConfig

ID_COLUMN = "kalm_request_id"
"""Our string ``request_id``, carried through ``ray.data.llm`` under a name Ray does not write.

NOTE: Ray 2.60's ``vLLMEngineStageUDF`` puts each engine replica's integer counter into every
output row as ``request_id`` and the stage base ``update()``s the input row with it, so over
two replicas our ids came back as 0, 1, 0, 1 (rows then dropped as duplicates downstream)."""


VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``max_lora_rank`` (its ``LoRAConfig`` refuses any other)."""


def vllm_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves an adapter of rank ``r``.

    Raises:
        ValueError: ``r`` is above vLLM's largest (512).
    """
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def engine_kwargs(icfg: ImagineConfig, *, adapter: str | None, lora_rank: int) -> dict[str, Any]:
    """``vllm.AsyncEngineArgs`` for our runs; ``icfg.vllm_engine_kwargs`` wins on every key."""
    kw: dict[str, Any] = {"enable_prefix_caching": True, "dtype": "auto"}
    if adapter is not None:
        # NOTE: vLLM accepts only VLLM_LORA_RANKS as max_lora_rank; r=12 is served at 16.
        kw.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=1)
    kw.update(icfg.vllm_engine_kwargs)
    return kw


def sampling_params(spec: GenerationSpec, seed: int) -> dict[str, Any]:
    """Per-request ``vllm.SamplingParams`` matching the hf backend's stopping and output text."""
    params: dict[str, Any] = {
        "max_tokens": spec.max_new_tokens,
        "temperature": spec.temperature,
        "seed": int(seed),
        "stop": [spec.end_token],
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }
    if spec.temperature > 0:
        params["top_p"] = spec.top_p
    return params


def processor_config(
    icfg: ImagineConfig, *, spec: GenerationSpec, model_source: str, adapter: str | None
) -> vLLMEngineProcessorConfig:
    """The ``vLLMEngineProcessorConfig`` for a run (no vLLM import needed)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=engine_kwargs(icfg, adapter=adapter, lora_rank=spec.lora_rank),
        concurrency=(icfg.min_actors, icfg.max_actors),  # autoscaling pool of engine replicas
        batch_size=icfg.batch_size,
        accelerator_type=icfg.accelerator_type,
        chat_template_stage=False,
        tokenize_stage=False,  # the engine tokenizes the raw prompt itself
        detokenize_stage=False,  # the engine already detokenizes (SamplingParams.detokenize)
    )


def _pre(row: dict[str, Any], *, spec: GenerationSpec, adapter: str | None) -> dict[str, Any]:
    out = dict(row)
    out[ID_COLUMN] = row["request_id"]
    out["sampling_params"] = sampling_params(spec, row["seed"])
    if adapter is not None:
        out["model"] = adapter  # differs from model_source: a LoRA request
    return out


def _post(row: dict[str, Any]) -> dict[str, Any]:
    out = {c: row[c] for c in REQUEST_COLUMNS if c in row}
    out["request_id"] = row[ID_COLUMN]  # the engine's own counter replaced it (ID_COLUMN)
    out["generated_text"] = row.get("generated_text") or ""
    out["num_generated_tokens"] = int(row.get("num_generated_tokens") or 0)
    out["num_input_tokens"] = int(row.get("num_input_tokens") or 0)
    return out


def model_paths(model_dir: str) -> tuple[str, str | None]:
    """``(model_source, adapter or None)`` of the grounded model folder, for vLLM."""
    from kalm_ray.llm.model import model_files

    files = model_files(model_dir)
    adapter = files.get("adapter")
    source = files.get("merged") or files.get("base") or files.get("model")
    if source is None:
        raise KeyError(f"model_files({model_dir!r}) names no base or merged model: {files}")
    return str(source), (str(adapter) if adapter and not files.get("merged") else None)


def generate_vllm(
    ds: ray.data.Dataset, *, spec: GenerationSpec, icfg: ImagineConfig
) -> ray.data.Dataset:
    """The requests dataset through ``ray.data.llm``'s vLLM processor (lazy)."""
    from ray.data.llm import build_processor

    source, adapter = model_paths(spec.model_dir)
    if adapter is not None and "://" in adapter:
        from kalm_ray.errors import BackendUnavailable

        # NOTE: ray.data.llm refuses a remote per-request LoRA path (it wants a local path or
        # dynamic_lora_loading_path); a merged model as model_source may be a URI.
        raise BackendUnavailable(
            f"{adapter}: the vllm backend cannot serve a LoRA adapter from a remote run_dir; "
            "keep ground.train_codec_embeddings on (a merged model) or use a shared filesystem"
        )
    config = processor_config(icfg, spec=spec, model_source=source, adapter=adapter)
    processor = build_processor(
        config, preprocess=partial(_pre, spec=spec, adapter=adapter), postprocess=_post
    )
    return processor(ds)
