"""Issue 19, the fast half (no Ray): run-dir leases, manifest checksums and `kalm verify`,
one-line errors for bad URIs / model folders / JSON artefacts, strict configs.

The slow half (real `kalm` subprocesses: SIGTERM, a killed collect resumed, two concurrent
collects, Ray's listeners and token auth) is tests/test_reliability_slow.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from synthetic_data import ToyTask, write_toy_run

import kalm_ray.artifacts as artifacts
from kalm_ray.artifacts import (
    Lease,
    Manifest,
    RunDir,
    Staging,
    stage_output,
    verify_manifest,
    write_manifest,
)
from kalm_ray.cli import main
from kalm_ray.config import ExperimentConfig, load_config, parse_config
from kalm_ray.errors import ConfigError, RunDirError
from kalm_ray.stage import plan_stage

NAME = "rel"


def toy_run(root: Path) -> RunDir:
    run = RunDir(str(root))
    run.claim(NAME)
    write_toy_run(run, ToyTask(discrete=True, emb_dim=8), episodes=6, horizon=3)
    return run


def write_config(tmp_path: Path, run_dir: Path | str, **sections: object) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": NAME, "run_dir": str(run_dir), **sections}))
    return str(path)


def one_line(capsys, argv: list[str], *, rc: int = 2) -> str:
    got = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert got == rc, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ---- 1. leases ----------------------------------------------------------------------------------

HOLD = (
    "import sys, time\n"
    "from kalm_ray.artifacts import RunDir\n"
    "with RunDir(sys.argv[1]).lease('data/real', stage='collect'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def _holder(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_then_takes_over_a_dead_one(tmp_path, capsys):
    root = tmp_path / "run"
    proc = _holder(root)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunDirError) as e:
            with RunDir(str(root)).lease("data/real", stage="collect"):
                pass
        assert time.monotonic() - t0 < 2
        msg = str(e.value)
        assert "is being written by kalm collect" in msg and f"pid {proc.pid}" in msg, msg
        assert "\n" not in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The holder died without releasing: its lease is stale (dead pid, same host).
    with RunDir(str(root)).lease("data/real", stage="collect") as lease:
        rec = json.loads((root / "data" / "real.lease").read_text())
        assert rec["owner"] == lease.token and rec["pid"] == os.getpid()
    assert f"took over the stale lease of kalm collect (pid {proc.pid}" in capsys.readouterr().err
    assert not (root / "data" / "real.lease").exists()  # released


def _foreign_lease(path: Path, *, expires_in: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"owner": "x" * 32, "host": "another-host", "pid": 1, "stage": "collect",
           "started": time.time() - 60, "expires": time.time() + expires_in}
    path.write_text(json.dumps(rec))


def test_lease_of_another_host_counts_until_it_expires(tmp_path, capsys):
    root = tmp_path / "run"
    _foreign_lease(root / "data" / "real.lease", expires_in=60)
    with pytest.raises(RunDirError, match="pid 1 on another-host"):
        with RunDir(str(root)).lease("data/real", stage="collect"):
            pass
    _foreign_lease(root / "data" / "real.lease", expires_in=-5)
    with RunDir(str(root)).lease("data/real", stage="collect"):
        pass
    assert "(expired 5s ago)" in capsys.readouterr().err


def test_lease_is_reentrant_renewed_and_refuses_commit_once_lost(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with run.lease("eval", stage="evaluate") as outer:
        with run.lease("eval") as inner:  # the stage's writer nests inside the pipeline's
            assert inner is outer
        before = json.loads((tmp_path / "run" / "eval.lease").read_text())["expires"]
        time.sleep(0.05)
        assert outer.renew()
        assert json.loads((tmp_path / "run" / "eval.lease").read_text())["expires"] > before
        # Someone took it over (we were suspended past expiry): renewal says so, and the
        # stage's final rename is refused.
        _foreign_lease(tmp_path / "run" / "eval.lease", expires_in=60)
        assert not outer.renew() and outer.lost
        with pytest.raises(RunDirError, match="lost its lease"):
            with stage_output(run, "eval") as tmp:
                run.write_text("x", tmp, "results.json")
        assert not run.exists("eval")


def test_object_store_lease_is_create_if_absent(tmp_path):
    """The non-local path (pyarrow.fs without O_EXCL), on pyarrow's in-memory filesystem."""
    run = RunDir(str(tmp_path / "unused"))
    run.fs, run.root = pafs._MockFileSystem(), "bucket/run"
    assert not run.is_local
    lease = Lease(run, "data/real", stage="collect")
    lease.acquire()
    try:
        rec = json.loads(run.read_bytes("data/real.lease"))
        assert rec["owner"] == lease.token
        # A live holder elsewhere: refused.
        run.write_json({**rec, "owner": "y" * 32, "host": "another-host"}, "data/real.lease")
        with pytest.raises(RunDirError, match="another-host"):
            Lease(run, "data/real", stage="collect").acquire()
    finally:
        lease.release()


