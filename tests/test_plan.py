"""``kalm plan``: the paper-scale configs fit, and what cannot fit or run is refused in one line
naming the key (issue 16 points 2, 4, 6, 7 and the plan itself); ``kalm submit`` refuses the
same before reaching a cluster. No Ray is started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kalm_ray.cli import main
from kalm_ray.config import load_config
from kalm_ray.errors import BackendUnavailable, InputError
from kalm_ray.plan import GIB, KNOWN_MODELS, grounding_memory, make_plan, model_facts

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, base: str, **changes) -> str:
    """``configs/<base>.yaml`` with dotted-key ``changes`` (``imagine.max_steps=150``)."""
    data = yaml.safe_load((ROOT / "configs" / f"{base}.yaml").read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / f"{base}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _refused(capsys, path: str) -> str:
    assert main(["plan", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("kalm: error: ")
    return err


@pytest.mark.parametrize("name", ["clevr", "metaworld", "quick", "cpu", "metaworld_quick"])
def test_shipped_configs_plan_ok(name, capsys):
    assert main(["plan", str(ROOT / "configs" / f"{name}.yaml")]) == 0
    out = capsys.readouterr().out
    for head in ("runtime_env", "model", "collect", "ground", "imagine", "train", "evaluate"):
        assert f"\n{head} " in f"\n{out}"
    assert "verdict     ok" in out
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    # The GPU memory limit is named where the grounding runs on GPUs only.
    assert ("ground.gpu_memory_gib" in out) == cfg.ground.use_gpu
    # vLLM decodes unconstrained, and the plan says so where it may run.
    assert ("vLLM decodes without imagine.grammar" in out) == (cfg.imagine.backend != "hf")


def test_gpu_configs_ship_the_gpu_runtime_env_and_fit_llama2():
    for name in ("clevr", "metaworld"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.ray.runtime_env == "jobs/runtime_env_gpu.yaml" and cfg.ray.gpus_on_demand
        text = "\n".join(make_plan(cfg).lines)
        assert "(CUDA)" in text and "vllm==" in text and "HF_HUB_OFFLINE=unset" in text
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env_gpu.yaml").read_text())
    assert "HF_HUB_OFFLINE" not in (env.get("env_vars") or {})


def test_max_model_len_above_the_context_is_refused(tmp_path, capsys):
    cfg = _config(tmp_path, "metaworld", **{"imagine.vllm_engine_kwargs": {"max_model_len": 8192}})
    err = _refused(capsys, cfg)
    assert "imagine.vllm_engine_kwargs.max_model_len" in err and "4096" in err


def test_metaworld_rollouts_over_the_context_are_refused(tmp_path, capsys):
    """Point 6: up to 49 tokens a step (compact delta steps) x 151 steps do not fit
    Llama-2's 4,096 positions."""
    err = _refused(capsys, _config(tmp_path, "metaworld", **{"imagine.max_steps": 150}))
    assert "imagine.max_steps" in err and "at most 80 steps fit" in err


def test_use_gpu_with_the_cpu_runtime_env_is_refused(tmp_path, capsys):
    """Point 2."""
    err = _refused(
        capsys, _config(tmp_path, "clevr", **{"ray.runtime_env": "jobs/runtime_env.yaml"})
    )
    assert "ray.runtime_env" in err and "CPU-only torch" in err


def test_vllm_backend_without_vllm_in_the_runtime_env_is_refused(tmp_path, capsys):
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env_gpu.yaml").read_text())
    env["pip"]["packages"] = [p for p in env["pip"]["packages"] if not p.startswith("vllm")]
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(env))
    err = _refused(
        capsys, _config(tmp_path, "clevr", **{"ray.runtime_env": str(tmp_path / "env.yaml")})
    )
    assert "imagine.backend" in err and "no vllm" in err


