"""The offline-RL data pipeline: obs layout, the embedding join, mixes, RLlib's columns."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic_data import ToyTask, write_toy_run

from kalm_ray.artifacts import RunDir
from kalm_ray.errors import InputError
from kalm_ray.rl.dataset import (
    JoinEmbeddings,
    load_embeddings,
    make_obs,
    mix_counts,
    prepare_mix,
    to_arrow,
    wording_groups,
)


def test_make_obs_concatenates_state_then_embedding():
    state = np.arange(6, dtype=np.float32).reshape(2, 3)
    emb = np.full((2, 4), 7.0, dtype=np.float32)
    obs = make_obs(state, emb)
    assert obs.shape == (2, 7) and obs.dtype == np.float32
    assert np.array_equal(obs[:, :3], state) and np.array_equal(obs[:, 3:], emb)
    with pytest.raises(ValueError):
        make_obs(state, emb[:1])


def test_join_gives_rllib_columns_with_full_obs_width():
    task = ToyTask(discrete=True)
    table = task.table(task.episodes(20, seed=3))
    out = JoinEmbeddings(dict(zip(task.instructions, task.embeddings, strict=True)))(table)
    n = table.num_rows
    assert set(out) == {
        "obs",
        "new_obs",
        "actions",
        "rewards",
        "terminateds",
        "truncateds",
        "eps_id",
    }
    assert out["obs"].shape == (n, 10 + 384) and out["new_obs"].shape == (n, 394)
    # Every row carries its own instruction's embedding, next to its own state.
    idx = [task.instructions.index(t) for t in table.column("instruction").to_pylist()]
    assert np.array_equal(out["obs"][:, 10:], task.embeddings[idx])
    assert np.array_equal(
        out["obs"][:, :10], np.stack(table.column("state").to_numpy(zero_copy_only=False))
    )
    assert out["actions"].dtype == np.int64
    # Terminated and truncated stay distinct.
    assert out["terminateds"].sum() == table.column("terminated").to_numpy().sum()
    assert out["truncateds"].sum() == table.column("truncated").to_numpy().sum()
    assert not (out["terminateds"] & out["truncateds"]).any()


def test_join_raises_naming_an_instruction_without_embedding():
    task = ToyTask(discrete=True)
    table = task.table(task.episodes(10, seed=0))
    missing = table.column("instruction")[0].as_py()
    emb = {t: e for t, e in zip(task.instructions, task.embeddings, strict=True) if t != missing}
    with pytest.raises(InputError, match=repr(missing)):
        JoinEmbeddings(emb)(table)


def test_wording_copies_reword_each_row_within_its_goal():
    """Each copy keeps the row's state, action and reward and carries a wording of the same
    goal; the draw is seeded; copies get episode ids of their own."""
    task = ToyTask(discrete=True)
    table = task.table(task.episodes(20, seed=3))
    emb = dict(zip(task.instructions, task.embeddings, strict=True))
    groups = [task.instructions[i : i + 2] for i in range(0, len(task.instructions), 2)]
    group_of = {t: g for g in groups for t in g}
    out = JoinEmbeddings(emb, None, wordings=groups, copies=3)(table)
    n = table.num_rows
    assert out["obs"].shape == (4 * n, 394) and len(out["eps_id"]) == 4 * n
    plain = JoinEmbeddings(emb)(table)
    for k in range(4):
        part = slice(k * n, (k + 1) * n)
        assert np.array_equal(out["obs"][part, :10], plain["obs"][:, :10])
        assert np.array_equal(out["actions"][part], plain["actions"])
        assert np.array_equal(out["rewards"][part], plain["rewards"])
        assert np.array_equal(out["obs"][part, 10:], out["new_obs"][part, 10:])
    assert np.array_equal(out["obs"][:n], plain["obs"])  # the first copy is the row itself
    by_vec = {e.tobytes(): t for t, e in emb.items()}
    instr = table.column("instruction").to_pylist() * 4
    worded = [by_vec[r[10:].tobytes()] for r in out["obs"]]
    assert all(w in group_of[t] for w, t in zip(worded, instr, strict=True))
    assert sum(w != t for w, t in zip(worded, instr, strict=True)) > n  # about half of 3n
    assert len(set(out["eps_id"])) == 4 * len(set(plain["eps_id"]))
    twice = [JoinEmbeddings(emb, 7, wordings=groups, copies=3)(table)["obs"] for _ in range(2)]
    assert np.array_equal(*twice)


def test_mix_counts():
    assert mix_counts(100, 40, None) == (100, 40)
    assert mix_counts(100, 40, 0.5) == (100, 100)
    assert mix_counts(100, 400, 0.2) == (100, 25)
    assert mix_counts(100, 0, 0.5) == (100, 0)
    assert mix_counts(100, 40, 1.0) == (0, 40)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = RunDir(str(tmp_path_factory.mktemp("rl-data")))
    task = ToyTask(discrete=True)
    write_toy_run(run, task, episodes=60, imagined=30, seed=1)
    return run, task


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_prepare_mix_keeps_every_row_and_its_embedding(ray_local, toy_run, engine):
    run, task = toy_run
    emb = load_embeddings(run)
    info = prepare_mix(
        run,
        "real+imagined",
        f"policy/_data/{engine}",
        embeddings=emb,
        ratio=None,
        seed=0,
        engine=engine,
    )
    n_real = pq.read_metadata(run.path("data/real/part-0.parquet")).num_rows
    n_im = pq.read_metadata(run.path("data/imagined/part-0.parquet")).num_rows
    assert info.rows == {"real": n_real, "imagined": n_im} and info.obs_dim == 394
    import ray.data

    # Read in this process (from_arrow runs no tasks), as kalm_ray.rl.offline_data does.
    rows = ray.data.from_arrow(pq.read_table(info.path)).take_batch(10_000)
    assert rows["obs"].shape == (n_real + n_im, 394)
    known = {e.tobytes() for e in task.embeddings}
    assert all(r[10:].tobytes() in known for r in rows["obs"])
    assert np.array_equal(rows["obs"][:, 10:], rows["new_obs"][:, 10:])


def test_prepare_mix_with_wording_copies(toy_run):
    run, task = toy_run
    groups = wording_groups(run)
    assert sorted(t for g in groups.values() for t in g) == sorted(task.instructions)
    info = prepare_mix(
        run,
        "real",
        "policy/_data/copies",
        embeddings=load_embeddings(run),
        ratio=None,
        seed=0,
        engine="local",
        wordings=groups,
        wording_copies=2,
    )
    n_real = pq.read_metadata(run.path("data/real/part-0.parquet")).num_rows
    assert info.rows == {"real": 3 * n_real}
    assert pq.read_metadata(info.path + "/part-00000.parquet").num_rows == 3 * n_real


def test_prepare_mix_resamples_imagined_rows_to_the_ratio(ray_local, toy_run):
    run, _ = toy_run
    info = prepare_mix(
        run,
        "real+imagined",
        "policy/_data/ratio",
        embeddings=load_embeddings(run),
        ratio=0.5,
        seed=0,
        engine="local",
    )
    assert info.rows["imagined"] == info.rows["real"] == info.source_rows["real"]
    assert (
        pq.read_metadata(run.path("policy/_data/ratio/part-00000.parquet")).num_rows
        == 2 * info.rows["real"]
    )


def test_prepare_mix_refuses_missing_embedding_before_running(tmp_path):
    run = RunDir(str(tmp_path))
    task = ToyTask(discrete=True)
    write_toy_run(run, task, episodes=40, drop_embeddings=(task.instructions[3],))
    with pytest.raises(InputError, match=repr(task.instructions[3])):
        prepare_mix(
            run, "real", "policy/_data/real", embeddings=load_embeddings(run), ratio=None, seed=0
        )


@pytest.mark.parametrize(
    "algo,discrete", [("bc", True), ("dcql", True), ("cql", False), ("iql", False)]
)
def test_prepared_batches_equal_rllib_prelearner_output(ray_local, tmp_path, algo, discrete):
    """The shortcut past RLlib's PreLearner hands learners exactly what the PreLearner would."""
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.offline.offline_prelearner import OfflinePreLearner

    from kalm_ray.config import TrainConfig
    from kalm_ray.rl.algos import build_config
    from kalm_ray.rl.offline_data import PreparedOfflineData

    task = ToyTask(discrete=discrete, emb_dim=8)
    batch = JoinEmbeddings(dict(zip(task.instructions, task.embeddings, strict=True)))(
        task.table(task.episodes(8, seed=2))
    )
    (tmp_path / "prep").mkdir()
    pq.write_table(to_arrow(batch), str(tmp_path / "prep" / "part-0.parquet"))
    cfg = build_config(
        algo,
        train=TrainConfig(hidden=[8], batch_size=4),
        data_path=str(tmp_path / "prep"),
        filesystem=None,
        obs_dim=18,
        action_space=task.action_space,
        num_rows=10,
        seed=0,
    )
    spaces = (cfg.observation_space, cfg.action_space)
    spec = MultiRLModuleSpec(rl_module_specs={"default_policy": cfg.get_rl_module_spec()})
    pre = OfflinePreLearner(config=cfg, spaces=spaces, module_spec=spec)(dict(batch))
    # A small table is repeated so one epoch spans a training iteration; compare one copy.
    ours = PreparedOfflineData(cfg).data.take_batch(1_000)
    n = len(batch["obs"]) if "obs" in batch else len(next(iter(batch.values())))
    assert all(len(v) % n == 0 for v in ours.values())
    ours = {k: np.asarray(v)[:n] for k, v in ours.items()}
    order = np.lexsort(ours["default_policy/obs"].T)
    ref_order = np.lexsort(pre["default_policy/obs"].numpy().T)
    assert set(ours) == set(pre)
    for key, ref in pre.items():
        ref = ref.numpy()[ref_order]
        got = np.asarray(ours[key])[order]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert np.array_equal(got, ref), key


