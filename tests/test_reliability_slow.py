"""Issue 19, the slow half: real `kalm collect` subprocesses and a real local Ray.

- SIGTERM mid-collect: one `kalm: terminated` line, exit 143, no Ray process of its session
  left (alive or zombie);
- SIGKILL mid-collect, then rerun: the finished episode files are kept (same inode, never
  rewritten) and the result is byte-equal to an uninterrupted run;
- two `kalm collect` on one run dir: the second is refused within seconds, naming the first;
- Ray's listeners of a local run are all on loopback, and a GCS call without the cluster's
  token is refused.

Marked ``slow`` and ``faults``; `.ci/run` runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.faults]

KALM = Path(sys.executable).with_name("kalm")
TASKS = ["behind:red:blue", "behind:red:green", "behind:red:purple", "behind:red:cyan",
         "behind:blue:red", "behind:blue:green"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    from helpers import make_tiny_sentence_model

    return make_tiny_sentence_model(tmp_path_factory.mktemp("tiny-encoder"))


def _config(folder: Path, encoder: str, *, episodes: int = 20, workers: int = 1) -> Path:
    # One 20-episode unit per task and one worker: task files finish one after another.
    path = folder / "collect.yaml"
    path.write_text(yaml.safe_dump({
        "name": "rel-slow",
        "run_dir": str(folder / "unused"),
        "seed": 7,
        "env": {"name": "clevr"},
        "ray": {"num_cpus": 4},
        "text": {"encoder": encoder},
        "collect": {"episodes_per_task": episodes, "tasks": TASKS, "num_workers": workers},
    }))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


def _start(cfg: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [str(KALM), "collect", str(cfg), "--run-dir", str(run_dir)],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=log.parent,
            start_new_session=True,
        )


def _wait_for(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"kalm ended before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _session_processes(driver_pid: int) -> list[tuple[int, str]]:
    """(pid, state) of processes of the Ray session that ``driver_pid`` started, zombies too."""
    suffix = f"_{driver_pid}"
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state = stat.split(")")[-1].split()[0]
        ppid = int(stat.split(")")[-1].split()[1])
        if state == "Z" and ppid == driver_pid:
            out.append((int(d.name), state))
        elif any("session_" in a and (a.endswith(suffix) or f"{suffix}/" in a) for a in args):
            out.append((int(d.name), state))
    return out


def _digests(run_dir: Path) -> dict[str, str]:
    files = sorted((run_dir / "data" / "real").glob("*.parquet"))
    files.append(run_dir / "data" / "instructions.parquet")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def reference(tiny_encoder, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("ref")
    cfg = _config(folder, tiny_encoder)
    proc = _start(cfg, folder / "run", folder / "log.txt")
    assert proc.wait(timeout=600) == 0, (folder / "log.txt").read_text()[-3000:]
    return _digests(folder / "run")


def test_sigterm_mid_collect_is_one_line_exit_143_and_reaps_ray(tiny_encoder, tmp_path):
    cfg = _config(tmp_path, tiny_encoder, episodes=200, workers=2)
    log = tmp_path / "log.txt"
    proc = _start(cfg, tmp_path / "run", log)
    # Mid-stage: the actors are up and stepping (the progress bar has moved).
    _wait_for(proc, log, lambda: "ep/s" in log.read_text() or " 1/" in log.read_text(),
              "collection progress")
    assert _session_processes(proc.pid), "no Ray process seen before SIGTERM"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    took = time.monotonic() - t0
    text = log.read_text()
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    assert rc == 143, text[-3000:]
    assert lines[-1] == "kalm: terminated", text[-3000:]
    assert "Traceback" not in text and "*** SIG" not in text, text[-3000:]
    # Every Ray process of that session is gone within a short grace (none alive, no zombie).
    deadline = time.monotonic() + 20
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid, _ in left:  # ours to clean up if the assertion below fails
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, left
    # The staging area was kept for a rerun; no stage output appeared.
    assert list((tmp_path / "run" / "data").glob("real.partial-*"))
    assert not (tmp_path / "run" / "data" / "real").exists()
    print(f"\n[reliability] SIGTERM: exit {rc} after {took:.1f}s, no Ray process left")


def test_killed_collect_resumes_keeping_finished_files(tiny_encoder, reference, tmp_path):
    cfg = _config(tmp_path, tiny_encoder)
    run_dir, log = tmp_path / "run", tmp_path / "log1.txt"
    proc = _start(cfg, run_dir, log)

    def marks() -> list[Path]:
        return sorted((run_dir / "data").glob("real.partial-*/_units/*.json"))

    _wait_for(proc, log, lambda: len(marks()) >= 2, "two finished episode files")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    staging = marks()[0].parent.parent
    finished = [json.loads(m.read_text())["name"] for m in marks()]
    assert len(finished) < len(TASKS), "collect finished before the kill"
    before = {n: (staging / n).stat() for n in finished}

    log2 = tmp_path / "log2.txt"
    proc = _start(cfg, run_dir, log2)
    assert proc.wait(timeout=600) == 0, log2.read_text()[-3000:]
    text = log2.read_text()
    assert f"resuming; {len(finished)} of {len(TASKS)} episode files already finished" in text
    manifest = json.loads((run_dir / "data" / "real" / "manifest.json").read_text())
    assert manifest["counts"]["resumed_files"] == len(finished)
    assert manifest["counts"]["episodes"] == 20 * len(TASKS)
    for name, st in before.items():  # the very files the killed run wrote: not redone
        now = (run_dir / "data" / "real" / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    assert _digests(run_dir) == reference  # byte-equal to the uninterrupted run
    assert not (run_dir / "data" / "real" / "_units").exists()
    assert not list((run_dir / "data").glob("real.partial-*"))
    print(f"\n[reliability] resume: {len(finished)}/{len(TASKS)} files kept, digests equal")


def test_second_collect_on_one_run_dir_is_refused_quickly(tiny_encoder, reference, tmp_path):
    cfg = _config(tmp_path, tiny_encoder)
    run_dir = tmp_path / "run"
    first = _start(cfg, run_dir, tmp_path / "log1.txt")
    _wait_for(first, tmp_path / "log1.txt", (run_dir / "data" / "real.lease").exists,
              "the first collect's lease")
    t0 = time.monotonic()
    second = subprocess.run(
        [str(KALM), "collect", str(cfg), "--run-dir", str(run_dir)],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    took = time.monotonic() - t0
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"kalm: error: {run_dir}/data/real is being written by kalm "
                             f"collect (pid {first.pid} on "), err
    assert took < 30, took  # refused before Ray starts (import time only)
    assert first.wait(timeout=600) == 0, (tmp_path / "log1.txt").read_text()[-3000:]
    assert _digests(run_dir) == reference
    assert not list((run_dir / "data").glob("real.replaced-*"))
    print(f"\n[reliability] second writer refused in {took:.1f}s")


NETWORK_PROBE = r"""
import json, os, subprocess, sys, psutil
from kalm_ray.config import RayConfig
from kalm_ray.raysetup import init_ray
init_ray(RayConfig(num_cpus=2, dashboard=True))
import ray

