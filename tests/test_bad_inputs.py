"""Bad inputs are refused through the real CLI: one line naming the file or key, exit code 2,
no traceback unless ``--debug``, and nothing already in the run directory changed.

Each case builds a tiny run directory directly (toy Parquet episodes in the project schema,
manifests) and runs ``kalm <stage>`` in process, as tests/test_cli.py does; every refusal
here happens before Ray starts. One case runs the installed entry point as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from synthetic_data import ToyTask, write_toy_run

from kalm_ray.artifacts import Manifest, RunDir, write_manifest
from kalm_ray.cli import main

NAME = "bad"


# ---- helpers ----------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: (size, mtime_ns, sha256)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def assert_untouched(before: dict, root: Path) -> None:
    """Nothing that was there is gone or changed (new files are allowed)."""
    after = snapshot(root)
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    assert not gone and not changed, (gone, changed)


def toy_run(root: Path, *, name: str = NAME) -> RunDir:
    """``data/real`` (one good Parquet file), ``data/instructions.parquet``, collect manifest."""
    run = RunDir(str(root))
    run.claim(name)
    write_toy_run(run, ToyTask(discrete=True, emb_dim=8), episodes=6, horizon=3)
    return run


def write_config(tmp_path: Path, run_dir: Path, **sections: object) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": NAME, "run_dir": str(run_dir), **sections}))
    return str(path)


def refused(capsys, argv: list[str], *, needle: str, debug: bool = False) -> str:
    """Run the CLI, check exit code 2 and one stderr line holding ``needle``; return the line."""
    rc = main([*argv, "--debug"] if debug else argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    if debug:
        assert any(line.startswith("Traceback (most recent call last)") for line in err), err
        line = err[-1]
    else:
        assert len(err) == 1, err
        assert "Traceback" not in err[0]
        line = err[0]
    assert line.startswith("kalm: error: ") and needle in line, line
    if os.environ.get("KALM_RECORD_REFUSALS"):  # docs/reliability.md's table comes from this
        with open(os.environ["KALM_RECORD_REFUSALS"], "a") as f:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            f.write(json.dumps({"test": test, "argv": argv[:1], "rc": rc, "line": line}) + "\n")
    return line


# ---- config files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"collect": {"episodes_per_task": "many"}}, "collect.episodes_per_task: Input should be"),
        ({"collect": {"episodes": 3}}, "collect.episodes: unknown key"),
        ({"collect": {"episodes_per_task": -1}}, "collect.episodes_per_task: Input should be"),
        ({"imagine": {"rollouts_per_level": -5}}, "imagine.rollouts_per_level"),
        ({"ground": {"model": {"trust_remote_code": "yes please"}}}, "trust_remote_code"),
    ],
    ids=["wrong-type", "unknown-key", "negative-count", "negative-rollouts", "wrong-bool"],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, capsys, sections, needle):
    root = tmp_path / "run"
    toy_run(root)
    before = snapshot(root)
    cfg = write_config(tmp_path, root, **sections)
    line = refused(capsys, ["run", cfg], needle=needle)
    assert cfg in line  # names the file too
    assert_untouched(before, root)


# ---- data/real ----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(3000))


def _foreign(path: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_truncate, "not a readable Parquet file"),
        (_garbage, "not a readable Parquet file"),
        (_foreign, "not an episode file (no column 'episode_id')"),
    ],
    ids=["truncated", "garbage", "foreign-parquet"],
)
@pytest.mark.parametrize("stage", ["ground", "train"])
def test_bad_parquet_in_data_real(tmp_path, capsys, damage, needle, stage):
    root = tmp_path / "run"
    toy_run(root)
    good = root / "data" / "real" / "part-0.parquet"
    bad = root / "data" / "real" / "part-1.parquet"
    bad.write_bytes(good.read_bytes())
    damage(bad)
    before = snapshot(root)
    cfg = write_config(tmp_path, root, train={"data": ["real"]})
    line = refused(capsys, [stage, cfg], needle=needle)
    assert str(bad) in line
    assert_untouched(before, root)


def test_debug_shows_the_traceback(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    _truncate(root / "data" / "real" / "part-0.parquet")
    before = snapshot(root)
    cfg = write_config(tmp_path, root)
    refused(capsys, ["ground", cfg], needle="not a readable Parquet file", debug=True)
    assert_untouched(before, root)


# ---- run directory ----------------------------------------------------------------------------


def test_run_dir_of_another_experiment(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root, name="someone-else")
    before = snapshot(root)
    cfg = write_config(tmp_path, root)
    line = refused(capsys, ["ground", cfg], needle="was written by experiment 'someone-else'")
    assert str(root) in line
    assert_untouched(before, root)


def test_corrupt_run_json(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    (root / "run.json").write_text("{not json")
    before = snapshot(root)
    cfg = write_config(tmp_path, root)
    refused(capsys, ["ground", cfg], needle=f"{root}/run.json: corrupt JSON")
    assert_untouched(before, root)


# ---- models ---------------------------------------------------------------------------------


def test_model_path_that_does_not_exist(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    before = snapshot(root)
    cfg = write_config(tmp_path, root, ground={"model": {"name": "/nonexistent"}})
    refused(
        capsys, ["ground", cfg], needle="ground.model.name: no such model folder '/nonexistent'"
    )
    assert_untouched(before, root)
    assert not (root / "model.work").exists()  # refused before any work folder


def test_model_folder_that_holds_no_model(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    before = snapshot(root)
    cfg = write_config(tmp_path, root, ground={"model": {"name": str(empty)}})
    refused(capsys, ["ground", cfg], needle=f"ground.model.name: cannot load '{empty}'")
    assert_untouched(before, root)


def _grounded(root: Path, *, codec_env: str | None) -> None:
    """A ``model/`` folder with a ground manifest; ``codec.json`` for ``codec_env`` (None: none)."""
    run = RunDir(str(root))
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if codec_env is not None:
        from kalm_ray.envs import get_suite
        from kalm_ray.llm.codec import Codec

        Codec.for_suite(get_suite(codec_env), n_bins=16).save(root / "model")
    write_manifest(run, "model", Manifest.new("ground", "g", {}))


def test_model_folder_without_codec(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    _grounded(root, codec_env=None)
    before = snapshot(root)
    cfg = write_config(tmp_path, root)
    refused(capsys, ["imagine", cfg], needle=f"{root}/model/codec.json: missing")
    assert_untouched(before, root)
    assert not (root / "data" / "imagined").exists()


def test_model_grounded_on_another_env(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    _grounded(root, codec_env="metaworld")
    before = snapshot(root)
    cfg = write_config(tmp_path, root, env={"name": "clevr"})
    refused(capsys, ["imagine", cfg], needle="a model grounded on env 'metaworld', not 'clevr'")
    assert_untouched(before, root)


# ---- policies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy_env", "config_env"), [("clevr", "metaworld"), ("metaworld", "clevr")]
)
def test_policy_of_another_env(tmp_path, capsys, policy_env, config_env):
    root = tmp_path / "run"
    run = toy_run(root)
    dims = {"clevr": 10, "metaworld": 91}
    info = {
        "algo": "bc",
        "data": "real",
        "seed": 0,
        "env": policy_env,
        "state_dim": dims[policy_env],
        "emb_dim": 384,
        "obs_dim": dims[policy_env] + 384,
        "encoder": "default",
    }
    run.write_json(info, "policy", "bc-real-seed0", "policy_info.json")
    run.makedirs("policy", "bc-real-seed0", "module")
    write_manifest(run, "policy", Manifest.new("train", "t", {}))
    before = snapshot(root)
    cfg = write_config(tmp_path, root, env={"name": config_env})
    line = refused(
        capsys,
        ["evaluate", cfg],
        needle=f"a policy for env {policy_env!r}, not {config_env!r}",
    )
    assert f"{root}/policy/bc-real-seed0" in line
    assert_untouched(before, root)
    assert not (root / "eval").exists()


# ---- the installed entry point ------------------------------------------------------------------


def test_entry_point_subprocess(tmp_path):
    """``python -m kalm_ray.cli``: the same line and exit code; ``--debug`` adds the traceback."""
    root = tmp_path / "run"
    toy_run(root)
    before = snapshot(root)
    cfg = write_config(tmp_path, root, collect={"episodes_per_task": -1})
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "kalm_ray.cli", "collect", cfg]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    lines = plain.stderr.strip().splitlines()
    assert plain.returncode == 2 and len(lines) == 1, plain.stderr
    assert lines[0].startswith(f"kalm: error: {cfg}: collect.episodes_per_task")
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == lines[0]
    assert_untouched(before, root)


def test_footer_with_bad_utf8_is_one_input_error(tmp_path):
    """Issue 19 follow-up: a byte flipped in a footer's column name raised UnicodeDecodeError,
    which escaped as a generic error; it is now the same one-line InputError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kalm_ray.data import check_parquet_files
    from kalm_ray.errors import InputError

    folder = tmp_path / "data" / "real"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"episode_zzzz": [1, 2]}), folder / "p.parquet", store_schema=False)
    raw = (folder / "p.parquet").read_bytes().replace(b"episode_zzzz", b"\xffpisode_zzzz")
    (folder / "p.parquet").write_bytes(raw)
    with pytest.raises(InputError, match="not a readable Parquet file") as err:
        check_parquet_files(str(tmp_path))
    assert "p.parquet" in str(err.value) and "\n" not in str(err.value)
