"""Workers read the run directory, never the driver's disk (multi-node correctness).

A fake remote filesystem stands in for ``s3://``: ``fake://`` URIs resolve to a
``SubTreeFileSystem`` over a "bucket" folder, and a :class:`RunDir` on it is not local. The
ground stage's prepared files are then uploaded and named by URI, the driver's temporary
copy is deleted (as if the worker ran on another node), and the worker-side loaders (the
example builder, the train loop, the imagine model loader) still work: they download.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from kalm_ray import localcopy
from kalm_ray.artifacts import RunDir


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """``fake://<path>`` -> ``<tmp>/bucket/<path>``; returns the bucket's local folder."""
    root = tmp_path / "bucket"
    root.mkdir()
    fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    real = localcopy.filesystem_of

    def fake(uri: str):
        if uri.startswith("fake://"):
            return fs, uri[len("fake://") :]
        return real(uri)

    monkeypatch.setattr(localcopy, "filesystem_of", fake)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    return root


def fake_run(bucket: Path, name: str = "run") -> RunDir:
    """A RunDir on the fake filesystem (``is_local`` is False, ``uri_of`` gives fake:// URIs)."""
    run = RunDir.__new__(RunDir)
    run.uri, run.fs, run.root = f"fake://{name}", pafs.SubTreeFileSystem(
        str(bucket), pafs.LocalFileSystem()
    ), name
    run.makedirs()
    assert not run.is_local and run.uri_of("a", "b") == f"fake://{name}/a/b"
    return run


def test_local_paths_pass_through_and_uris_are_cached_per_content(bucket, tmp_path):
    assert localcopy.local_copy("/some/local/dir") == "/some/local/dir"
    (bucket / "m" / "sub").mkdir(parents=True)
    (bucket / "m" / "a.txt").write_text("one")
    (bucket / "m" / "sub" / "b.txt").write_text("nested")
    first = localcopy.local_copy("fake://m")
    assert Path(first, "a.txt").read_text() == "one"
    assert Path(first, "sub", "b.txt").read_text() == "nested"
    assert localcopy.local_copy("fake://m") == first  # cached: no second download
    (bucket / "m" / "a.txt").write_text("two!")  # the folder re-created at the same URI
    second = localcopy.local_copy("fake://m")
    assert second != first and Path(second, "a.txt").read_text() == "two!"
    assert Path(localcopy.local_copy("fake://m/a.txt")).read_text() == "two!"  # one file
    with pytest.raises(FileNotFoundError):
        localcopy.local_copy("fake://nothing")
    assert not [p for p in os.listdir(Path(first).parents[1]) if p.startswith(".")]  # no staging


def test_ground_workers_read_prep_and_examples_from_the_run_dir(bucket, tmp_path):
    from helpers import toy_episodes

    from kalm_ray.config import parse_config
    from kalm_ray.data.schema import Episode, episodes_to_table, transition_schema
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.ground import fit as ground
    from kalm_ray.llm.ground.train_fn import train_loop
    from kalm_ray.llm.prompts import ExampleBuilder

    suite = get_suite("clevr")
    cfg = parse_config(
        {
            "name": "remote",
            "ground": {
                "method": "full",
                "n_bins": 32,
                "tiny_init_from_encoder": False,
                "max_steps": 2,
                "batch_size": 2,
                "max_seq_len": 256,
            },
        }
    )
    run, work = fake_run(bucket), "model.work/abc"
    prep = ground.prepare_shared(cfg, suite, run, work)
    for key in ("base", "tokenizer_dir", "codec_path"):
        assert prep[key].startswith("fake://run/model.work/abc/prep/"), (key, prep[key])
    assert run.exists(work, "prep", ground.PREP_DONE)
    assert ground.prepare_shared(cfg, suite, run, work) == prep  # reused, not rebuilt
    # Nothing prepared survives on the driver's disk outside the run dir.
    assert not list(Path(tmp_path / "node-tmp").glob("kalm-ground-*"))

    # Worker side, "another node": the example builder and the train loop get URIs only.
    eps = [
        Episode(
            env="clevr",
            level="train",
            rewards=np.zeros(len(e["actions"]), np.float32),
            successes=np.zeros(len(e["actions"]), bool),
            terminated=False,
            truncated=True,
            **e,
        )
        for e in toy_episodes(6)
    ]
    table = episodes_to_table(eps, transition_schema(10, suite.action_space))
    builder = ExampleBuilder(
        prep["codec_path"], prep["tokenizer_dir"], max_seq_len=256, heldout_fraction=0.2, seed=0
    )
    run.makedirs(work, "examples")
    pq.write_table(builder(table), run.path(work, "examples", "part-0.parquet"), filesystem=run.fs)
    config = {
        **ground.train_config(cfg, run, work, prep),
        "metrics": None,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "output_dir": str(tmp_path / "out"),
    }
    assert config["examples"].startswith("fake://")
    metrics = train_loop(config)
    assert metrics["step"] == 2 and (tmp_path / "out" / "codec.json").exists()


def test_imagine_loader_reads_a_model_folder_by_uri(bucket, tmp_path):
    from helpers import SMALL, toy_suite

    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.model import build_tiny, load_grounded, model_files

    codec = Codec.for_suite(toy_suite(), 32)
    model, tok = build_tiny(codec, ["push the red ball left"], overrides=SMALL)
    model_dir = bucket / "run" / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    codec.save(model_dir)
    files = model_files("fake://run/model")
    assert files["model"] == files["merged"] == "fake://run/model" and files["adapter"] is None
    loaded, tok2, codec2 = load_grounded("fake://run/model")
    assert codec2.n_bins == 32 and loaded.config.vocab_size >= len(tok2)
