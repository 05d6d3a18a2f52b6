"""A run directory on S3: every stage ends by renaming its staging folder into place, and
object stores have no folders to rename (Arrow's S3 and GCS filesystems refuse to move one).

The store is moto's S3 server on loopback (``s3_run`` in conftest.py), spoken to by Arrow's
own S3 client (the one ``RunDir`` uses), so the requests and their failures are S3's, not a
stand-in's.
"""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from kalm_ray.artifacts import MANIFEST, Manifest, RunDir, stage_output, verify_run, write_manifest


def _files(run: RunDir) -> list[str]:
    base = run.path()
    return sorted(
        i.path[len(base) + 1 :]
        for i in run.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if i.type == pafs.FileType.File
    )


def test_stage_outputs_land_and_replace_on_s3(s3_run):
    run = s3_run("stages")
    # Arrow cannot rename a folder on S3: what stage_output did before (a plain move).
    with stage_output(run, "data/real") as tmp:
        run.write_text("old", tmp, "a.txt")
        run.write_text("nested", tmp, "sub", "b.txt")
    write_manifest(run, "data/real", Manifest("collect", "c", {}, "f1"))
    with pytest.raises(OSError):
        run.fs.move(run.path("data/real"), run.path("data/elsewhere"))

    # A second output of the same stage, from a resumable staging folder: the first moves
    # aside whole (its manifest too), the new one lands, no staging is left behind.
    with stage_output(run, "data/real", resume_key="f" * 64) as tmp:
        run.write_text("new", tmp, "a.txt")
        run.write_text("nested2", tmp, "sub", "b.txt")
    write_manifest(run, "data/real", Manifest("collect", "c", {}, "f2"))
    files = _files(run)
    replaced = sorted({f.split("/")[1] for f in files if ".replaced-" in f})
    assert len(replaced) == 1
    assert files == sorted(
        [
            "data/real/a.txt",
            "data/real/sub/b.txt",
            f"data/real/{MANIFEST}",
            f"data/{replaced[0]}/a.txt",
            f"data/{replaced[0]}/sub/b.txt",
            f"data/{replaced[0]}/{MANIFEST}",
        ]
    )
    assert run.read_bytes("data/real", "a.txt") == b"new"
    assert run.read_bytes("data", replaced[0], "a.txt") == b"old"
    assert run.manifest("data/real").fingerprint == "f2"
    assert verify_run(run, {"collect": "data/real"}) == []  # checksums hold after the copy


def test_a_move_stopped_half_way_leaves_no_finished_looking_folder(s3_run, monkeypatch):
    """The source's manifest goes before the rest of it: a move that stops while deleting
    leaves a folder the next run treats as unfinished, never one that looks complete."""
    run = s3_run("halfway")
    with stage_output(run, "eval") as tmp:
        run.write_text("1", tmp, "results.json")
    write_manifest(run, "eval", Manifest("evaluate", "c", {}, "f1"))
    deleted: list[str] = []

    class Stop(Exception):
        pass

    monkeypatch.setattr(run, "fs", _StopAtDeleteDir(run.fs, deleted, Stop))
    with pytest.raises(Stop):
        run.move_dir("eval", "eval.moved")
    # The copy too: the manifest last ("manifest.json" lists before "results.json").
    assert run.fs.copied[-1] == run.path("eval", MANIFEST) and len(run.fs.copied) == 2
    assert deleted == [run.path("eval", MANIFEST)]
    assert run.manifest("eval") is None and run.manifest("eval.moved").fingerprint == "f1"


def test_files_over_the_server_side_copy_limit_are_streamed(s3_run, monkeypatch):
    """S3 copies at most 5 GiB in one request (a 7B model's weights are one ~13.5 GB file):
    bigger files are streamed, in parts. Here the limit is lowered to a few bytes."""
    from kalm_ray import artifacts

    run = s3_run("big")
    payload = bytes(range(256)) * 4096  # 1 MiB
    with stage_output(run, "model") as tmp:
        run.write_bytes(payload, tmp, "model.safetensors")
        run.write_text("{}", tmp, "config.json")
    monkeypatch.setattr(artifacts, "SERVER_COPY_LIMIT", 16)
    run.move_dir("model", "model.moved")
    assert run.read_bytes("model.moved", "model.safetensors") == payload
    assert run.read_bytes("model.moved", "config.json") == b"{}"
    assert not run.exists("model")


class _StopAtDeleteDir:
    """Arrow's S3 filesystem, except that deleting a folder stops the process (as a crash
    between the copies and the delete would)."""

    def __init__(self, fs, deleted: list[str], stop: type[Exception]):
        self._fs, self._deleted, self._stop = fs, deleted, stop
        self.copied: list[str] = []

    def copy_file(self, src: str, dst: str) -> None:
        self.copied.append(src)
        self._fs.copy_file(src, dst)

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def delete_file(self, path: str) -> None:
        self._deleted.append(path)
        self._fs.delete_file(path)

    def delete_dir(self, path: str) -> None:
        raise self._stop(path)


# Sizes only; everything else is configs/quick.yaml's (`make demo`).
SMALLER = {
    "collect": {"episodes_per_task": 1},
    "ground": {"max_steps": 5, "eval_examples": 8, "eval_rollouts": 2},
    "imagine": {"rollouts_per_level": 6},
    "train": {"iterations": 1, "updates_per_iteration": 5, "seeds": [0], "quick_eval_every": 0},
    "evaluate": {
        "episodes_per_task": 1,
        "episodes_per_task_by_level": {},
        "max_tasks_per_level": 2,
    },
}


@pytest.mark.slow
def test_the_quick_pipeline_runs_on_s3_verifies_and_skips_when_rerun(s3_run, tmp_path):
    """Every stage of the quick preset (reduced sizes) through the real CLI with its run dir on
    S3, as on a cluster: Ray Data, Ray Train, RLlib and the evaluation workers read and write
    the bucket. ``kalm verify`` then finds every file intact, and a rerun skips every stage.
    About 6 minutes on 2 cores. Before: every stage failed at its final rename, and then the
    evaluation workers could not load a policy from S3."""
    import os
    import subprocess
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    kalm = str(root / ".venv" / "bin" / "kalm")
    s3_run("e2e")  # the bucket, and the endpoint in this process's env for the subprocess
    cfg = yaml.safe_load((root / "configs" / "quick.yaml").read_text())
    for section, values in SMALLER.items():
        cfg[section].update(values)
    cfg["run_dir"] = "s3://bkt/e2e"
    path = tmp_path / "quick_s3.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def kalm_cli(*args: str) -> str:
        proc = subprocess.run(
            [kalm, *args], capture_output=True, text=True, timeout=1500, env=dict(os.environ)
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        return out

    kalm_cli("run", str(path))
    verified = kalm_cli("verify", "s3://bkt/e2e")
    for stage in ("collect", "ground", "imagine", "train", "evaluate"):
        assert f"  {stage:<9} s3://bkt/e2e/" in verified and "files intact" in verified
    assert "not run" not in verified and "damaged" not in verified
    again = kalm_cli("run", str(path))
    for stage in ("collect", "ground", "imagine", "train", "evaluate"):
        assert f"[kalm] {stage}: up to date (s3://bkt/e2e/" in again, stage