# ---- 2. checksums -------------------------------------------------------------------------------


def _current_collect(tmp_path: Path) -> tuple[ExperimentConfig, RunDir]:
    """A toy run whose data/real manifest is current for the config (so collect would skip)."""
    root = tmp_path / "run"
    run = toy_run(root)
    cfg = parse_config({"name": NAME, "run_dir": str(root)})
    plan = plan_stage("collect", cfg, run)
    old = run.manifest("data/real")
    write_manifest(
        run, "data/real", plan.manifest(counts=old.counts), also=("data/instructions.parquet",)
    )
    assert plan_stage("collect", cfg, run).current is not None
    return cfg, run


def test_the_run_summary_says_which_stages_a_rerun_redoes(tmp_path):
    """``kalm run --only collect`` after an edit listed every finished stage as done; the
    summary now says which ones the next run would redo."""
    from kalm_ray.stage import stage_states

    cfg, run = _current_collect(tmp_path)
    states = stage_states(cfg, run)
    assert states["collect"] == "done"
    assert states["ground"] == states["imagine"] == "not run"
    edited = parse_config({"name": NAME, "run_dir": cfg.run_dir, "collect": {"epsilon": 0.5}})
    assert stage_states(edited, run)["collect"] == "out of date (the next run redoes it)"
    # What `kalm run` checks before the first stage: the stages that will run, not those up
    # to date (skipped whatever this machine lacks), and every stage after one that reruns.
    from kalm_ray.pipeline import stages_to_run

    assert stages_to_run(cfg, run, ["collect", "ground", "imagine"]) == ["ground", "imagine"]
    assert stages_to_run(edited, run, ["collect", "ground"]) == ["collect", "ground"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_output_is_not_skipped_as_up_to_date(tmp_path, capsys):
    cfg, run = _current_collect(tmp_path)
    part = next((tmp_path / "run" / "data" / "real").glob("*.parquet"))
    _truncate(part)
    assert plan_stage("collect", cfg, run).current is None
    err = capsys.readouterr().err
    assert f"{part}: size" in err and "collect: its output is damaged; running it again" in err
    # `kalm run` plans the stage, then the stage plans itself: said once, not twice
    assert plan_stage("collect", cfg, run).current is None
    assert capsys.readouterr().err == ""


def test_damaged_input_is_one_line_naming_file_and_stage(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    part = next((root / "data" / "real").glob("*.parquet"))
    cfg = write_config(tmp_path, root)
    # A file of the manifest that is gone (a truncated one fails its footer check first).
    part.unlink()
    line = one_line(capsys, ["ground", cfg])
    assert line.startswith(f"kalm: error: {part}: missing; ")
    assert f"`kalm collect CONFIG --run-dir {root}" in line  # the run dir the user gave
    # A byte changed in place (same size) is seen too.
    toy_run(root)
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF  # in the first data page: the footer still reads
    part.write_bytes(bytes(data))
    line = one_line(capsys, ["ground", cfg])
    assert "content differs from what was written" in line


def test_instructions_file_beside_the_folder_is_covered(tmp_path, capsys):
    cfg, run = _current_collect(tmp_path)
    (tmp_path / "run" / "data" / "instructions.parquet").write_bytes(b"garbage")
    assert plan_stage("collect", cfg, run).current is None


def test_older_manifest_without_checksums_loads_unverified(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    m = json.loads((root / "data/real/manifest.json").read_text())
    del m["checksums"]
    (root / "data/real/manifest.json").write_text(json.dumps(m))
    artifacts._said_unverified.clear()
    cfg = parse_config({"name": NAME, "run_dir": str(root)})
    plan_stage("ground", cfg, RunDir(str(root)))
    err = capsys.readouterr().err
    assert "data/real: manifest has no checksums (written by an older kalm_ray)" in err


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"fingerprint": None}, "field 'fingerprint' is a JSON null, expected a string"),
        ({"inputs": None}, "field 'inputs' is a JSON null, expected an object"),
        ({"counts": []}, "field 'counts' is a JSON array"),
        ({"inputs": {"collect": None}}, "field 'inputs' names 'collect' with no output id"),
        ({"checksums": {"data/real/x": 3}}, "checksum of 'data/real/x' is not {size, sha256}"),
    ],
)
def test_manifest_with_null_or_wrong_fields_is_one_line(tmp_path, capsys, edit, needle):
    root = tmp_path / "run"
    toy_run(root)
    path = root / "data/real/manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    line = one_line(capsys, ["ground", write_config(tmp_path, root)])
    assert line.startswith(f"kalm: error: {path}: ") and needle in line, line


