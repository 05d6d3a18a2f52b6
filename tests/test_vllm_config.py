"""The vllm backend's processor config is built from our config; vLLM itself is not needed."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from kalm_ray import raysetup
from kalm_ray.config import ImagineConfig, RayConfig
from kalm_ray.errors import BackendUnavailable
from kalm_ray.llm.imagine import backends
from kalm_ray.llm.imagine.backends import GenerationSpec, resolve_backend
from kalm_ray.llm.imagine.backends import vllm as vb

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
    # What Ray's engine stage hands the postprocess: its own integer request_id over ours.
    post = vb._post(
        {
            **pre,
            "request_id": 0,
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
    monkeypatch.setattr(backends, "vllm_missing", lambda **_: "no GPU is visible")
    with pytest.raises(BackendUnavailable) as e:
        resolve_backend("vllm")
    assert "\n" not in str(e.value) and "imagine.backend" in str(e.value)
    assert resolve_backend("auto") == "hf"
    assert resolve_backend("hf") == "hf"


def test_auto_picks_vllm_when_it_can_run(monkeypatch):
    monkeypatch.setattr(backends, "vllm_missing", lambda **_: None)
    assert resolve_backend("auto") == "vllm"
    assert resolve_backend("vllm") == "vllm"
    assert resolve_backend("hf") == "hf"
    # Step-by-step imagination runs on hf only: `auto` must not pick vLLM for it and fail
    # in the imagine stage after collect and ground have run (the config refuses `vllm`).
    assert resolve_backend("auto", mode="stepwise") == "hf"


def test_vllm_missing_names_the_cause(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a)
    )
    assert "not installed" in backends.vllm_missing()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "vllm" else real(n, *a)
    )
    monkeypatch.setattr(backends, "gpu_visible", lambda **_: False)
    assert "GPU" in backends.vllm_missing()


def _vllm_importable(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "vllm" else real(n, *a)
    )


def test_gpus_of_autoscaler_node_types_count(ray_local, monkeypatch):
    """Issue 16 point 3: a cluster whose GPU group is at zero (no GPU in
    ``ray.cluster_resources()``) but whose autoscaler declares GPU node types can run vLLM."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    _vllm_importable(monkeypatch)
    assert ray_local.cluster_resources().get("GPU", 0) == 0
    assert not raysetup.gpu_visible() and resolve_backend("auto") == "hf"
    # What the autoscaler reports to the GCS: a CPU group and a GPU group, both at zero now.
    declared = autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 8}, max_count=4),
            autoscaler_pb2.NodeGroupConfig(
                name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=4
            ),
        ]
    )
    key, ns = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    internal_kv._internal_kv_put(key, declared.SerializeToString(), namespace=ns)
    try:
        assert raysetup.autoscaler_gpus() == 4
        assert raysetup.gpu_visible()
        assert resolve_backend("vllm") == "vllm" and resolve_backend("auto") == "vllm"
    finally:
        internal_kv._internal_kv_del(key, namespace=ns)  # the session's cluster is shared
    assert raysetup.autoscaler_gpus() == 0


def test_gpus_on_demand_flag(monkeypatch):
    """``ray.gpus_on_demand`` for autoscalers that report no node types: vLLM is not refused
    and ``auto`` does not fall back to hf on CPU."""
    _vllm_importable(monkeypatch)
    monkeypatch.setattr(raysetup, "autoscaler_gpus", lambda: 0)
    assert raysetup.gpu_visible(on_demand=True)
    assert resolve_backend("vllm", gpus_on_demand=True) == "vllm"
    assert resolve_backend("auto", gpus_on_demand=True) == "vllm"
    # On a cluster, GPU work waits for its nodes; without the flag it is refused in one line.
    cluster = RayConfig(address="ray://head:10001", gpus_on_demand=True)
    raysetup.require_resources("ground.use_gpu", {"GPU": 4}, cluster)
    with pytest.raises(BackendUnavailable, match="ground.use_gpu asks for GPUs"):
        raysetup.require_resources("ground.use_gpu", {"GPU": 4}, RayConfig(address="ray://h:1"))
    assert RayConfig(gpus_on_demand=True).gpus_on_demand and not RayConfig().gpus_on_demand


