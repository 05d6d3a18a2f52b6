"""Run directory: atomic stage outputs, manifests, ownership, fingerprints."""

from __future__ import annotations

import pytest

from kalm_ray.artifacts import RunDir, stage_output, write_manifest
from kalm_ray.config import parse_config
from kalm_ray.errors import InputError, RunDirError
from kalm_ray.stage import plan_stage


def test_stage_output_is_atomic(tmp_path) -> None:
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(RuntimeError):
        with stage_output(run, "data/real") as tmp:
            run.write_text("half", tmp, "part-0.parquet")
            raise RuntimeError("crash")
    assert not run.exists("data/real")
    assert [n for n in run.list("data") if n.startswith("real")] == []


def test_rewrite_keeps_previous_output(tmp_path) -> None:
    run = RunDir(str(tmp_path / "run"))
    for text in ("first", "second"):
        with stage_output(run, "model") as tmp:
            run.write_text(text, tmp, "x.txt")
    assert run.read_bytes("model", "x.txt") == b"second"
    old = [n for n in run.list() if n.startswith("model.replaced-")]
    assert len(old) == 1 and run.read_bytes(old[0], "x.txt") == b"first"


def test_plan_skips_only_when_fingerprint_matches(tmp_path) -> None:
    cfg = parse_config({"name": "exp", "run_dir": str(tmp_path / "run")})
    plan = plan_stage("collect", cfg, None)
    assert plan.current is None
    with stage_output(plan.run, plan.out_dir) as tmp:
        write_manifest(plan.run, tmp, plan.manifest(counts={"episodes": 1}))
    assert plan_stage("collect", cfg, None).current is not None
    changed = parse_config(
        {"name": "exp", "run_dir": str(tmp_path / "run"), "collect": {"epsilon": 0.5}}
    )
    assert plan_stage("collect", changed, None).current is None
    # A downstream stage names its input by output_id: a rebuilt collect reruns ground.
    g1 = plan_stage("ground", cfg, None).fingerprint
    with stage_output(plan.run, plan.out_dir) as tmp:
        write_manifest(plan.run, tmp, plan.manifest())
    assert plan_stage("ground", cfg, None).fingerprint != g1


def test_missing_input_and_foreign_run_dir(tmp_path) -> None:
    cfg = parse_config({"name": "exp", "run_dir": str(tmp_path / "run")})
    with pytest.raises(InputError, match="needs the output of 'collect'"):
        plan_stage("ground", cfg, None)
    other = parse_config({"name": "other", "run_dir": str(tmp_path / "run")})
    with pytest.raises(RunDirError, match="written by experiment 'exp'"):
        plan_stage("collect", other, None)


def test_unwritable_run_dir(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    cfg = parse_config({"name": "exp", "run_dir": str(blocker / "run")})
    with pytest.raises(RunDirError, match="not writable"):
        plan_stage("collect", cfg, None)