@ray.remote
class A:
    def pid(self):
        return os.getpid()

a = A.remote()
ray.get(a.pid.remote())
node = ray._private.worker._global_node
ours = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
listen = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in ours:
        listen.append([c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()])

# A GCS call with no token, a wrong token, and the right one.
import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
path = os.path.expanduser("~/.ray/auth_token")
token = os.environ.get("RAY_AUTH_TOKEN") or open(path).read().strip()
def call(md):
    ch = grpc.insecure_channel(node.gcs_address)
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch)
    try:
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=md, timeout=10)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
res = {"none": call(()), "wrong": call((("authorization", "Bearer " + "0" * 32),)),
       "right": call((("authorization", "Bearer " + token),))}
print(json.dumps({"node_ip": node.node_ip_address, "gcs": node.gcs_address,
                  "listen": listen, "auth": res}))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only_and_wants_the_token(tmp_path):
    env = {k: v for k, v in _env().items() if k not in ("RAY_AUTH_MODE",)}
    out = subprocess.run([sys.executable, "-c", NETWORK_PROBE], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["node_ip"] == "127.0.0.1" and got["gcs"].startswith("127.0.0.1:")
    names = {n for _, _, n in got["listen"]}
    assert {"gcs_server", "raylet"} <= names, got["listen"]
    exposed = [x for x in got["listen"] if x[0] not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert not exposed, exposed
    assert got["auth"] == {"none": "UNAUTHENTICATED", "wrong": "UNAUTHENTICATED",
                           "right": "OK"}, got["auth"]
    print(f"\n[reliability] {len(got['listen'])} listeners, all loopback: {sorted(names)}; "
          f"auth {got['auth']}")
