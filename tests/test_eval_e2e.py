"""``run_evaluate`` end to end on a toy suite with scripted stand-ins, then ``kalm report``."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from test_eval_support import ToySuite, load_scripted, toy_make_obs, toy_suite_env, write_toy_run

from kalm_ray.artifacts import RunDir
from kalm_ray.cli import main
from kalm_ray.config import parse_config
from kalm_ray.eval.eval_actor import EvalPool
from kalm_ray.stages import evaluate as ev_mod
from kalm_ray.stages.evaluate import run_evaluate

POLICIES = ["bc-real-seed0", "bc-real+imagined-seed0", "bc-real-seed1", "bc-real+imagined-seed1"]


@pytest.fixture
def toy_stage(monkeypatch, tmp_path):
    monkeypatch.setattr(ev_mod, "get_suite", lambda name: ToySuite())
    monkeypatch.setattr(ev_mod, "make_suite_env", toy_suite_env)
    monkeypatch.setattr(ev_mod, "policy_loader", lambda: load_scripted)
    monkeypatch.setattr(ev_mod, "obs_builder", lambda: toy_make_obs)
    run = write_toy_run(tmp_path / "run", POLICIES)
    cfg = parse_config(
        {
            "name": "toy",
            "run_dir": str(tmp_path / "run"),
            "evaluate": {"num_workers": 2, "envs_per_worker": 4, "episodes_per_task": 4},
        }
    )
    return cfg, run


def test_evaluate_writes_results_headline_and_report(ray_local, toy_stage, capsys) -> None:
    cfg, run = toy_stage
    manifest = run_evaluate(cfg, run)
    n_specs = 4 * 11
    # 4 policies + the random baseline (evaluate.random_baseline, on by default)
    assert manifest.counts["episodes"] == 5 * n_specs and manifest.counts["actors_replaced"] == 0
    results = json.loads(run.read_bytes("eval", "results.json"))
    assert set(results["policies"]) == {*POLICIES, "random"}
    assert results["policies"]["random"]["algo"] == "random"
    assert results["levels"] == ["train", "rephrase", "easy", "hard"]
    smart = results["policies"]["bc-real+imagined-seed0"]
    assert smart["all"]["success_rate"] == 1.0 and smart["levels"]["train"]["episodes"] == 16
    assert set(smart["levels"]["easy"]["tasks"]) == {"t2", "t8"}
    weak = results["policies"]["bc-real-seed0"]["all"]
    assert 0 < weak["success_rate"] < 1 and weak["ci95"][0] < weak["success_rate"] < weak["ci95"][1]
    # Paired: scripted policies ignore the seed, so both seeds agree and the std is 0.
    g = results["groups"]["bc/real"]["levels"]["train"]
    assert g["n_seeds"] == 2 and g["std"] == 0.0 and g["pooled"]["episodes"] == 32
    p = results["paired"]["bc"]["train"]
    assert p["n_specs"] == 16 and p["n_pairs"] == 32 and p["diff"] > 0
    assert p["diff"] == pytest.approx(1.0 - g["mean"])

    headline = run.read_bytes("eval", "headline.md").decode()
    assert "| bc | train |" in headline and "Δ paired" in headline
    # Issue 10: the random baseline is a row of its own (and still a column beside each row).
    assert "random policy |" in headline and "| random | train |" in headline
    report = run.read_bytes("eval", "report.md").decode()
    assert "success_by_level.png" in report and "learning_curves.png" in report
    assert "No imagined data" in report  # no filter_report.json in this run: said, not crashed
    for png in ("success_by_level.png", "learning_curves.png"):
        assert run.read_bytes("eval", png)[:4] == b"\x89PNG"
    assert run.exists("eval", "manifest.json")
    # Paired: every policy ran exactly the same (index, level, task, wording, seed) list.
    eps = pq.read_table(run.path("eval", "episodes.parquet")).to_pylist()
    key = ("index", "level", "task", "wording", "seed")
    per_policy = {n: [tuple(r[k] for k in key) for r in eps if r["policy"] == n] for n in POLICIES}
    assert all(len(v) == n_specs for v in per_policy.values())
    assert len({tuple(v) for v in per_policy.values()}) == 1

    # Current manifest: skipped. `kalm report` regenerates the report from files alone.
    assert run_evaluate(cfg, run).output_id == manifest.output_id
    run.delete("eval", "report.md")
    assert main(["report", run.uri]) == 0
    assert run.exists("eval", "report.md")


def test_report_without_results_is_one_line_error(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) != 0  # not a run at all
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a kalm run directory" in err[0]
    RunDir(str(tmp_path)).claim("t", seed=2)  # a run not evaluated yet
    assert main(["report", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.json not found" in err[0]
    assert f"`kalm evaluate CONFIG --run-dir {tmp_path} --seed 2`" in err[0]


def test_interrupted_evaluate_resumes_its_finished_units(ray_local, toy_stage, capsys) -> None:
    """Issue 19: Ctrl-C after some work units; the rerun runs only the others and writes the
    same results and episodes as an uninterrupted evaluation."""
    import shutil

    from kalm_ray.artifacts import RunDir

    cfg, run = toy_stage
    ref_dir = run.path("..", "ref")
    shutil.copytree(run.path(), ref_dir)
    ref = RunDir(ref_dir)
    run_evaluate(cfg, ref)

    save, calls = ev_mod.UnitStore.save, []

    def interrupted(self, unit, results):
        save(self, unit, results)
        calls.append(unit.uid)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the driver

    ev_mod.UnitStore.save = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_evaluate(cfg, run)
    finally:
        ev_mod.UnitStore.save = save
    assert not run.exists("eval")
    staging = [n for n in run.list("") if n.startswith("eval.partial-")]
    assert len(staging) == 1 and len(run.list(staging[0], "_units")) == 3

    ran: list[int] = []
    real_run = EvalPool.run

    def spy(self, units):
        ran.extend(u.uid for u in units)
        return real_run(self, units)

    EvalPool.run = spy
    try:
        manifest = run_evaluate(cfg, run)
    finally:
        EvalPool.run = real_run
    assert "evaluate: resuming; 3 of" in capsys.readouterr().out
    assert manifest.counts["resumed_units"] == 3 and not set(calls) & set(ran)
    got = json.loads(run.read_bytes("eval", "results.json"))
    want = json.loads(ref.read_bytes("eval", "results.json"))
    assert got == want
    assert pq.read_table(run.path("eval", "episodes.parquet")).equals(
        pq.read_table(ref.path("eval", "episodes.parquet"))
    )
    assert not [n for n in run.list("eval") if n.startswith("unit-") or n == "_units"]
    assert not [n for n in run.list("") if n.startswith("eval.partial-")]