def test_a_local_ray_counts_the_gpus_asked_for(tmp_path):
    """Two workers of one GPU each on a local Ray of one: Ray would queue the second forever.
    Its own Ray (in a child process, the session's has none) advertises one GPU, which Ray
    lets a CPU machine do; counting needs no device."""
    import os
    import subprocess

    code = (
        "import ray\n"
        "from kalm_ray.config import RayConfig\n"
        "from kalm_ray.errors import InputError\n"
        "from kalm_ray.raysetup import require_resources\n"
        "ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)\n"
        "require_resources('ground.num_workers', {'CPU': 2, 'GPU': 1}, RayConfig())\n"
        "try:\n"
        "    require_resources('ground.num_workers', {'CPU': 2, 'GPU': 2}, RayConfig())\n"
        "except InputError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "ground.num_workers: needs 2 GPUs at once, but this local Ray has 1; lower it"
    )


@pytest.mark.gpu
def test_vllm_processor_runs_on_gpu(ray_local, tmp_path):
    """Builds and runs the processor on a tiny local model (needs vLLM and a GPU)."""
    pytest.importorskip("vllm")
    import ray
    from helpers import END, save_tiny_model  # tests/ is on sys.path (rootdir conftest)

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


# ---- Ray's real vLLM engine stage, with a stand-in engine ----------------------------------

# FAKE: only vLLM's engine (and the few vllm names Ray's stage imports) is a stand-in; the
# processor, the stage UDF with its request counter and row merging, the actor pool and our
# pre/post functions are Ray's and ours, unchanged. It answers each prompt with
# "<prompt>|<pid>", so a row's text shows which request and which replica it came from.
_STUB_VLLM = {
    "__init__.py": '''
import asyncio, os, types
from vllm import inputs, lora, outputs, sampling_params, v1  # noqa: F401

class SamplingParams:
    def __init__(self, structured_outputs=None, **kw):
        self.kw = kw

class PoolingParams(SamplingParams):
    pass

class AsyncEngineArgs:
    def __init__(self, **kw):
        self.kw = kw

    def create_engine_config(self):
        return types.SimpleNamespace(
            scheduler_config=types.SimpleNamespace(max_num_seqs=4),
            parallel_config=types.SimpleNamespace(pipeline_parallel_size=1),
        )

class _Engine:
    async def generate(self, request_id, prompt, sampling_params, lora_request=None):
        # Hold the first batch until both replicas are up, so that both get work.
        for _ in range(1200):
            if len(os.listdir(os.environ["STUB_VLLM_REPLICAS"])) >= 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.05 * (1 + int(request_id) % 3))  # finish out of order
        text = f"{prompt['prompt']}|{os.getpid()}"
        yield outputs.RequestOutput(
            prompt=prompt["prompt"], prompt_token_ids=[1, 2, 3], finished=True,
            outputs=[outputs.CompletionOutput(text=text, token_ids=[7, 8])],
        )

    async def do_log_stats(self):
        pass

    def shutdown(self):
        pass

class AsyncLLMEngine:
    @staticmethod
    def from_engine_args(engine_args, stat_loggers=None):
        open(os.path.join(os.environ["STUB_VLLM_REPLICAS"], str(os.getpid())), "w").close()
        return _Engine()
''',
    "outputs.py": '''
class CompletionOutput:
    def __init__(self, text, token_ids):
        self.text, self.token_ids, self.logprobs = text, token_ids, None

class RequestOutput:
    def __init__(self, prompt, prompt_token_ids, finished, outputs):
        self.prompt, self.prompt_token_ids, self.finished = prompt, prompt_token_ids, finished
        self.outputs, self.metrics, self.prompt_logprobs = outputs, None, None

class PoolingRequestOutput:
    pass
''',
    "inputs/__init__.py": '''
def TextPrompt(**kw):
    return dict(kw)

def TokensPrompt(**kw):
    return dict(kw)
''',
    "sampling_params.py": "class StructuredOutputsParams:\n    pass\n",
    "lora/__init__.py": "from vllm.lora import request  # noqa: F401\n",
    "lora/request.py": "class LoRARequest:\n    def __init__(self, **kw):\n        self.kw = kw\n",
    "v1/__init__.py": "",
    "v1/metrics/__init__.py": "",
    "v1/metrics/ray_wrappers.py": "class RayPrometheusStatLogger:\n    pass\n",
}


