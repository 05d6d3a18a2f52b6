"""The vllm backend's processor config is built from our config; vLLM itself is not needed."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from kalm_ray.config import ImagineConfig
from kalm_ray.errors import BackendUnavailable
from kalm_ray.llm import backends
from kalm_ray.llm.backends import GenerationSpec, resolve_backend
from kalm_ray.llm.backends import vllm as vb

SPEC = GenerationSpec(
    model_dir="/runs/x/model",
    max_new_tokens=221,
    end_token="<eot>",
    temperature=0.0,
    top_p=0.9,
    lora_rank=8,
)


def test_processor_config_from_our_config():
    icfg = ImagineConfig(
        backend="vllm",
        min_actors=2,
        max_actors=6,
        batch_size=48,
        accelerator_type="L4",
        vllm_engine_kwargs={"max_model_len": 2048},
    )
    cfg = vb.processor_config(
        icfg, spec=SPEC, model_source="/runs/x/model/base", adapter="/runs/x/model/adapter"
    )
    assert cfg.model_source == "/runs/x/model/base"
    assert cfg.concurrency == (2, 6) and cfg.batch_size == 48 and cfg.accelerator_type == "L4"
    kw = cfg.engine_kwargs
    assert kw["enable_lora"] is True and kw["max_lora_rank"] == 8 and kw["max_loras"] == 1
    assert kw["max_model_len"] == 2048 and kw["enable_prefix_caching"] is True
    assert cfg.get_concurrency(autoscaling_enabled=True) == {"min_size": 2, "max_size": 6}
    # Raw prompts: no chat template; the engine tokenizes and detokenizes itself.
    for stage in (cfg.chat_template_stage, cfg.tokenize_stage, cfg.detokenize_stage):
        assert stage is False or getattr(stage, "enabled", True) is False


def test_merged_model_needs_no_lora_and_user_kwargs_win():
    icfg = ImagineConfig(
        vllm_engine_kwargs={"enable_prefix_caching": False, "tensor_parallel_size": 2}
    )
    cfg = vb.processor_config(icfg, spec=SPEC, model_source="/m/merged", adapter=None)
    assert "enable_lora" not in cfg.engine_kwargs
    assert cfg.engine_kwargs["enable_prefix_caching"] is False
    assert cfg.engine_kwargs["tensor_parallel_size"] == 2
    assert cfg.concurrency == (1, 2)


def test_sampling_params_and_row_functions():
    p = vb.sampling_params(SPEC, 123)
    assert p["max_tokens"] == 221 and p["seed"] == 123 and p["temperature"] == 0.0
    assert (
        p["stop"] == ["<eot>"] and p["include_stop_str_in_output"] and not p["skip_special_tokens"]
    )
    assert "top_p" not in p  # greedy
    sampled = GenerationSpec(
        model_dir="m", max_new_tokens=5, end_token="e", temperature=0.7, top_p=0.9
    )
    assert vb.sampling_params(sampled, 1)["top_p"] == 0.9

    row = {"request_id": "easy-000001", "prompt": "p", "seed": 7, "level": "easy"}
    pre = vb._pre(row, spec=SPEC, adapter="/a")
    assert pre["model"] == "/a" and pre["sampling_params"]["seed"] == 7 and pre["prompt"] == "p"
    assert "model" not in vb._pre(row, spec=SPEC, adapter=None)
    post = vb._post(
        {
            **pre,
            "generated_text": "t",
            "num_generated_tokens": 3,
            "num_input_tokens": 9,
            "generated_tokens": [1, 2, 3],
            "params": "x",
            "time_taken_llm": 0.1,
        }
    )
    assert post == {
        "request_id": "easy-000001",
        "level": "easy",
        "prompt": "p",
        "seed": 7,
        "generated_text": "t",
        "num_generated_tokens": 3,
        "num_input_tokens": 9,
    }


def test_model_paths(monkeypatch):
    fake = types.ModuleType("kalm_ray.llm.model")
    monkeypatch.setitem(sys.modules, "kalm_ray.llm.model", fake)
    fake.model_files = lambda d: {"base": f"{d}/base", "adapter": f"{d}/adapter"}
    assert vb.model_paths("/m") == ("/m/base", "/m/adapter")
    fake.model_files = lambda d: {"base": f"{d}/base", "merged": f"{d}/merged", "adapter": f"{d}/a"}
    assert vb.model_paths("/m") == ("/m/merged", None)
    fake.model_files = lambda d: {"base": f"{d}/hf", "adapter": None}
    assert vb.model_paths("/m") == ("/m/hf", None)


def test_vllm_unavailable_fails_with_one_line(monkeypatch):
    monkeypatch.setattr(backends, "vllm_missing", lambda: "no GPU is visible")
    with pytest.raises(BackendUnavailable) as e:
        resolve_backend("vllm")
    assert "\n" not in str(e.value) and "imagine.backend" in str(e.value)
    assert resolve_backend("auto") == "hf"
    assert resolve_backend("hf") == "hf"


def test_auto_picks_vllm_when_it_can_run(monkeypatch):
    monkeypatch.setattr(backends, "vllm_missing", lambda: None)
    assert resolve_backend("auto") == "vllm"
    assert resolve_backend("vllm") == "vllm"
    assert resolve_backend("hf") == "hf"


def test_vllm_missing_names_the_cause(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a)
    )
    assert "not installed" in backends.vllm_missing()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "vllm" else real(n, *a)
    )
    monkeypatch.setattr(backends, "gpu_visible", lambda: False)
    assert "GPU" in backends.vllm_missing()


@pytest.mark.gpu
def test_vllm_processor_runs_on_gpu(ray_local, tmp_path):
    """Builds and runs the processor on a tiny local model (needs vLLM and a GPU)."""
    pytest.importorskip("vllm")
    import ray
    from test_imagine import END, save_tiny_model  # tests/ is on sys.path (rootdir conftest)

    model_dir = save_tiny_model(tmp_path / "m", hidden=128, heads=2)  # head_dim 64 for vLLM kernels
    icfg = ImagineConfig(
        backend="vllm",
        batch_size=4,
        min_actors=1,
        max_actors=1,
        vllm_engine_kwargs={"max_model_len": 256, "gpu_memory_utilization": 0.3},
    )
    spec = GenerationSpec(model_dir=str(model_dir), max_new_tokens=16, end_token=END)
    cfg = vb.processor_config(icfg, spec=spec, model_source=str(model_dir), adapter=None)
    from functools import partial

    from ray.data.llm import build_processor

    proc = build_processor(
        cfg, preprocess=partial(vb._pre, spec=spec, adapter=None), postprocess=vb._post
    )
    ds = ray.data.from_items(
        [{"request_id": str(i), "prompt": "go w1 w2", "seed": i} for i in range(8)]
    )
    rows = proc(ds).take_all()
    assert len(rows) == 8 and all(isinstance(r["generated_text"], str) for r in rows)
    assert all(0 < r["num_generated_tokens"] <= 16 for r in rows)