def test_manifest_that_is_not_an_object(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    (root / "data/real/manifest.json").write_text("[1, 2]")
    line = one_line(capsys, ["ground", write_config(tmp_path, root)])
    assert "not a kalm_ray manifest (a JSON array)" in line


def test_kalm_verify(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "collect   " in out and "files intact" in out and "ground    " in out
    part = next((root / "data" / "real").glob("*.parquet"))
    _truncate(part)
    assert main(["verify", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"kalm: damaged: {part}: size")
    assert f"`kalm collect CONFIG --run-dir {root}" in err[0]
    assert err[-1].startswith("kalm: error: 1 problem(s)")
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert main(["verify", str(tmp_path)]) == 2  # the folder above the run: not a run
    assert "not a kalm run directory" in capsys.readouterr().err
    # An input that is gone: the stage made from it is not "intact" alone.
    import shutil

    run = RunDir(str(root))
    with stage_output(run, "model") as tmp:
        run.write_bytes(b"weights", tmp, "model.safetensors")
    write_manifest(run, "model", Manifest.new("ground", "h", {"collect": "gone-id"}))
    shutil.rmtree(root / "data" / "real")
    assert main(["verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert "made from a 'collect' output that is no longer there" in err
    assert f"kalm run CONFIG --from collect --run-dir {root}" in err
    # A damaged manifest is that stage's problem; the others are still checked.
    (root / "model" / "manifest.json").write_text("{not json")
    assert main(["verify", str(root)]) == 2
    cap = capsys.readouterr()
    assert "ground    " in cap.out and "manifest damaged" in cap.out
    assert "kalm: error: 1 problem(s)" in cap.err
    # A run.json that is no run record.
    (root / "run.json").write_text("[1]")
    assert main(["verify", str(root)]) == 2
    assert "run.json: expected a JSON object" in capsys.readouterr().err
    (root / "run.json").write_text('{"seed": 0}')
    assert main(["verify", str(root)]) == 2
    assert "run.json: no 'experiment' field" in capsys.readouterr().err


def test_big_files_get_a_sampled_digest_and_a_full_one(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "QUICK_LIMIT", 4096)
    monkeypatch.setattr(artifacts, "SAMPLE_BLOCK", 64)
    run = RunDir(str(tmp_path / "run"))
    with stage_output(run, "model") as tmp:
        run.write_bytes(os.urandom(100_000), tmp, "model.safetensors")
    m = Manifest.new("ground", "h", {})
    write_manifest(run, "model", m)
    digest = m.checksums["model/model.safetensors"]
    assert set(digest) == {"size", "sha256", "sample"}
    path = tmp_path / "run" / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[50_000] ^= 1  # between sampled blocks: the quick check misses it, the full one not
    path.write_bytes(bytes(data))
    assert verify_manifest(run, "model", m) == []
    assert [d.path for d in verify_manifest(run, "model", m, full=True)] == [
        "model/model.safetensors"
    ]
    data[0] ^= 1  # in the first block: seen by the quick check
    path.write_bytes(bytes(data))
    assert len(verify_manifest(run, "model", m)) == 1


def test_staging_lists_only_units_whose_file_is_as_marked(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    st = Staging(run, "data/real.partial-x")
    for name in ("a.parquet", "b.parquet", "c.parquet"):
        run.write_bytes(name.encode() * 10, st.folder, name)
    st.mark_finished("a.parquet", {"episodes": 3})
    st.mark_finished("b.parquet")
    run.write_bytes(b"changed", st.folder, "b.parquet")  # rewritten after its mark: redo
    assert st.finished() == {"a.parquet": {"episodes": 3}}


# ---- 4. one-line errors -------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["ftp://example.com/runs/x", "hdfs://namenode:8020/runs/x"])
def test_unsupported_uri_scheme_is_one_line(tmp_path, capsys, uri):
    line = one_line(capsys, ["collect", write_config(tmp_path, "unused"), "--run-dir", uri])
    assert line.startswith(f"kalm: error: run_dir {uri!r}: not a usable path or URI ("), line


def test_corrupt_config_json_of_the_grounded_model_before_ray(tmp_path, capsys):
    root = tmp_path / "run"
    run = toy_run(root)
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text('{"model_type": "llama",')
    write_manifest(run, "model", Manifest.new("ground", "h", {"collect": "x"}))
    line = one_line(capsys, ["imagine", write_config(tmp_path, root)])
    assert line == f"kalm: error: {root}/model/config.json: corrupt JSON (Expecting property " \
        "name enclosed in double quotes, line 1)", line


def test_corrupt_config_json_of_the_base_model(tmp_path, capsys):
    root = tmp_path / "run"
    toy_run(root)
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("[]")
    line = one_line(capsys, ["ground", write_config(tmp_path, root, ground={"model": {
        "name": str(model)}})])
    assert line == f"kalm: error: ground.model.name: {model}/config.json: not a JSON object"


@pytest.mark.parametrize(
    ("info", "needle"),
    [
        ([1, 2], "policy_info.json: expected a JSON object, got a JSON array"),
        ({"algo": "bc", "seed": "zero"}, "policy_info.json: field 'seed' is a JSON string, not"),
        ({"algo": 3}, "policy_info.json: field 'algo' is a JSON number, not string"),
    ],
)
def test_policy_info_of_wrong_shape_is_one_line(tmp_path, capsys, info, needle):
    root = tmp_path / "run"
    run = toy_run(root)
    (root / "policy" / "bc-real-seed0").mkdir(parents=True)
    (root / "policy" / "bc-real-seed0" / "policy_info.json").write_text(json.dumps(info))
    write_manifest(run, "policy", Manifest.new("train", "h", {"collect": "x"}))
    line = one_line(capsys, ["evaluate", write_config(tmp_path, root)])
    assert line.startswith(f"kalm: error: {root}/policy/bc-real-seed0/") and needle in line, line


@pytest.mark.parametrize(
    ("results", "needle"),
    [
        ({"levels": ["train"], "groups": {}}, "results.json: no 'policies' field"),
        ({"policies": [], "levels": [], "groups": {}}, "field 'policies' is a JSON array"),
        ({"policies": {"p": {}}, "levels": ["train"], "groups": {}}, "policy 'p' has no 'levels'"),
        ({"policies": {}, "levels": [1], "groups": {}}, "'levels' is not a list of level names"),
        ("results", "expected a JSON object, got a JSON string"),
    ],
)
def test_results_json_of_wrong_shape_for_kalm_report(tmp_path, capsys, results, needle):
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "results.json").write_text(json.dumps(results))
    RunDir(str(tmp_path / "run")).claim(NAME)  # run.json, as the first stage writes it
    line = one_line(capsys, ["report", str(tmp_path / "run")])
    assert line.startswith(f"kalm: error: {tmp_path}/run/eval/results.json: ") and needle in line


# ---- 5. strict config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("collect:\n  episodes_per_task: true\n", "collect.episodes_per_task: a "
         "boolean is not accepted here (got True)"),
        ("collect:\n  epsilon: true\n", "collect.epsilon: a boolean is not accepted"),
        ("train:\n  hidden: [true, 8]\n", "train.hidden.0: Input should be a valid integer"),
        ("collect:\n  episodes_per_task: 10000000000000000000000\n",
         "collect.episodes_per_task: Input should be less than or equal to 10000000"),
        ("imagine:\n  rollouts_per_level: 100000000\n", "imagine.rollouts_per_level: Input should "
         "be less than or equal to 10000000"),
        ("ground:\n  max_steps: 99999999999\n", "ground.max_steps: Input should be less than"),
        ("train:\n  iterations: 99999999999\n", "train.iterations: Input should be less than"),
        ("collect:\n  episodes_per_task: 2\n  episodes_per_task: 3\n",
         "line 4 not valid YAML (duplicate key 'episodes_per_task')"),
        ("collect: {}\ntrain: {}\ncollect: {}\n",
         "line 4 not valid YAML (duplicate key 'collect')"),
    ],
)
def test_strict_config(tmp_path, text, needle):
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: {NAME}\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:") and needle in str(e.value), str(e.value)


def test_strict_config_still_takes_what_it_should(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: {NAME}\nray: {{dashboard: true}}\ncollect: {{episodes_per_task: 5, epsilon: 0}}\n"
        "imagine: {temperature: 1}\ntrain: {seeds: [0, 1]}\n"
    )
    cfg = load_config(path)
    assert cfg.collect.episodes_per_task == 5 and cfg.collect.epsilon == 0.0
    assert cfg.ray.dashboard is True and cfg.train.seeds == [0, 1]


def test_shipped_configs_load():
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
        load_config(path)