def test_prepare_mix_with_no_imagined_rollouts_trains_on_real_rows(tmp_path, caplog):
    """The imagine stage writes an empty part when its filter keeps nothing: real+imagined
    then equals real (with a warning), instead of failing on a missing source."""
    run = RunDir(str(tmp_path))
    task = ToyTask(discrete=True)
    write_toy_run(run, task, episodes=20, imagined=2, seed=3)
    empty = pq.read_table(run.path("data/imagined/part-0.parquet")).schema.empty_table()
    pq.write_table(empty, run.path("data/imagined/part-0.parquet"))
    with caplog.at_level("WARNING", logger="kalm_ray"):
        info = prepare_mix(
            run,
            "real+imagined",
            "policy/_data/x",
            embeddings=load_embeddings(run),
            ratio=None,
            seed=0,
            engine="local",
        )
    assert info.rows["imagined"] == 0 and info.rows["real"] > 0
    assert "holds no rollouts" in caplog.text


def test_local_mix_does_not_depend_on_the_order_imagined_rollouts_were_written(toy_run, tmp_path):
    """The imagine stage writes rollouts as Ray delivers them; the same rollouts in another
    order must prepare the same training table (else the same data trains another policy)."""
    import shutil

    import pyarrow.compute as pc

    from kalm_ray.artifacts import RunDir

    run, _ = toy_run
    other = RunDir(str(tmp_path / "run"))
    shutil.copytree(run.path(""), other.path(""), dirs_exist_ok=True)
    part = other.path("data/imagined/part-0.parquet")
    t = pq.read_table(part)
    ids = sorted(set(t.column("episode_id").to_pylist()), reverse=True)  # episodes reversed
    order = np.concatenate(
        [np.flatnonzero(pc.equal(t.column("episode_id"), e).to_numpy(zero_copy_only=False))
         for e in ids]
    )
    pq.write_table(t.take(order), part)

    def prepared(r):
        info = prepare_mix(
            r, "real+imagined", "policy/_data/order", embeddings=load_embeddings(r), ratio=None,
            seed=0, engine="local",
        )
        return pq.read_table(info.path + "/part-00000.parquet")

    assert not pq.read_table(part).equals(pq.read_table(run.path("data/imagined/part-0.parquet")))
    assert prepared(run).equals(prepared(other))


