"""``kalm submit|status|logs|stop`` against a fake job server: reachability, token auth, the
run_dir rules, the runtime_env the job gets, and the job-side entry point. No Ray cluster here
(tests/test_cluster_jobs.py runs the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import TOKEN, FakeJobServer, job_node

from kalm_ray.cli import main
from kalm_ray.cluster import submit as jobs
from kalm_ray.config import parse_config
from kalm_ray.errors import ConfigError, KalmError, RunDirError


@pytest.fixture
def token_env(monkeypatch, tmp_path) -> Path:
    """The client finds TOKEN through RAY_AUTH_TOKEN_PATH; nothing else on this machine leaks in."""
    path = tmp_path / "auth_token"
    path.write_text(TOKEN + "\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.setenv("HOME", str(tmp_path))
    return path


@pytest.fixture
def server(request) -> Iterator[FakeJobServer]:
    nodes = getattr(request, "param", [job_node(True, 2.0), job_node(False, 2.0)])
    s = FakeJobServer(nodes=nodes)
    yield s
    s.close()


def _config(tmp_path: Path, run_dir: str, **ray: object) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "tiny", "run_dir": run_dir, "ray": ray, "collect": {"episodes_per_task": 1}}
        )
    )
    return str(path)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("kalm: error: ")
    return err[0]


# ---- bad input: one clear line each -------------------------------------------------------


def test_unreachable_address_is_one_line(capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["status", "some-job", "--address", f"127.0.0.1:{port}"]) != 0
    line = _one_error_line(capsys)
    assert f"cannot reach the Ray job server at http://127.0.0.1:{port}" in line
    assert "connection refused" in line


def test_missing_token_is_one_line(capsys, server, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-such-token"))
    assert main(["submit", _config(tmp_path, "s3://b/r"), "--address", server.address]) != 0
    line = _one_error_line(capsys)
    assert "requires an auth token and none was found" in line and "no-such-token" in line


def test_wrong_token_is_one_line(capsys, server, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    assert main(["logs", "some-job", "--address", server.address]) != 0
    assert "rejected the auth token" in _one_error_line(capsys)


def test_local_run_dir_on_multi_node_cluster_is_one_line(capsys, server, token_env, tmp_path):
    cfg = _config(tmp_path, str(tmp_path / "run"))
    assert main(["submit", cfg, "--address", server.address, "--stage", "collect"]) != 0
    line = _one_error_line(capsys)
    assert "is a local path but the cluster" in line and "has 2 nodes" in line
    assert "s3://" in line and "ray.shared_filesystem" in line


@pytest.mark.parametrize("server", [[job_node(True, 0.0)]], indirect=True)
def test_local_run_dir_refused_when_head_has_no_cpus(capsys, server, token_env, tmp_path):
    assert main(["submit", _config(tmp_path, "/data/run"), "--address", server.address]) != 0
    assert "head with no CPUs" in _one_error_line(capsys)


def test_ray_client_address_is_refused(capsys, tmp_path):
    assert main(["submit", _config(tmp_path, "s3://b/r"), "--address", "ray://head:10001"]) != 0
    assert "not a job server URL" in _one_error_line(capsys)


# ---- connect and the run_dir rules --------------------------------------------------------


def test_connect_sends_the_token_only_when_asked(server, token_env):
    cluster = jobs.connect(server.address.removeprefix("http://"))
    assert cluster.address == server.address
    assert (cluster.alive_nodes, cluster.head_cpus, cluster.multi_node) == (2, 2.0, True)
    assert server.seen_auth[0] is None  # the first probe carries no token
    assert server.seen_auth[1:] == [f"Bearer {TOKEN}"] * 2


def test_connect_without_auth_sends_no_token(token_env):
    s = FakeJobServer(nodes=[job_node(True, 4.0)], token=None)
    try:
        cluster = jobs.connect(s.address)
    finally:
        s.close()
    assert cluster.headers == {} and set(s.seen_auth) == {None}
    assert not cluster.multi_node


def _cluster(nodes: int | None, head_cpus: float | None) -> jobs.Cluster:
    return jobs.Cluster(
        address="http://10.0.0.5:8265", ray_version="2.60.0", alive_nodes=nodes, head_cpus=head_cpus
    )


def test_resolve_run_dir_rules():
    one, two = _cluster(1, 4.0), _cluster(2, 4.0)
    # Shared URIs always pass (and are not opened here).
    for uri in ("s3://bucket/runs/x", "gs://bucket/runs/x"):
        assert jobs.resolve_run_dir(uri, two, shared_filesystem=False) == uri
    # One node: absolute local paths are fine, relative ones never (the job's cwd is temporary).
    assert jobs.resolve_run_dir("/abs/run", one, shared_filesystem=False) == "/abs/run"
    with pytest.raises(RunDirError, match="is relative"):
        jobs.resolve_run_dir("runs/x", one, shared_filesystem=False)
    # Several nodes: only with a shared filesystem.
    with pytest.raises(RunDirError, match="has 2 nodes"):
        jobs.resolve_run_dir("/abs/run", two, shared_filesystem=False)
    with pytest.raises(RunDirError, match="has 2 nodes"):
        jobs.resolve_run_dir("file:///abs/run", two, shared_filesystem=False)
    assert jobs.resolve_run_dir("/nfs/run", two, shared_filesystem=True) == "/nfs/run"
    # A server that does not say how many nodes it has is treated as multi-node.
    with pytest.raises(RunDirError, match="would not say"):
        jobs.resolve_run_dir("/abs/run", _cluster(None, None), shared_filesystem=False)


def test_normalise_address():
    assert jobs.normalise_address("head:8265/") == "http://head:8265"
    assert jobs.normalise_address("https://head:443") == "https://head:443"
    for bad in ("", "auto", "ray://head:10001", "grpc://head:6379"):
        with pytest.raises(KalmError):
            jobs.normalise_address(bad)


def test_read_token_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs.read_token()[0] is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert jobs.read_token()[0] == "home-token"
    (tmp_path / "t").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert jobs.read_token()[0] == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs.read_token()[0] == "env-token"


# ---- what the job gets --------------------------------------------------------------------


def test_runtime_env_carries_code_and_config():
    cfg = parse_config({"name": "t", "ray": {"runtime_env": "jobs/runtime_env_preinstalled.yaml"}})
    env = jobs.build_runtime_env(cfg, config_yaml="name: t\n")
    root = jobs.project_root()
    assert env["working_dir"] == str(root)
    assert {".venv/", ".git/", "runs/"} <= set(env["excludes"])
    assert env["env_vars"][jobs.CONFIG_ENV] == "name: t\n"
    assert "pip" not in env
    assert jobs.entrypoint("collect") == "python jobs/collect.py"
    assert jobs.entrypoint(None) == "python jobs/run.py"
    # `kalm submit --debug` reaches the job: its stage errors come with the traceback there.
    assert jobs.entrypoint("ground", debug=True) == "python jobs/ground.py --debug"


def test_runtime_env_missing_file_is_config_error():
    cfg = parse_config({"name": "t", "ray": {"runtime_env": "jobs/nope.yaml"}})
    with pytest.raises(ConfigError, match="ray.runtime_env: no such file"):
        jobs.build_runtime_env(cfg, config_yaml="")


def test_failure_line_picks_the_exception():
    msg = (
        "Job entrypoint command failed with exit code 1, last available logs (truncated):\n"
        'Traceback (most recent call last):\n  File "x", line 1\nValueError: boom\n'
    )
    assert jobs.failure_line(msg) == "ValueError: boom"
    assert "kalm logs" in jobs.failure_line(None)


def test_job_main_reads_config_from_env(monkeypatch, capsys):
    import kalm_ray.cli

    seen: list[list[str]] = []

    def fake_main(argv):
        seen.append(list(argv))
        seen.append([Path(argv[1]).read_text()])
        return 0

    monkeypatch.setattr(kalm_ray.cli, "main", fake_main)
    monkeypatch.setenv(jobs.CONFIG_ENV, "name: from-env\n")
    assert jobs.job_main("collect", ["--run-dir", "s3://b/r"]) == 0
    assert seen[0][0] == "collect" and seen[0][2:] == ["--run-dir", "s3://b/r"]
    assert seen[1] == ["name: from-env\n"]
    assert not Path(seen[0][1]).exists()  # the temporary copy is gone
    assert jobs.job_main(None, ["configs/quick.yaml", "--only", "train"]) == 0
    assert seen[2] == ["run", "configs/quick.yaml", "--only", "train"]
    monkeypatch.delenv(jobs.CONFIG_ENV)
    assert jobs.job_main("train", []) != 0
    assert "KALM_CONFIG_YAML is not set" in capsys.readouterr().err


def test_every_stage_has_an_entrypoint():
    from kalm_ray.stage import STAGES

    root = jobs.project_root()
    for stage in (*STAGES, "run"):
        text = (root / "jobs" / f"{stage}.py").read_text()
        arg = "None" if stage == "run" else f'"{stage}"'
        assert f"sys.exit(job_main({arg}))" in text, stage