def _write_stub_vllm(root) -> str:
    """The stub as a ``vllm`` package under ``root``; returns ``root`` (for PYTHONPATH)."""
    for name, text in _STUB_VLLM.items():
        (root / "vllm" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "vllm" / name).write_text(text)
    return str(root)


def test_request_ids_survive_rays_vllm_stage_over_two_replicas(ray_local, tmp_path, monkeypatch):
    """Issue 16 point 1: Ray's vLLMEngineStageUDF overwrites ``request_id`` with each replica's
    counter (0, 1, 0, 1, ...); every one of our string ids must come back, on its own row."""
    import numpy as np
    import pyarrow as pa
    from transformers import LlamaConfig

    from kalm_ray.llm.imagine.requests import requests_dataset

    model_dir = tmp_path / "model"  # only its config.json is read (Ray's telemetry)
    LlamaConfig(
        vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=2
    ).save_pretrained(model_dir)
    stub = _write_stub_vllm(tmp_path / "stub")
    replicas = tmp_path / "replicas"
    replicas.mkdir()
    real_config = vb.processor_config

    def on_cpus(*args, **kwargs):
        # The stub engine needs no GPU: one CPU per replica, and the stub on its workers only.
        cfg = real_config(*args, **kwargs)
        return type(cfg)(
            **{
                **{k: getattr(cfg, k) for k in type(cfg).model_fields if k in cfg.model_fields_set},
                "placement_group_config": {"bundles": [{"CPU": 1}]},
                # A task-level runtime_env cannot upload a folder; the path is local anyway.
                "runtime_env": {
                    "env_vars": {"PYTHONPATH": stub, "STUB_VLLM_REPLICAS": str(replicas)}
                },
                # One batch at a time per replica: the second replica gets the next one.
                "max_concurrent_batches": 1,
                "max_tasks_in_flight_per_actor": 1,
            }
        )

    monkeypatch.setattr(vb, "processor_config", on_cpus)
    n = 12
    table = pa.table(
        {
            "request_id": [f"easy-{i:06d}" for i in range(n)],
            "level": ["easy"] * n,
            "task": ["a"] * n,
            "instruction": ["i"] * n,
            "start_state": pa.array([[0.0, 1.0]] * n, pa.list_(pa.float32(), 2)),
            "seed": pa.array(np.arange(n), pa.int64()),
            "prompt": [f"prompt {i}" for i in range(n)],
        }
    )
    icfg = ImagineConfig(backend="vllm", batch_size=2, min_actors=2, max_actors=2)
    spec = GenerationSpec(model_dir=str(model_dir), max_new_tokens=4, end_token="<eot>")
    rows = vb.generate_vllm(requests_dataset(table, rows_per_block=2), spec=spec, icfg=icfg)
    rows = rows.take_all()

    assert sorted(r["request_id"] for r in rows) == table["request_id"].to_pylist()
    by_id = {r["request_id"]: r for r in rows}
    for i in range(n):
        text, _, pid = by_id[f"easy-{i:06d}"]["generated_text"].partition("|")
        assert text == f"prompt {i}" and pid  # each id on its own request's output
    assert len({r["generated_text"].partition("|")[2] for r in rows}) == 2  # both replicas ran
    assert set(rows[0]) == {*table.column_names, "generated_text", "num_generated_tokens",
                            "num_input_tokens"}
