"""Training units and the ``train`` stage on tiny synthetic data (see tests/synthetic_data.py)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic_data import ToyTask, write_toy_run

from kalm_ray.artifacts import RunDir
from kalm_ray.config import TrainConfig, parse_config
from kalm_ray.errors import ConfigError
from kalm_ray.rl.dataset import load_embeddings, make_obs, prepare_mix
from kalm_ray.rl.policy import CHECKPOINT_DIR, CURVE_FILE, MODULE_DIR, POLICY_INFO, load_policy
from kalm_ray.rl.unit import Unit, train_unit

TINY = TrainConfig(
    iterations=2, updates_per_iteration=3, batch_size=32, hidden=[32, 32], quick_eval_every=0
)


def _train(run, task, mix, unit, train) -> dict:
    """One unit on the toy run, no quick evaluation (the tests check the export instead)."""
    return train_unit(
        unit,
        train=train,
        run=run,
        out_dir="policy",
        mix=mix,
        action_space=task.action_space,
        info={"env": "toy", "encoder": "toy"},
        quick_eval=None,
    )


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    """A toy run per action kind, its ``real`` mix prepared once: {discrete: (run, task, mix)}."""
    out = {}
    for discrete in (True, False):
        run = RunDir(str(tmp_path_factory.mktemp("rl-train-d" if discrete else "rl-train-c")))
        task = ToyTask(discrete=discrete)
        write_toy_run(run, task, episodes=80, seed=4)
        mix = prepare_mix(
            run, "real", "policy/_data/real", embeddings=load_embeddings(run), ratio=None, seed=0
        )
        out[discrete] = (run, task, mix)
    return out


def _check_policy_folder(run: RunDir, task: ToyTask, name: str, algo: str) -> None:
    from ray.rllib.core.rl_module.rl_module import RLModule

    folder = run.path("policy", name)
    for f in (POLICY_INFO, MODULE_DIR, CHECKPOINT_DIR, CURVE_FILE):
        assert os.path.exists(os.path.join(folder, f)), f
    policy = load_policy(folder)
    info = policy.info
    assert (info["algo"], info["obs_dim"], info["state_dim"], info["emb_dim"]) == (
        algo,
        394,
        10,
        384,
    )
    rng = np.random.default_rng(0)
    obs = make_obs(rng.uniform(-1, 1, (7, 10)), task.embeddings[rng.integers(0, 8, 7)])
    a = policy.act(obs)
    assert np.array_equal(a, policy.act(obs))  # deterministic
    if task.discrete:
        assert a.shape == (7,) and a.dtype == np.int64 and ((a >= 0) & (a < 40)).all()
    else:
        assert a.shape == (7, 4) and a.dtype == np.float32 and (np.abs(a) <= 1).all()
    # The full RLlib checkpoint holds the learner's module, which loads and acts on its own.
    module = RLModule.from_checkpoint(
        os.path.join(
            folder, CHECKPOINT_DIR, "learner_group", "learner", "rl_module", "default_policy"
        )
    )
    import torch
    from ray.rllib.core.columns import Columns

    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: torch.from_numpy(obs)})
    assert out[Columns.ACTION_DIST_INPUTS].shape[0] == 7
    with open(os.path.join(folder, CURVE_FILE)) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2]


@pytest.mark.parametrize(
    "algo,discrete",
    [
        ("bc", True),
        ("dcql", True),
        pytest.param("marwil", True, marks=pytest.mark.slow),
        pytest.param("bc", False, marks=pytest.mark.slow),
        pytest.param("cql", False, marks=pytest.mark.slow),
        pytest.param("iql", False, marks=pytest.mark.slow),
    ],
)
def test_two_iterations_write_a_policy_that_reloads_and_acts(prepared, algo, discrete):
    run, task, mix = prepared[discrete]
    unit = Unit(algo, "real", 0)
    res = train_unit(
        unit,
        train=TINY,
        run=run,
        out_dir="policy",
        mix=mix,
        action_space=task.action_space,
        info={"env": "toy", "encoder": "toy"},
        quick_eval=None,
    )
    assert res["iterations"] == 2 and res["updates"] == 6
    _check_policy_folder(run, task, unit.name, algo)


def test_discrete_cql_learns_a_small_offline_task_better_than_chance(prepared):
    run, task, mix = prepared[True]
    train = TrainConfig(
        iterations=4,
        updates_per_iteration=100,
        batch_size=128,
        hidden=[64, 64],
        lr=1e-3,
        quick_eval_every=0,
        gamma=0.9,
    )
    unit = Unit("dcql", "real", 1)
    _train(run, task, mix, unit, train)
    policy = load_policy(run.path("policy", unit.name))
    rng = np.random.default_rng(7)
    instr = rng.integers(0, len(task.instructions), 500)
    states = rng.uniform(-1, 1, (500, 10)).astype(np.float32)
    accuracy = task.correct(
        instr, states, policy.act(make_obs(states, task.embeddings[instr]))
    ).mean()
    chance = 1 / task.action_space.n
    assert accuracy > 10 * chance, f"greedy-Q accuracy {accuracy:.3f} vs chance {chance:.3f}"


def test_resources_come_from_the_config_and_do_not_change_the_fingerprint():
    import gymnasium as gym
    from ray.data import ActorPoolStrategy

    from kalm_ray.rl.algos import build_config

    train = TrainConfig(
        num_learners=2,
        num_gpus_per_learner=0.5,
        num_cpus_per_learner=3,
        prelearner_actors=4,
        num_cpus_per_prelearner=0.25,
    )
    cfg = build_config(
        "marwil",
        train=train,
        data_path="/x",
        filesystem=None,
        obs_dim=4,
        action_space=gym.spaces.Discrete(3),
        num_rows=10,
        seed=0,
    )
    assert (cfg.num_learners, cfg.num_gpus_per_learner, cfg.num_cpus_per_learner) == (2, 0.5, 3)
    kw = cfg.map_batches_kwargs
    assert kw["concurrency"] is None and kw["num_cpus"] == 0.25  # no deprecated concurrency
    assert isinstance(kw["compute"], ActorPoolStrategy) and kw["compute"].max_size == 4
    default = build_config(
        "bc",
        train=TrainConfig(),
        data_path="/x",
        filesystem=None,
        obs_dim=4,
        action_space=gym.spaces.Discrete(3),
        num_rows=10,
        seed=0,
    )
    assert default.num_cpus_per_learner == "auto"
    assert default.map_batches_kwargs["compute"].max_size == 1
    # Hardware-only fields leave the train stage's fingerprint alone; num_learners does not
    # (each learner takes its own batch, so the effective batch changes).
    base = parse_config({"name": "x"})
    hw = {"num_gpus_per_learner": 1.0, "num_cpus_per_learner": 2.0, "prelearner_actors": 3}
    moved = base.model_copy(update={"train": base.train.model_copy(update=hw)})
    assert moved.section_hash("env", "train") == base.section_hash("env", "train")
    more = base.model_copy(update={"train": base.train.model_copy(update={"num_learners": 2})})
    assert more.section_hash("env", "train") != base.section_hash("env", "train")


def test_unknown_algo_param_is_a_config_error():
    import gymnasium as gym

    from kalm_ray.rl.algos import build_config

    train = TrainConfig(algo_params={"dcql": {"no_such_knob": 1}})
    with pytest.raises(ConfigError, match="train.algo_params.dcql"):
        build_config(
            "dcql",
            train=train,
            data_path="/x",
            filesystem=None,
            obs_dim=4,
            action_space=gym.spaces.Discrete(3),
            num_rows=10,
            seed=0,
        )


def _clevr_run(tmp_path) -> RunDir:
    """Toy transitions shaped like CLEVR's (10-d state, Discrete(40)) + all CLEVR train wordings."""
    from kalm_ray.envs import get_suite

    suite = get_suite("clevr")
    run = RunDir(str(tmp_path))
    task = ToyTask(discrete=True)
    write_toy_run(run, task, episodes=60, seed=5)
    texts = sorted({w for t in suite.tasks("train") for w in suite.instructions("train", t)})
    emb = np.random.default_rng(0).normal(size=(len(texts), 384)).astype(np.float32)
    old = pq.read_table(run.path("data/instructions.parquet"))
    extra = pa.table(
        {
            "text": texts,
            "env": ["clevr"] * len(texts),
            "level": ["train"] * len(texts),
            "task": [""] * len(texts),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 384),
        }
    )
    pq.write_table(
        pa.concat_tables([old, extra.cast(old.schema)]), run.path("data/instructions.parquet")
    )
    return run


