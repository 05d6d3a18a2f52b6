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
    plan_stage("collect", cfg, None)  # claims the run dir for 'exp'
    other = parse_config({"name": "other", "run_dir": str(tmp_path / "run")})
    with pytest.raises(RunDirError, match="written by experiment 'exp'"):
        plan_stage("collect", other, None)


def test_rerun_hints_name_the_run_dir_and_its_seed(tmp_path) -> None:
    """A hint is copied as it is: it must act on this run dir and master seed, not on the
    config's own run_dir (a replicate's hint without them would rerun seed 0's run)."""
    where = tmp_path / "my runs" / "q_s3"
    cfg = parse_config({"name": "exp", "run_dir": str(where), "seed": 3})
    with pytest.raises(InputError) as e:
        plan_stage("ground", cfg, None)
    quoted = f"'{where}'"  # the space is quoted for the shell
    assert f"run `kalm collect CONFIG --run-dir {quoted} --seed 3`" in str(e.value)
    assert f"(or `kalm run CONFIG --run-dir {quoted} --seed 3`)" in str(e.value)
    bare = RunDir(str(tmp_path / "empty"))  # no run.json yet (or an older one): no seed
    assert bare.command("run", "--from", "train") == (
        f"kalm run CONFIG --from train --run-dir {bare.uri}"
    )


def test_a_refused_command_does_not_claim_the_run_dir(tmp_path, capsys) -> None:
    """Refused for a missing input, or a task that is not one, a command leaves no
    ``run.json``: the right seed's first command must not be refused for it."""
    from kalm_ray.errors import ConfigError
    from kalm_ray.stages.collect import run_collect

    cfg = {"name": "exp", "run_dir": str(tmp_path / "run")}
    with pytest.raises(InputError, match="needs the output of 'collect'"):
        plan_stage("imagine", parse_config({**cfg, "seed": 3}), None)
    with pytest.raises(ConfigError, match="collect.tasks: 'nope' is not a task"):
        run_collect(parse_config({**cfg, "seed": 4, "collect": {"tasks": ["nope"]}}))
    # Nor a Ray address nothing listens on (kalm run checks it before the first stage).
    from kalm_ray.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: exp\nrun_dir: {cfg['run_dir']}\nray: {{address: '127.0.0.1:1'}}\n")
    assert main(["collect", str(bad), "--seed", "5"]) == 2
    assert not (tmp_path / "run" / "run.json").exists()
    plan_stage("collect", parse_config({**cfg, "seed": 0}), None)  # seed 0 claims it
    assert RunDir(cfg["run_dir"]).read_json("run.json")["seed"] == 0