def test_copies_of_imagined_rows_go_only_to_wordings_imagination_was_given():
    """A novel wording nobody asked the LLM about is the evaluation's alone: a rollout imagined
    for another wording of its goal is never copied under it (training wordings all are)."""
    from kalm_ray.rl.dataset import copy_targets

    groups = {
        ("train", "t0"): ["push a", "move a"],
        ("rephrase", "t0"): ["shove a", "nudge a", "send a"],
    }
    targets = copy_targets(groups, {"shove a", "send a"})
    assert targets == [["push a", "move a"], ["shove a", "send a"]]
    texts = ["push a", "move a", "shove a", "nudge a", "send a"]
    table = {t: np.full(4, i, np.float32) for i, t in enumerate(texts)}
    join = JoinEmbeddings(table, 0, wordings=targets, copies=50)
    import pyarrow as pa

    batch = pa.table(
        {
            "instruction": ["shove a"] * 4,
            "state": pa.array([[0.0, 0.0]] * 4, pa.list_(pa.float32(), 2)),
            "next_state": pa.array([[0.0, 0.0]] * 4, pa.list_(pa.float32(), 2)),
            "action": pa.array([1, 2, 3, 4], pa.int64()),
            "reward": pa.array([0.0] * 4, pa.float32()),
            "terminated": [False] * 4,
            "truncated": [False] * 4,
            "episode_id": ["e"] * 4,
        }
    )
    seen = {texts[int(v)] for v in join(batch)["obs"][:, 2]}
    assert seen == {"shove a", "send a"}