def test_lora_ranks_vllm_cannot_serve_are_refused(tmp_path, capsys):
    """Point 7: vLLM's max_lora_rank is one of 1, 8, ..., 512; r is served at the next one."""
    from kalm_ray.config import ImagineConfig
    from kalm_ray.llm.imagine.backends.vllm import engine_kwargs, vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 4, 12, 16, 300, 512)] == [1, 8, 16, 16, 320, 512]
    assert engine_kwargs(ImagineConfig(), adapter="/a", lora_rank=12)["max_lora_rank"] == 16
    err = _refused(capsys, _config(tmp_path, "clevr", **{"ground.lora.r": 600}))
    assert "ground.lora.r" in err and "512" in err
    bad = {"max_model_len": 4096, "max_lora_rank": 12}
    err = _refused(capsys, _config(tmp_path, "clevr", **{"imagine.vllm_engine_kwargs": bad}))
    assert "imagine.vllm_engine_kwargs.max_lora_rank" in err


def test_full_fine_tuning_that_does_not_fit_is_refused(tmp_path, capsys):
    """Point 4: DDP full fine-tuning keeps 16 bytes a parameter on every GPU (~100 GiB for 7B)."""
    err = _refused(capsys, _config(tmp_path, "clevr", **{"ground.method": "full"}))
    assert "ground.method" in err and "method: lora" in err
    cfg = load_config(_config(tmp_path, "clevr", **{"ground.method": "full"}))
    mem = grounding_memory(cfg, model_facts(cfg.ground.model.name), codec_tokens=297)
    assert 16 * 6.7e9 < mem["parts"]["weights"] + mem["parts"]["grads"] + mem["parts"]["adamw"]
    assert mem["total"] > 100 * GIB


def test_lora_memory_counts_activations_not_weights_alone(tmp_path):
    cfg = load_config(ROOT / "configs" / "metaworld.yaml")
    model = model_facts(cfg.ground.model.name)
    on = grounding_memory(cfg, model, codec_tokens=272)
    assert on["checkpointing"] and 20 * GIB < on["total"] < cfg.ground.gpu_memory_gib * GIB
    off = load_config(_config(tmp_path, "metaworld", **{"ground.gradient_checkpointing": False}))
    assert grounding_memory(off, model, codec_tokens=272)["total"] > on["total"] + 50 * GIB


def test_max_seq_len_above_the_context_is_refused(tmp_path, capsys):
    err = _refused(capsys, _config(tmp_path, "clevr", **{"ground.max_seq_len": 8192}))
    assert "ground.max_seq_len" in err


def test_model_facts_local_known_unknown(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=777,
    ).save_pretrained(tmp_path / "m")
    local = model_facts(str(tmp_path / "m"))
    assert local.context == 777 and str(tmp_path / "m") in local.source
    assert model_facts("meta-llama/Llama-2-7b-chat-hf").context == 4096
    assert abs(model_facts("meta-llama/Llama-2-7b-chat-hf").params() - 6.74e9) < 0.01e9
    assert abs(model_facts("HuggingFaceTB/SmolLM2-135M-Instruct").params() - 134.5e6) < 0.5e6
    assert not model_facts("someone/unknown-model").known
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in KNOWN_MODELS


def test_submit_runs_the_plan_checks_before_reaching_the_cluster(tmp_path, capsys):
    cfg = _config(tmp_path, "metaworld", **{"imagine.max_steps": 150})
    # Nothing listens on port 9: a refusal here can only come from the plan's checks.
    assert main(["submit", cfg, "--address", "http://127.0.0.1:9", "--no-follow"]) == 2
    err = capsys.readouterr().err
    assert "imagine.max_steps" in err and "cannot reach" not in err


def test_plan_says_how_training_units_run(tmp_path):
    """The train line names the cap on units at once, or the sequential in-driver path."""
    lines = {}
    for cap in (None, 2, 1):
        cfg = load_config(_config(tmp_path, "quick", **{"train.max_concurrent_units": cap}))
        lines[cap] = next(x for x in make_plan(cfg).lines if x.startswith("train"))
    assert (
        "6 policies (bc), each a Ray task of 1 CPU, as many at once as the CPUs hold" in lines[None]
    )
    assert (
        "each a Ray task of 1 CPU, at most 2 at once; learners in each unit's process" in lines[2]
    )
    assert "one after another in the driver; learners in the driver" in lines[1]


