"""A run directory on S3: every stage ends by renaming its staging folder into place, and
object stores have no folders to rename (Arrow's S3 and GCS filesystems refuse to move one).

The store is moto's S3 server on loopback, spoken to by Arrow's own S3 client (the one
``RunDir`` uses), so the requests and their failures are S3's, not a stand-in's.
"""

from __future__ import annotations

import socket

import pyarrow.fs as pafs
import pytest

from kalm_ray.artifacts import MANIFEST, Manifest, RunDir, stage_output, verify_run, write_manifest


@pytest.fixture(scope="module")
def s3_endpoint():
    """``host:port`` of a moto S3 server with the bucket ``bkt``."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_run(s3_endpoint, monkeypatch):
    """A RunDir at ``s3://bkt/<test>``: Arrow reads the endpoint and keys from the env."""
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{s3_endpoint}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    pafs.S3FileSystem(
        endpoint_override=s3_endpoint, scheme="http", allow_bucket_creation=True
    ).create_dir("bkt")

    def make(name: str) -> RunDir:
        run = RunDir(f"s3://bkt/{name}")
        assert not run.is_local
        return run

    return make


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
    assert deleted == [run.path("eval", MANIFEST)]
    assert run.manifest("eval") is None and run.manifest("eval.moved").fingerprint == "f1"


class _StopAtDeleteDir:
    """Arrow's S3 filesystem, except that deleting a folder stops the process (as a crash
    between the copies and the delete would)."""

    def __init__(self, fs, deleted: list[str], stop: type[Exception]):
        self._fs, self._deleted, self._stop = fs, deleted, stop

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def delete_file(self, path: str) -> None:
        self._deleted.append(path)
        self._fs.delete_file(path)

    def delete_dir(self, path: str) -> None:
        raise self._stop(path)
