"""What ships in cluster/ and jobs/ is valid: the launcher YAMLs against Ray 2.60's own schema,
the KubeRay manifests structurally, the runtime_env YAMLs against Ray and against the versions
this suite runs with. No cluster, no network."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_VERSION = "2.60.0"
LAUNCHER = ["cluster/aws.yaml", "cluster/gcp.yaml"]
RUNTIME_ENVS = [
    "jobs/runtime_env.yaml",
    "jobs/runtime_env_gpu.yaml",
    "jobs/runtime_env_preinstalled.yaml",
]


def _load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def _images(obj: object) -> list[str]:
    """Every value of an ``image`` key (any depth)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("image", "head_image", "worker_image") and isinstance(v, str):
                found.append(v)
            found += _images(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _images(v)
    return found


def test_package_pins_the_ray_these_files_name():
    assert metadata.version("ray") == RAY_VERSION


# ---- cluster launcher ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_yaml_validates_against_ray_schema(rel, ray_schema):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(rel)
    jsonschema.validate(cfg, ray_schema)
    # Ray's own check after it fills in the provider defaults (what `ray up` runs).
    validate_config(prepare_config(cfg))


def test_schema_check_catches_a_bad_file(ray_schema):
    import jsonschema

    cfg = _load("cluster/aws.yaml")
    cfg["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_shape(rel):
    cfg = _load(rel)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] > 0
    images = _images(cfg)
    assert images and all(i.startswith(f"rayproject/ray:{RAY_VERSION}-py311") for i in images)
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]
    assert any("kalm_ray" in c for c in cfg["setup_commands"])


# ---- KubeRay ------------------------------------------------------------------------------


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] > 0
        assert g["template"]["spec"]["restartPolicy"] == "Never"
        for c in g["template"]["spec"]["containers"]:
            assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
    gpu_pod = groups["gpu"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert (
        "nvidia.com/gpu"
        not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    images = _images(spec)
    assert images and all(
        re.fullmatch(rf"rayproject/ray:{RAY_VERSION}-py311(-gpu)?", i) for i in images
    )


def test_raycluster_manifest():
    doc = _load("cluster/kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_rayjob_runs_the_paper_scale_config():
    from kalm_ray.config import load_config

    doc = _load("cluster/kuberay/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    # One cluster definition: the RayJob's own cluster is the RayCluster manifest's.
    assert spec["rayClusterSpec"] == _load("cluster/kuberay/raycluster.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["python", "jobs/run.py"]
    config = argv[2]
    assert config in ("configs/metaworld.yaml", "configs/clevr.yaml")
    cfg = load_config(ROOT / config)  # the config it runs exists and validates
    assert cfg.ground.use_gpu
    run_dir = argv[argv.index("--run-dir") + 1]
    assert run_dir.startswith(("s3://", "gs://"))  # every pod must see the run directory
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    gpu = _load("jobs/runtime_env_gpu.yaml")
    assert env["pip"] == gpu["pip"] and env["env_vars"] == gpu["env_vars"]
    assert "://" in env["working_dir"]  # pods cannot see a local folder


# ---- runtime_env YAMLs --------------------------------------------------------------------


@pytest.mark.parametrize("rel", RUNTIME_ENVS)
def test_runtime_env_is_valid_for_ray(rel):
    from ray.runtime_env import RuntimeEnv

    env = _load(rel)
    RuntimeEnv(**env)  # Ray's own validation of keys and types
    assert env["working_dir"] == "."
    assert {".venv/", ".git/", "runs/"} <= set(env["excludes"])
    assert env["excludes"] == _load("jobs/runtime_env.yaml")["excludes"]


def _pins(rel: str) -> dict[str, str]:
    out = {}
    for spec in _load(rel)["pip"]["packages"]:
        name, version = spec.split("==")
        out[name.lower()] = version
    return out


@pytest.mark.parametrize("rel", ["jobs/runtime_env.yaml", "jobs/runtime_env_gpu.yaml"])
def test_runtime_env_pins_match_what_the_tests_run(rel):
    """The cluster runs the versions this suite passes with (torch up to its local build tag)."""
    pins = _pins(rel)
    assert "ray" not in pins  # Ray comes from the image; a second copy would shadow it
    for name, version in pins.items():
        if name == "vllm":
            continue
        installed = metadata.version(name)
        assert version.split("+")[0] == installed.split("+")[0], (rel, name, version, installed)
    # Every runtime dependency of the package is pinned (ray excepted).
    deps = {
        re.split(r"[\[<>=~ ;]", r, maxsplit=1)[0].lower()
        for r in metadata.requires("kalm_ray") or []
        if "extra ==" not in r
    }
    assert deps - {"ray"} <= set(pins)


def test_gpu_runtime_env_pins_the_vllm_of_ray_llm():
    llm = [
        r for r in metadata.requires("ray") or [] if r.startswith("vllm") and 'extra == "llm"' in r
    ]
    pinned = re.search(r"==([\w.]+)", llm[0]).group(1)
    assert _pins("jobs/runtime_env_gpu.yaml")["vllm"] == pinned
    assert _pins("jobs/runtime_env_gpu.yaml")["torch"] == "2.13.0"  # vLLM 0.29's torch (notes §1)


def test_install_constraints_are_the_cluster_pins():
    """`make install` installs under jobs/constraints.txt; it must list exactly the CPU runtime
    env's pins, so a fresh clone runs what the cluster runs (a newer release on the index
    would otherwise reach the local install first)."""
    lines = (ROOT / "jobs/constraints.txt").read_text().splitlines()
    constraints = dict(
        ln.strip().lower().split("==") for ln in lines if ln.strip() and not ln.startswith("#")
    )
    assert constraints == {k: v.split("+")[0] for k, v in _pins("jobs/runtime_env.yaml").items()}