def test_unwritable_run_dir(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    cfg = parse_config({"name": "exp", "run_dir": str(blocker / "run")})
    with pytest.raises(RunDirError, match="not writable"):
        plan_stage("collect", cfg, None)


def test_run_dir_holds_one_master_seed(tmp_path) -> None:
    """``--seed N`` is a replicate: rerun in the same dir it would replace the other seed's
    stages, so the dir refuses it; a dir from before the seed was recorded is not checked."""
    cfg = {"name": "exp", "run_dir": str(tmp_path / "run")}
    plan_stage("collect", parse_config({**cfg, "seed": 0}), None)
    plan_stage("collect", parse_config({**cfg, "seed": 0}), None)  # the same seed: fine
    with pytest.raises(RunDirError, match="holds master seed 0's run of 'exp', not seed 1's"):
        plan_stage("collect", parse_config({**cfg, "seed": 1}), None)
    legacy = RunDir(str(tmp_path / "old"))
    legacy.write_json({"experiment": "exp", "created": 0.0}, "run.json")
    for seed in (3, 0):
        plan_stage("collect", parse_config({**cfg, "run_dir": legacy.uri, "seed": seed}), None)
    assert "seed" not in legacy.read_json("run.json")


def test_llm_row_is_evaluated_again_after_a_new_grounding(tmp_path) -> None:
    """With ``evaluate.llm_policy`` the evaluation plays the grounded model, so a new grounding
    changes its fingerprint even where the policies' data do not read it (``data: [real]``)."""
    base = {"name": "exp", "run_dir": str(tmp_path / "run"), "train": {"data": ["real"]}}
    run = RunDir(base["run_dir"])
    with_llm = parse_config({**base, "evaluate": {"llm_policy": True}})
    without = parse_config(base)
    for stage in ("collect", "ground", "train"):
        plan = plan_stage(stage, with_llm, None)
        with stage_output(run, plan.out_dir) as tmp:
            write_manifest(run, tmp, plan.manifest())
    first, no_llm = plan_stage("evaluate", with_llm, None), plan_stage("evaluate", without, None)
    assert set(first.inputs) == {"train", "ground"} and set(no_llm.inputs) == {"train"}
    plan = plan_stage("ground", with_llm, None)
    with stage_output(run, plan.out_dir) as tmp:  # ground again: a new output id
        write_manifest(run, tmp, plan.manifest())
    assert plan_stage("evaluate", with_llm, None).fingerprint != first.fingerprint
    assert plan_stage("evaluate", without, None).fingerprint == no_llm.fingerprint


def test_an_input_made_under_other_settings_is_named_once(tmp_path, capsys) -> None:
    """Inputs chain by identity, so a stage after an edit of an earlier stage's section uses
    the output already there; it says so once, naming the keys, and only then."""
    base = {"name": "exp", "run_dir": str(tmp_path / "run")}
    run = RunDir(base["run_dir"])
    cfg = parse_config(base)
    plan = plan_stage("collect", cfg, None)
    with stage_output(run, plan.out_dir) as tmp:
        plan.save_config(tmp)
    write_manifest(run, plan.out_dir, plan.manifest())
    plan_stage("ground", cfg, None)
    assert "made under other" not in capsys.readouterr().out  # same settings: nothing to say
    edited = parse_config({**base, "collect": {"episodes_per_task": 3, "num_workers": 1}})
    plan_stage("ground", edited, None)
    err = capsys.readouterr().out
    assert "[kalm] ground: " in err and "data/real was made under other env/collect/text" in err
    assert "(collect.episodes_per_task)" in err  # num_workers changes no output: not named
    assert "--from collect" in err and err.count("\n") == 1
    plan_stage("ground", edited, None)
    assert capsys.readouterr().out == ""  # once per input and process, whichever stage asks
    # Whatever the config beside the input holds, the note never stops the stage.
    odd = {**base, "run_dir": str(tmp_path / "odd")}
    plan = plan_stage("collect", parse_config(odd), None)
    with stage_output(plan.run, plan.out_dir) as tmp:
        plan.run.write_text("collect: null\nenv: [1, 2]\n", tmp, "config.yaml")
    write_manifest(plan.run, plan.out_dir, plan.manifest())
    plan_stage("ground", parse_config({**odd, "collect": {"episodes_per_task": 3}}), None)
    assert "data/real was made under other env/collect/text settings than this config's;" in (
        capsys.readouterr().out
    )


def test_a_staging_folder_of_other_settings_is_named_not_resumed_nor_removed(tmp_path, capsys):
    """A stage stopped under other settings (or older code) leaves ``<dir>.partial-<key>``;
    the next run under this config names it in one line and leaves it alone."""
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt), stage_output(run, "data/imagined", resume_key="a" * 64):
        raise KeyboardInterrupt  # stopped: the staging folder stays
    assert run.exists("data/imagined.partial-" + "a" * 16)
    capsys.readouterr()
    with stage_output(run, "data/imagined", resume_key="b" * 64) as tmp:
        run.write_text("x", tmp, "f.txt")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"imagined.partial-{'a' * 16}: left by a stopped run" in out
    assert run.exists("data/imagined.partial-" + "a" * 16) and run.exists("data/imagined/f.txt")
    with stage_output(run, "model", resume_key="c" * 64):  # a top-level stage folder: no others
        pass
    assert capsys.readouterr().out == ""