def test_seed_override_is_validated_like_the_file(capsys):
    quick = str(ROOT / "configs" / "quick.yaml")
    assert main(["plan", quick, "--seed", "2"]) == 0
    assert main(["plan", quick, "--seed", "-1"]) == 2
    assert "seed" in capsys.readouterr().err


def test_stepwise_imagination_plans_on_hf_under_auto(tmp_path):
    """``imagine.backend: auto`` with ``mode: stepwise`` is planned (and run) on hf, the only
    backend that imagines step by step, not as vLLM replicas that would fail in the stage."""
    cfg = load_config(_config(tmp_path, "cpu", **{"imagine.backend": "auto"}))
    line = next(x for x in make_plan(cfg).lines if x.startswith("imagine"))
    assert "hf: 1..2 actors" in line and "vLLM" not in line


def test_local_runs_refuse_what_kalm_plan_refuses_before_any_stage(tmp_path, capsys, monkeypatch):
    """``kalm run`` and ``kalm <stage>`` apply the plan's refusals before the first stage (a
    context too short shows there, not inside the grounding), less the runtime_env's, which
    only ``kalm submit`` ships."""
    run_dir = tmp_path / "run"
    too_long = _config(tmp_path, "quick", **{"ground.max_seq_len": 4096, "run_dir": str(run_dir)})
    for argv in (["run", too_long], ["ground", too_long]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kalm: error: ground.max_seq_len: 4096") and "\n" not in err
    assert not run_dir.exists()  # refused before the run dir was claimed
    # The runtime_env is kalm submit's: a local run with a CPU runtime_env is not refused.
    from kalm_ray.plan import PlanError, check, check_local

    cpu_env = load_config(
        _config(
            tmp_path,
            "clevr",
            **{"ray.runtime_env": "jobs/runtime_env.yaml", "imagine.backend": "hf"},
        )
    )
    with pytest.raises(PlanError, match="CPU-only torch"):
        check(cpu_env)
    import kalm_ray.raysetup

    with monkeypatch.context() as m:  # a machine with the GPUs the config asks for
        m.setattr(kalm_ray.raysetup, "local_resources", lambda ray: {"CPU": 64.0, "GPU": 8.0})
        check_local(cpu_env, ["collect", "ground", "imagine", "train", "evaluate"])
    # A stage is refused for its own refusals only: evaluate does not read max_seq_len.
    check_local(load_config(too_long), ["evaluate"])
    # Nor does a local run need the runtime_env file to be refused what it cannot do.
    no_env = _config(
        tmp_path, "quick", **{"ground.max_seq_len": 4096, "ray.runtime_env": "jobs/nope.yaml"}
    )
    with pytest.raises(PlanError, match="ground.max_seq_len: 4096"):
        check_local(load_config(no_env), ["ground"])
    # vLLM named where it is not installed: before collect, not at imagine.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a)
    )
    vllm = load_config(
        _config(tmp_path, "quick", **{"imagine.backend": "vllm", "imagine.mode": "rollout"})
    )
    with pytest.raises(PlanError, match=r"imagine.backend: vllm, but the vllm package is not"):
        check_local(vllm, ["collect", "ground", "imagine"])
    check_local(vllm, ["ground", "train"])  # not theirs to refuse
    # A model folder that is not there: refused for a local run; a cluster's nodes may have it.
    gone = load_config(_config(tmp_path, "quick", **{"ground.model": {"name": "/no/such/model"}}))
    with pytest.raises(PlanError, match="ground.model.name: no such model folder '/no/such/model'"):
        check_local(gone, ["ground"])
    assert not make_plan(gone).refusals
    assert any("/no/such/model is not on this machine" in line for line in make_plan(gone).lines)


