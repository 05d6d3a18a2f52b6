"""Safety defaults (SECURITY.md), each checked where it can be:

- a Ray started by ``kalm`` binds its dashboard/job server to loopback unless the config says
  otherwise, and kalm_ray never turns Ray's token auth off;
- ``trust_remote_code`` is false unless set, and the config value is what reaches transformers;
- no unsafe deserialisation or ``eval``/``exec`` in the package (an AST scan);
- secrets (the Ray token, cloud keys in the environment or the runtime_env) are never printed
  or logged by ``kalm submit``.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import FakeJobServer, job_node

from kalm_ray.config import ExperimentConfig, ModelSection, RayConfig, parse_config
from kalm_ray.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = sorted([*(ROOT / "kalm_ray").rglob("*.py"), *(ROOT / "jobs").glob("*.py")])


# ---- Ray: loopback, token auth ----------------------------------------------------------------


@pytest.fixture
def fake_ray_init(monkeypatch) -> list[dict]:
    """``init_ray`` believes no Ray is up and records what it would pass to ``ray.init``."""
    import ray

    from kalm_ray import raysetup

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    # After start-up, init_ray may use the new Ray (a cosmetic probe actor): not here.
    monkeypatch.setattr(raysetup, "_absorb_restart_notice", lambda: None, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    return calls


@pytest.mark.parametrize(
    ("ray_cfg", "dashboard", "host"),
    [
        ({}, False, "127.0.0.1"),
        ({"dashboard": True}, True, "127.0.0.1"),
        ({"dashboard": True, "dashboard_host": "0.0.0.0"}, True, "0.0.0.0"),
    ],
    ids=["default", "dashboard-on", "exposed-on-request"],
)
def test_local_ray_binds_to_loopback_unless_configured(fake_ray_init, ray_cfg, dashboard, host):
    import os

    from kalm_ray.raysetup import init_ray

    init_ray(parse_config({"name": "x", "ray": ray_cfg}).ray)
    kw = fake_ray_init[0]
    assert kw["include_dashboard"] is dashboard and kw["dashboard_host"] == host
    # Nothing in the call (or the environment it leaves) switches token auth off.
    for call in fake_ray_init:
        assert not any("auth" in k.lower() for k in call) and "_system_config" not in call
    assert "RAY_AUTH_MODE" not in os.environ


def test_config_defaults_are_the_safe_ones():
    assert RayConfig().dashboard is False and RayConfig().dashboard_host == "127.0.0.1"
    assert ModelSection().trust_remote_code is False
    assert ExperimentConfig(name="x").ground.model.trust_remote_code is False


def test_nothing_disables_token_auth():
    """No code, job script or cluster manifest of ours sets ``RAY_AUTH_MODE=disabled``."""
    off = re.compile(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled|mode:\s*[\"']?disabled", re.I)
    files = [*PACKAGE_FILES, *(ROOT / "cluster").rglob("*.yaml"), *(ROOT / "jobs").glob("*.yaml")]
    hits = [str(p.relative_to(ROOT)) for p in files if off.search(p.read_text())]
    assert not hits
    for manifest in (ROOT / "cluster" / "kuberay").glob("*.yaml"):
        assert re.search(r"^\s*mode:\s*token\s*$", manifest.read_text(), re.M), manifest.name


# ---- trust_remote_code --------------------------------------------------------------------


@pytest.mark.parametrize("trust", [None, False, True])
def test_trust_remote_code_reaches_transformers_as_configured(tmp_path, monkeypatch, trust):
    """The ground stage's tokenizer/config loads get the config's value (False by default)."""
    import transformers

    from kalm_ray.artifacts import RunDir
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.ground import fit as ground

    seen: list[tuple[str, object]] = []

    def fake_load(name, **kw):
        seen.append((name, kw.get("trust_remote_code", "absent")))
        raise OSError("offline test")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_load)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_load)
    model = {"name": "some-org/some-model"} | (
        {} if trust is None else {"trust_remote_code": trust}
    )
    cfg = parse_config({"name": "x", "run_dir": str(tmp_path), "ground": {"model": model}})
    with pytest.raises(InputError, match="ground.model.name: cannot load 'some-org/some-model'"):
        ground._prepare(cfg, get_suite("clevr"), RunDir(str(tmp_path)), "model.work/x")
    assert seen == [("some-org/some-model", bool(trust))]
    prep = {"base": "b", "tokenizer_dir": "t", "codec_path": "c", "init_codec_rows": False}
    loop_cfg = ground.train_config(cfg, RunDir(str(tmp_path)), "w", {**prep, "info": {}})
    assert loop_cfg["trust_remote_code"] is bool(trust)  # what the Ray Train workers use


def test_no_code_turns_trust_remote_code_on():
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in PACKAGE_FILES
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"trust_remote_code\s*=\s*True", line)
    ]
    assert not hits


# ---- unsafe deserialisation, eval/exec: an AST scan of the package ---------------------------


def _calls(path: Path) -> Iterator[tuple[int, str, ast.Call]]:
    """(line, dotted name, node) of every call in a file, e.g. ``torch.load``, ``eval``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        f, parts = node.func, []
        while isinstance(f, ast.Attribute):
            parts.append(f.attr)
            f = f.value
        if isinstance(f, ast.Name):
            parts.append(f.id)
            yield node.lineno, ".".join(reversed(parts)), node