def test_run_train_writes_policies_curves_and_manifest_then_skips(ray_local, tmp_path):
    from kalm_ray.stages.train import run_train

    run = _clevr_run(tmp_path)
    cfg = parse_config(
        {
            "name": "rl-smoke",
            "run_dir": run.root,
            "env": {"name": "clevr", "max_episode_steps": 3},
            "train": {
                "algos": ["dcql"],
                "data": ["real"],
                "seeds": [0],
                "iterations": 2,
                "updates_per_iteration": 2,
                "batch_size": 32,
                "hidden": [16],
                "quick_eval_every": 1,
                "quick_eval_episodes": 2,
            },
        }
    )
    manifest = run_train(cfg, run)
    assert manifest.counts["policies"] == ["dcql-real-seed0"]
    folder = run.path("policy", "dcql-real-seed0")
    info = json.load(open(os.path.join(folder, POLICY_INFO)))
    assert info["env"] == "clevr" and info["obs_dim"] == 394 and info["data"] == "real"
    rows = list(csv.DictReader(open(os.path.join(folder, CURVE_FILE))))
    assert len(rows) == 2 and all(0.0 <= float(r["quick_success"]) <= 1.0 for r in rows)
    assert {"td_loss", "cql_loss", "q_mean"} <= set(rows[0])
    assert run.exists("policy", "manifest.json") and run.exists("policy", "_data", "real")
    assert run_train(cfg, run).output_id == manifest.output_id  # up to date: skipped