def test_train_reads_the_asked_wordings_from_the_imagine_stage_config(tmp_path):
    """``metaworld_quick`` asks 64 of its 100 rephrase wordings: the train stage takes those
    64 from the config the imagined data were made under, not from its own."""
    from pathlib import Path

    import yaml

    from kalm_ray.config import dump_config, load_config
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.imagine.requests import build_requests
    from kalm_ray.rl.train import asked_wordings

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "metaworld_quick.yaml")
    suite = get_suite("metaworld")
    run = RunDir(str(tmp_path))
    assert asked_wordings(run, suite) is None  # no imagined data: the data's own wordings
    run.makedirs("data/imagined")
    run.write_text(dump_config(cfg), "data/imagined", "config.yaml")
    requests = build_requests(
        suite,
        levels=list(cfg.imagine.levels),
        rollouts_per_level=cfg.imagine.rollouts_per_level,
        max_tasks_per_level=cfg.imagine.max_tasks_per_level,
        seed=cfg.seed,
        starts=lambda level, task, seeds: np.zeros((len(seeds), suite.layout.dim), np.float32),
        prompt_fn=lambda text, state: text,
    )
    asked = asked_wordings(run, suite)
    assert asked == set(requests.column("instruction").to_pylist())
    # A config saved by another version (a key this one lacks) still says what was asked.
    saved = yaml.safe_load(dump_config(cfg))
    saved["imagine"]["a_key_of_another_version"] = 1
    run.write_text(yaml.safe_dump(saved), "data/imagined", "config.yaml")
    assert asked_wordings(run, suite) == asked
    rephrase = {t for task in suite.tasks("rephrase") for t in suite.instructions("rephrase", task)}
    assert len(asked & rephrase) == 64 < len(rephrase)