def _kw(node: ast.Call, name: str) -> object:
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else ast.unparse(k.value)
    return "absent"


def _unsafe(name: str, node: ast.Call) -> str | None:
    """Why a call is unsafe on untrusted bytes, or None."""
    if name in ("eval", "exec", "compile"):
        return "eval/exec of a string"
    if re.fullmatch(r"(c?pickle|cloudpickle|dill|marshal|shelve|joblib)\.(load|loads|open)", name):
        return "unpickling"
    if name.endswith(("read_pickle", "from_pickle")):
        return "unpickling"
    if name == "torch.load" and _kw(node, "weights_only") is not True:
        return "torch.load without weights_only=True"
    if name in ("yaml.load", "yaml.load_all") and "Safe" not in str(_kw(node, "Loader")):
        return "yaml.load without SafeLoader"
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
        return "unsafe yaml loader"
    if name.endswith(("np.load", "numpy.load")) and _kw(node, "allow_pickle") not in (
        "absent",
        False,
    ):
        return "np.load with allow_pickle"
    return None


def test_no_unsafe_deserialisation_or_eval():
    found = [
        (str(p.relative_to(ROOT)), line, why)
        for p in PACKAGE_FILES
        for line, name, node in _calls(p)
        if (why := _unsafe(name, node))
    ]
    assert not found, found


def test_the_scan_catches_what_it_should(tmp_path):
    """The AST scan is not vacuous: each pattern it looks for is found in a sample."""
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import pickle, torch, yaml, numpy as np\n"
        "pickle.load(f)\n"
        "torch.load(p)\n"
        "torch.load(p, weights_only=False)\n"
        "torch.load(p, weights_only=True)\n"
        "yaml.load(s)\n"
        "yaml.load(s, Loader=yaml.SafeLoader)\n"
        "yaml.safe_load(s)\n"
        "eval(s)\n"
        "model.eval()\n"
        "np.load(p, allow_pickle=True)\n"
    )
    flagged = [line for line, name, node in _calls(sample) if _unsafe(name, node)]
    assert flagged == [2, 3, 4, 6, 9, 11]


# ---- secrets are never printed ----------------------------------------------------------------

TOKEN = "tok-" + "9f3a" * 8
AWS_SECRET = "aws-" + "Zq7" * 10
ENV_SECRET = "env-" + "x1y2" * 6


class _Status(str):
    def is_terminal(self) -> bool:
        return True


class _Client:
    """Stands in for ``JobSubmissionClient``; keeps what was submitted."""

    submitted: dict = {}

    def submit_job(self, **kw):
        _Client.submitted = kw

    async def tail_job_logs(self, job_id):
        yield "job output line\n"

    def get_job_status(self, job_id):
        return _Status("SUCCEEDED")

    def get_job_logs(self, job_id):
        return "job output line\n"


@pytest.fixture
def server() -> Iterator[FakeJobServer]:
    """A one-node job server that wants TOKEN (the fake of tests/helpers.py)."""
    s = FakeJobServer(nodes=[job_node(True, 2)], token=TOKEN)
    yield s
    s.close()


@pytest.fixture
def secrets_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + "EXAMPLE0" * 2)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("HOME", str(tmp_path))


def _submit_config(tmp_path: Path) -> str:
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump({"env_vars": {"HF_TOKEN": ENV_SECRET}}))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"name": "sec", "run_dir": str(tmp_path / "run"), "ray": {"runtime_env": str(env_file)}}
        )
    )
    return str(cfg)


@pytest.mark.parametrize("debug", [False, True])
def test_submit_never_prints_secrets(
    server, secrets_env, tmp_path, monkeypatch, capsys, caplog, debug
):
    from kalm_ray.cli import main
    from kalm_ray.cluster import submit as jobs

    monkeypatch.setattr(jobs, "_client", lambda cluster, debug=False: _Client())
    caplog.set_level(logging.DEBUG)
    argv = ["submit", _submit_config(tmp_path), "--address", server.address]
    assert main([*argv, "--debug"] if debug else argv) == 0
    out = capsys.readouterr()
    shown = out.out + out.err + caplog.text
    assert "kalm-sec-run-" in out.out  # it did submit
    for secret in (TOKEN, AWS_SECRET, ENV_SECRET):
        assert secret not in shown
    # The runtime_env secret does reach the job (that is what it is for), and nothing else.
    env_vars = _Client.submitted["runtime_env"]["env_vars"]
    assert env_vars["HF_TOKEN"] == ENV_SECRET
    assert TOKEN not in json.dumps(_Client.submitted) and AWS_SECRET not in json.dumps(
        _Client.submitted
    )


def test_rejected_token_is_not_echoed(server, monkeypatch, tmp_path, capsys):
    from kalm_ray.cli import main

    wrong = "wrong-" + "7c" * 12
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["status", "some-job", "--address", server.address]) == 2
    err = capsys.readouterr().err
    assert "rejected the auth token" in err and wrong not in err and TOKEN not in err