@pytest.mark.slow
def test_remote_learner_trains_and_exports(prepared):
    """num_learners=1: the learner is a Ray actor fed through a Ray Data iterator."""
    run, task, mix = prepared[True]
    train = TINY.model_copy(update={"num_learners": 1})
    unit = Unit("dcql", "real", 3)
    _train(run, task, mix, unit, train)
    _check_policy_folder(run, task, unit.name, "dcql")


def _grid_cfg(run: RunDir, **train) -> object:
    return parse_config(
        {
            "name": "rl-units",
            "run_dir": run.root,
            "env": {"name": "clevr", "max_episode_steps": 3},
            "train": {
                "algos": ["bc", "dcql"],
                "data": ["real"],
                "seeds": [0],
                "iterations": 2,
                "updates_per_iteration": 3,
                "batch_size": 32,
                "hidden": [16],
                "quick_eval_every": 0,
                **train,
            },
        }
    )


def _digests(run: RunDir) -> dict[str, str]:
    return {
        u["unit"]: u["weights_sha256"] for u in run.read_json("policy", "summary.json")["units"]
    }


def test_units_in_parallel_give_the_sequential_weights(ray_local, tmp_path, capsys):
    """Units as Ray tasks (the default) train the same weights as one after another in the
    driver (``max_concurrent_units: 1``); either way a bar counts the units' iterations."""
    from kalm_ray.stages.train import run_train

    seq, par = _clevr_run(tmp_path / "seq"), _clevr_run(tmp_path / "par")
    run_train(_grid_cfg(seq, max_concurrent_units=1), seq)
    err = capsys.readouterr().err
    assert "train: 100%" in err and "4/4 [" in err, err[-500:]
    manifest = run_train(_grid_cfg(par), par)
    assert "4/4 [" in capsys.readouterr().err  # 2 units x 2 iterations, from Ray tasks
    assert manifest.counts["policies"] == ["bc-real-seed0", "dcql-real-seed0"]
    assert _digests(par) == _digests(seq) and len(set(_digests(par).values())) == 2
    assert not list((tmp_path / "par").glob("policy/*/_units"))  # resume marks gone when done


