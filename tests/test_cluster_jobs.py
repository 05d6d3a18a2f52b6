"""``kalm submit`` against real local Ray clusters started with ``ray start`` (token auth on).

- fast (default suite): a one-node cluster; a job that fails inside the stage comes back as one
  line from ``kalm submit``, and ``kalm status|logs|stop`` see it.
- slow: a two-node cluster; ``kalm submit --stage collect`` succeeds, the artefacts are there,
  the stage's actors ran on both nodes, and a local run_dir without a shared filesystem is refused.

Each cluster is this test's alone: its own temp dir and free ports (never Ray's 6379/8265), and
teardown kills exactly the processes that carry its marker in their environment. Never ``ray
stop``: it would kill every Ray on the machine, other test sessions' included.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from kalm_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MARKER_ENV = "KALM_TEST_CLUSTER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_range(width: int = 200) -> tuple[int, int]:
    """A block of worker ports below the ephemeral range, away from Ray's default 10002-19999."""
    for _ in range(50):
        lo = random.randrange(20000, 30000 - width)
        probes = [lo, lo + width // 2, lo + width - 1]
        with contextlib.ExitStack() as stack:
            try:
                for p in probes:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            except OSError:
                continue
        return lo, lo + width - 1
    raise RuntimeError("no free worker port range")


class LocalCluster:
    """Real ``ray start`` nodes on this machine, owned by one test module."""

    def __init__(self, *, num_cpus: int = 2):
        self.num_cpus = num_cpus
        # Short path: Ray's Unix sockets live under it (108-byte limit).
        self.dir = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
        self.marker = uuid.uuid4().hex
        self.token_path = self.dir / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # jobs run `python`
                MARKER_ENV: self.marker,
            }
        )
        self.env = env
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.nodes = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, args: list[str]) -> None:
        lo, hi = _port_range()
        cmd = [
            str(VENV_BIN / "ray"),
            "start",
            *args,
            f"--num-cpus={self.num_cpus}",
            # Its own temp dir per node, as on separate machines: with one shared temp dir (and
            # so one runtime_resources/ for both nodes' runtime-env agents) the two-node collect
            # job's driver died (oneMKL "Cannot load libtorch_cpu.so", FileNotFoundError).
            f"--temp-dir={self.dir / f'ray{self.nodes}'}",
            "--disable-usage-stats",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
        ]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            logs = sorted(
                (self.dir / f"ray{self.nodes}" / "session_latest" / "logs").glob("raylet*.out")
            )
            tail = logs[-1].read_text()[-1500:] if logs else "(no raylet log)"
            raise RuntimeError(
                f"ray start {args[0]} failed ({r.returncode}):\n{r.stderr[-2000:]}\n"
                f"raylet log tail:\n{tail}"
            )
        self.nodes += 1

    def start_head(self) -> None:
        self._ray_start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={_free_port()}",
                "--no-monitor",  # no autoscaler here: one Python process less to start
            ]
        )

    def add_node(self) -> None:
        self._ray_start([f"--address=127.0.0.1:{self.gcs_port}"])

    def wait_for_nodes(self, timeout_s: float = 120) -> None:
        headers = {"Authorization": f"Bearer {self.token_path.read_text()}"}
        query = "filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
        url = f"{self.address}/api/v0/nodes?{query}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException, KeyError, ValueError):
                rows = requests.get(url, headers=headers, timeout=5).json()["data"]["result"][
                    "result"
                ]
                if len(rows) >= self.nodes:
                    return
            time.sleep(1)
        raise TimeoutError(f"{self.nodes} nodes not alive after {timeout_s}s")

    def actors(self, class_name: str) -> list[dict]:
        """Actors of a class (alive or dead) from the state API."""
        headers = {"Authorization": f"Bearer {self.token_path.read_text()}"}
        url = (
            f"{self.address}/api/v0/actors?detail=1&limit=1000&filter_keys=class_name"
            f"&filter_predicates=%3D&filter_values={class_name}"
        )
        return requests.get(url, headers=headers, timeout=10).json()["data"]["result"]["result"]

    def pids(self) -> list[int]:
        """Processes of this cluster: they carry the marker in their environment."""
        needle = f"{MARKER_ENV}={self.marker}".encode()
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if needle in (Path("/proc") / entry / "environ").read_bytes():
                    out.append(int(entry))
        return out

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while pids and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = self.pids()
            if not pids:
                break
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(nodes: int, attempts: int = 3) -> Iterator[LocalCluster]:
    """A running cluster of ``nodes`` nodes, stopped on exit.

    On a machine shared with other test sessions a node can miss one of Ray's fixed start-up
    deadlines (the raylet aborts when its dashboard agent has not written its ports within
    ~15 s; ``ray start`` gives the raylet 30 s to register); then the whole cluster is torn
    down and started again.
    """
    for attempt in range(attempts):
        c = LocalCluster()
        try:
            c.start_head()
            for _ in range(nodes - 1):
                c.add_node()
            c.wait_for_nodes()
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            c.stop()
            if attempt == attempts - 1:
                raise
            continue
        break
    try:
        yield c
    finally:
        c.stop()