def test_misspelt_algo_params_are_refused_by_the_plan(tmp_path, capsys):
    """A key RLlib's config does not take fails every training unit inside its Ray task,
    after the stages before it; the plan (and so ``kalm run``) names it first."""
    err = _refused(
        capsys, _config(tmp_path, "quick", **{"train.algo_params": {"bc": {"lrr": 0.001}}})
    )
    assert err.startswith("kalm: error: train.algo_params.bc: ") and "'lrr'" in err
    # Params of an algorithm the config does not train are not its business.
    cfg = load_config(_config(tmp_path, "quick", **{"train.algo_params": {"dcql": {"x": 1}}}))
    assert not make_plan(cfg).refusals


def test_work_a_local_ray_can_never_place_is_refused_before_the_first_stage(
    tmp_path, capsys, monkeypatch
):
    """An actor, worker group or training unit larger than the local Ray was refused only
    when its stage started (a unit after collect, ground and imagine had run): ``kalm run``
    refuses it before the first stage, and ``kalm plan`` for a config sized for a local Ray."""
    import kalm_ray.raysetup
    from kalm_ray.plan import check_local

    run_dir = tmp_path / "run"
    big = _config(tmp_path, "quick", **{"train.num_cpus_per_unit": 64, "run_dir": str(run_dir)})
    assert main(["run", big]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kalm: error: train.num_cpus_per_unit (bc: with its learners")
    assert "but this local Ray has 8 logical CPUs (ray.num_cpus)" in err and "\n" not in err
    assert not run_dir.exists()
    # kalm plan (and kalm submit: a cluster ignores ray.num_cpus) notes it, refuses nothing
    assert main(["plan", big]) == 0
    out = capsys.readouterr().out
    assert "note: train.num_cpus_per_unit (bc: with its learners and PreLearner" in out
    assert "more than ray.num_cpus (8): a local run refuses it" in out
    real = kalm_ray.raysetup.local_resources
    monkeypatch.setattr(kalm_ray.raysetup, "local_resources", lambda ray: {"CPU": 8.0, "GPU": 0.0})
    gpu = load_config(_config(tmp_path, "quick", **{"ground.use_gpu": True}))
    with pytest.raises(BackendUnavailable, match="ground.use_gpu asks for GPUs"):
        check_local(gpu, ["collect", "ground"])
    check_local(gpu, ["collect", "imagine", "train", "evaluate"])  # not theirs to refuse
    # imagine names the key to lower: the CPUs, though the actor also asks for a GPU
    im = {"imagine.num_cpus_per_actor": 16, "imagine.num_gpus_per_actor": 1}
    with monkeypatch.context() as m:
        m.setattr(kalm_ray.raysetup, "local_resources", lambda ray: {"CPU": 8.0, "GPU": 1.0})
        with pytest.raises(InputError, match="^imagine.num_cpus_per_actor: needs 16 CPUs"):
            check_local(load_config(_config(tmp_path, "quick", **im)), ["imagine"])
    actor = load_config(_config(tmp_path, "quick", **{"collect.num_cpus_per_worker": 16}))
    with pytest.raises(InputError, match="collect.num_cpus_per_worker: needs 16"):
        check_local(actor, ["collect"])
    # Joining a cluster: its resources are its own to count.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(kalm_ray.raysetup, "local_resources", real)
    check_local(actor, ["collect"])


def test_engine_arguments_the_plan_reads_must_be_counts(tmp_path, capsys):
    kwargs = {"imagine.vllm_engine_kwargs": {"tensor_parallel_size": "two"}}
    bad = _config(tmp_path, "clevr", **kwargs)
    err = _refused(capsys, bad)
    assert "imagine.vllm_engine_kwargs.tensor_parallel_size: 'two' is not an integer" in err
    # Where vLLM never runs (hf), its engine arguments are nobody's to refuse.
    assert not make_plan(load_config(_config(tmp_path, "quick", **kwargs))).refusals