def test_a_failing_unit_fails_alone_and_a_rerun_resumes_the_others(ray_local, tmp_path, capsys):
    """One unit raising (here: dcql's unknown parameter, inside its Ray task) does not lose the
    finished policies: the stage fails with one line naming that unit, the staging folder
    keeps the others, and a rerun of the same config does not train them again."""
    from kalm_ray.stages.train import UnitFailed, run_train

    run = _clevr_run(tmp_path)
    cfg = _grid_cfg(run, seeds=[0, 1], algo_params={"dcql": {"no_such_knob": 1}})
    with pytest.raises(UnitFailed) as err:
        run_train(cfg, run)
    msg = str(err.value)
    assert "\n" not in msg and "unit dcql-real-seed" in msg and "no_such_knob" in msg
    assert "2 of 4 units failed" in msg
    staged = sorted(tmp_path.glob("policy.partial-*"))
    assert len(staged) == 1 and not run.exists("policy", "manifest.json")
    modules = {
        name: (staged[0] / name / MODULE_DIR).stat().st_mtime_ns
        for name in ("bc-real-seed0", "bc-real-seed1")
    }
    capsys.readouterr()
    with pytest.raises(UnitFailed, match="unit dcql-real-seed"):
        run_train(cfg, run)
    assert "resuming; 2 of 4 units already finished" in capsys.readouterr().out
    for name, mtime in modules.items():  # not retrained
        assert (staged[0] / name / MODULE_DIR).stat().st_mtime_ns == mtime


def test_units_that_start_ray_work_of_their_own_are_held_back_to_fit_the_cluster():
    from kalm_ray.rl.unit_pool import nested_cpus

    train = TrainConfig(num_cpus_per_prelearner=0.5, prelearner_actors=2)
    assert nested_cpus("bc", train) == 0 and nested_cpus("dcql", train) == 0
    assert nested_cpus("marwil", train) == 1.0
    assert nested_cpus("bc", TrainConfig(num_learners=2)) == 2
    assert nested_cpus("bc", TrainConfig(num_learners=2, num_gpus_per_learner=1)) == 0
    # placement only: neither changes the stage fingerprint
    base = parse_config({"name": "x"})
    hw = {"num_cpus_per_unit": 2.0, "max_concurrent_units": 1}
    moved = base.model_copy(update={"train": base.train.model_copy(update=hw)})
    assert moved.section_hash("env", "train") == base.section_hash("env", "train")


def test_a_unit_larger_than_the_local_ray_is_refused_before_training(ray_local, tmp_path):
    """A unit that alone needs more CPUs than the local Ray has would wait forever in
    ``ray.wait``; one line naming the key instead, before any staging folder."""
    from kalm_ray.errors import InputError
    from kalm_ray.stages.train import run_train

    run = _clevr_run(tmp_path)
    with pytest.raises(InputError, match=r"train.num_cpus_per_unit \(bc: .*needs 12 CPUs"):
        run_train(_grid_cfg(run, num_cpus_per_unit=12), run)
    assert not list(tmp_path.glob("policy*"))
    # In the driver (one unit at a time) a unit takes no task CPUs: only its own actors count.
    with pytest.raises(InputError, match=r"train.num_learners \(bc in the driver: .*needs 9 CPUs"):
        run_train(_grid_cfg(run, max_concurrent_units=1, num_learners=9), run)
    # GPUs this local Ray does not have (none on this machine): refused the same way.
    from kalm_ray.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="train.num_gpus_per_learner asks for GPUs"):
        run_train(_grid_cfg(run, num_gpus_per_learner=1.0), run)
    assert not list(tmp_path.glob("policy*"))


def test_a_policy_on_s3_loads_and_acts_as_the_local_one(prepared, s3_run):
    """Evaluation workers load each policy from the run dir: on S3 (moto's server) the module
    folder is downloaded whole and the policy acts exactly as the local copy does."""
    import pyarrow.fs as pafs

    run, task, mix = prepared[True]
    unit = Unit("bc", "real", 11)
    _train(run, task, mix, unit, TINY)
    remote = s3_run("policies")
    pafs.copy_files(
        run.path("policy", unit.name),
        remote.path("policy", unit.name),
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=remote.fs,
    )
    here, there = (
        load_policy(run.path("policy", unit.name)),
        load_policy(remote.uri_of("policy", unit.name)),
    )
    assert there.info == here.info
    rng = np.random.default_rng(3)
    obs = make_obs(rng.uniform(-1, 1, (9, 10)), task.embeddings[rng.integers(0, 8, 9)])
    assert np.array_equal(there.act(obs), here.act(obs))