def _write_config(path: Path, *, run_dir: str, shared: bool, name: str = "cluster-e2e") -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "run_dir": run_dir,
                "seed": 1,
                "env": {"name": "clevr"},
                "ray": {
                    "runtime_env": "jobs/runtime_env_preinstalled.yaml",
                    "shared_filesystem": shared,
                },
                "collect": {
                    "episodes_per_task": 2,
                    "tasks": [
                        "left:red:blue",
                        "behind:green:cyan",
                        "right:purple:red",
                        "front:blue:green",
                    ],
                    "num_workers": 2,
                    "num_cpus_per_worker": 1,
                },
            }
        )
    )
    return str(path)


def _kalm(cluster: LocalCluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real ``kalm`` command, as a user runs it, with the cluster's token."""
    return subprocess.run(
        [str(VENV_BIN / "kalm"), *args],
        env=cluster.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- fast: one node -----------------------------------------------------------------------


def test_failed_job_comes_back_as_one_line(tmp_path):
    """Token auth, packaging, the jobs/ entry point, the config via env, log following and
    failure reporting, on a one-node cluster. The stage fails at once (its run_dir belongs to
    another experiment), which keeps this test in the default suite."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"experiment": "someone-else"}))
    cfg = _write_config(tmp_path / "cfg.yaml", run_dir=str(run_dir), shared=False)
    with local_cluster(nodes=1) as cluster:
        r = _kalm(cluster, "submit", cfg, "--address", cluster.address, "--stage", "collect")
        assert r.returncode == 1, r.stderr
        job_id = r.stdout.splitlines()[0]
        assert job_id.startswith("kalm-cluster-e2e-collect-")
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("kalm: error:")]
        assert len(err) == 1 and f"job {job_id} FAILED" in err[0]
        assert "written by experiment 'someone-else'" in err[0]
        assert "written by experiment 'someone-else'" in r.stdout  # the followed logs

        status = _kalm(cluster, "status", job_id, "--address", cluster.address, timeout=60)
        assert status.returncode == 0 and f"{job_id}  FAILED" in status.stdout
        assert f"run_dir    {run_dir}" in status.stdout
        logs = _kalm(cluster, "logs", job_id, "--address", cluster.address, timeout=60)
        assert "someone-else" in logs.stdout
        stop = _kalm(cluster, "stop", job_id, "--address", cluster.address, timeout=60)
        assert "already ended (FAILED)" in stop.stdout
    assert not LocalCluster.pids(cluster), "cluster processes left behind"


# ---- slow: two nodes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[LocalCluster]:
    with local_cluster(nodes=2) as c:
        yield c
    assert not c.pids(), "cluster processes left behind"


@pytest.mark.slow
def test_local_run_dir_on_two_nodes_is_refused(two_nodes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(two_nodes.token_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    cfg = _write_config(tmp_path / "cfg.yaml", run_dir=str(tmp_path / "run"), shared=False)
    assert main(["submit", cfg, "--address", two_nodes.address, "--stage", "collect"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a local path but the cluster" in err[0] and "has 2 nodes" in err[0]


@pytest.mark.slow
def test_missing_token_against_a_real_cluster(two_nodes, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert main(["status", "x", "--address", two_nodes.address]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "requires an auth token and none was found" in err[0]


@pytest.mark.slow
def test_submit_collect_on_two_nodes(two_nodes, tmp_path):
    """The acceptance run: ``kalm submit --stage collect`` on two nodes (a shared filesystem:
    one machine), SUCCEEDED, artefacts complete, the collection actors on both nodes."""
    run_dir = tmp_path / "run"
    cfg = _write_config(tmp_path / "cfg.yaml", run_dir=str(run_dir), shared=True)
    t0 = time.perf_counter()
    r = _kalm(two_nodes, "submit", cfg, "--address", two_nodes.address, "--stage", "collect")
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0]
    assert f"{job_id} SUCCEEDED" in r.stderr
    assert "[kalm] collect: 8 episodes" in r.stdout  # the driver's summary, followed live

    manifest = json.loads((run_dir / "data" / "real" / "manifest.json").read_text())
    assert manifest["stage"] == "collect" and manifest["counts"]["episodes"] == 8
    assert (
        sorted(p.name for p in (run_dir / "data" / "real").glob("*.parquet"))
        == manifest["counts"]["files"]
    )

    actors = two_nodes.actors("EpisodeCollector")
    assert len(actors) >= 2
    nodes = {a["node_id"] for a in actors}
    assert len(nodes) == 2, f"collection actors all on one node: {actors}"
    print(f"submit -> SUCCEEDED in {wall:.1f}s; actors on {len(nodes)} nodes")


@pytest.mark.slow
def test_submit_to_s3_with_the_endpoint_in_the_runtime_env(two_nodes, s3_endpoint, tmp_path):
    """An S3-compatible store at its own endpoint (MinIO, Ceph; here moto's server) reached
    from a job: the cluster's processes were started without any AWS_* variable, so the
    driver and the collection actors on both nodes find the endpoint and keys only in the
    runtime_env's ``env_vars`` (cluster/README.md)."""
    import pyarrow.fs as pafs

    s3 = {
        "AWS_ENDPOINT_URL": f"http://{s3_endpoint}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    assert not any(k in two_nodes.env for k in s3)
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        scheme="http",
        access_key="test",
        secret_key="test",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir("jobs-bkt")
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env_preinstalled.yaml").read_text())
    env["env_vars"] = {**env.get("env_vars", {}), **s3}
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(env))
    cfg_path = _write_config(tmp_path / "cfg.yaml", run_dir="s3://jobs-bkt/run", shared=False)
    cfg = yaml.safe_load(Path(cfg_path).read_text())
    cfg["ray"]["runtime_env"] = str(tmp_path / "runtime_env.yaml")
    Path(cfg_path).write_text(yaml.safe_dump(cfg))

    r = subprocess.run(
        [str(VENV_BIN / "kalm"), "submit", cfg_path, "--address", two_nodes.address,
         "--stage", "collect"],
        env={**two_nodes.env, **s3},  # the user's shell has them; the cluster does not
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with fs.open_input_stream("jobs-bkt/run/data/real/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["stage"] == "collect" and manifest["counts"]["episodes"] == 8
    written = fs.get_file_info(pafs.FileSelector("jobs-bkt/run/data/real"))
    assert sorted(i.base_name for i in written if i.base_name.endswith(".parquet")) == sorted(
        manifest["counts"]["files"]
    )


def test_ci_runs_the_two_node_acceptance_tests():
    """CI (``.ci/run``) runs ``make test`` and then this file's slow two-node tests (issue 8)."""
    script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.startswith("#")]
    assert "make test" in lines
    slow = [ln for ln in lines if "-m slow" in ln]
    assert slow and Path(__file__).name in slow[0]
    assert lines.index("make test") < lines.index(slow[0])
    assert test_submit_collect_on_two_nodes.pytestmark[0].name == "slow"
