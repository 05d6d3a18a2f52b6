"""Shared fixtures. Ray tests share one local Ray per test session."""

from __future__ import annotations

import json
import os
import socket

import pytest
from helpers import SMALL, toy_episodes, toy_suite

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with 8 logical CPUs (offline RLlib deadlocks with 2), dashboard off."""
    import ray

    # Ray's own 30 s start-up wait can run out on a loaded 2-core machine: retry a few times.
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(
                num_cpus=8,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            )
        except Exception:  # noqa: BLE001 - any start-up failure gets the same retry
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    # Left running for the rest of the session; pytest exit shuts it down.


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """The ground stage's small tiny model, its tokenizer and codec, and JSONL training examples
    (test_ground.py, test_ground_fit.py; test_rl_train.py has a ``prepared`` of its own)."""
    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.model import build_tiny
    from kalm_ray.llm.prompts import EpisodeArrays, episode_examples

    root = tmp_path_factory.mktemp("ground")
    codec = Codec.for_suite(toy_suite(), 32)
    model, tok = build_tiny(codec, ["push the red ball left"], overrides=SMALL)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    codec.save(root)
    rows = []
    for e in toy_episodes(12):
        rows += episode_examples(codec, tok, EpisodeArrays(**e), max_seq_len=256)[0]
    (root / "examples").mkdir()
    (root / "examples" / "part-0.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"root": root, "codec": codec}


@pytest.fixture(scope="session")
def s3_endpoint():
    """``host:port`` of moto's S3 server on loopback (a real S3 protocol endpoint; Arrow's own
    S3 client talks to it)."""
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
    """``make(name)``: a RunDir at ``s3://bkt/<name>`` (bucket ``bkt`` created); Arrow reads
    the endpoint and keys from the env."""
    import pyarrow.fs as pafs

    from kalm_ray.artifacts import RunDir

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
