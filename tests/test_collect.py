"""The collect stage: seeds, units, determinism across worker counts, data invariants,
skipping, worker replacement, and one-line errors for bad input (real Ray + real MuJoCo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import make_tiny_sentence_model

from kalm_ray.artifacts import RunDir
from kalm_ray.config import parse_config
from kalm_ray.data import read_episodes
from kalm_ray.data.card import TaskStats, card_table
from kalm_ray.data.collect import plan_units, resolve_tasks
from kalm_ray.data.collect_actor import CollectSpec, episode_seeds
from kalm_ray.errors import ConfigError

# ---- pure pieces (no Ray, no simulator) ----------------------------------------------------------


def test_episode_seeds_depend_only_on_identity():
    assert episode_seeds(0, 3, 7) == episode_seeds(0, 3, 7)
    seen = {episode_seeds(s, t, k) for s in (0, 1) for t in range(4) for k in range(25)}
    assert len(seen) == 2 * 4 * 25
    assert all(0 <= x < 2**32 for pair in seen for x in pair)


def test_plan_units_cover_every_episode_once():
    units = plan_units([(0, "a"), (3, "b")], episodes_per_task=45, unit_episodes=20)
    assert [(u.task, u.task_index, u.start, u.stop) for u in units] == [
        ("a", 0, 0, 20),
        ("a", 0, 20, 40),
        ("a", 0, 40, 45),
        ("b", 3, 0, 20),
        ("b", 3, 20, 40),
        ("b", 3, 40, 45),
    ]
    assert len({u.key for u in units}) == len(units)
    assert sum(u.episodes for u in units) == 90


class _FakeSuite:
    name = "fake"
    _levels = {"train": ["a", "b", "c"], "rephrase": ["a", "b", "c"], "easy": ["e"], "hard": ["h"]}

    def tasks(self, level: str) -> list[str]:
        return list(self._levels[level])


def test_resolve_tasks():
    s = _FakeSuite()
    assert resolve_tasks(s, None) == [(0, "a"), (1, "b"), (2, "c")]
    assert resolve_tasks(s, ["c", "a", "c"]) == [(0, "a"), (2, "c")]
    with pytest.raises(ConfigError, match=r"collect.tasks: 'zzz' is not a task") as e:
        resolve_tasks(s, ["a", "zzz"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"'easy' task; only train tasks are collected"):
        resolve_tasks(s, ["e"])


def test_card_table_limits_rows_and_totals():
    stats = [
        TaskStats(f"t{i}", episodes=4, env_steps=4 * (i + 1), successes=i % 5) for i in range(30)
    ]
    full = card_table(stats)
    assert full.count("\n") == 2 + 30  # header, rule, rows, total
    short = card_table(stats, limit=5)
    assert "25 more tasks" in short and "**all**" in short
    assert "| t0 | 4 | 1.0 | 0.0% |" in short  # lowest success rate first


# ---- the stage on real Ray and the real CLEVR env ------------------------------------------------


TASKS = ["left:red:blue", "behind:green:cyan", "front:blue:green"]
EPISODES = 4


def _cfg(run_dir: str, encoder: str, **collect) -> object:
    data = {
        "name": "collect-test",
        "run_dir": str(run_dir),
        "seed": 3,
        "env": {"name": "clevr"},
        "text": {"encoder": encoder},
        "collect": {
            "episodes_per_task": EPISODES,
            "tasks": TASKS,
            "epsilon": 0.1,
            "fail_fraction": 0.2,
            "num_workers": 1,
            **collect,
        },
    }
    return parse_config(data)


@pytest.fixture(scope="module")
def clevr():
    from kalm_ray.envs import get_suite

    return get_suite("clevr")


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """A 32-d random BERT in sentence-transformers layout: embeds the env's ~3,000 wordings
    in a blink (the default MiniLM is tested in test_text.py)."""
    return make_tiny_sentence_model(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="module")
def collected(ray_local, tmp_path_factory, tiny_encoder):
    """The same config collected with 1 and with 2 workers (small units, so tasks span several)."""
    import kalm_ray.stages.collect as collect_mod

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(collect_mod, "UNIT_EPISODES", 2)
        for workers in (1, 2):
            run_dir = str(tmp_path_factory.mktemp(f"collect{workers}") / "run")
            if workers == 2:  # the same data through a pyarrow.fs URI
                run_dir = f"file://{run_dir}"
            cfg = _cfg(run_dir, tiny_encoder, num_workers=workers)
            out[workers] = (cfg, RunDir(run_dir), collect_mod.run_collect(cfg, run_dir))
    return out


def _files(run: RunDir) -> dict[str, bytes]:
    return {
        n: run.read_bytes("data/real", n) for n in run.list("data/real") if n.endswith(".parquet")
    }


def test_same_bytes_with_one_and_two_workers(collected, clevr):
    one, two = _files(collected[1][1]), _files(collected[2][1])
    assert list(one) == [f"episodes-{i:04d}.parquet" for i, _ in resolve_tasks(clevr, TASKS)]
    assert one == two
    meta = pq.ParquetFile(collected[1][1].path("data/real", next(iter(one)))).metadata
    assert set((meta.metadata or {}).keys()) <= {b"ARROW:schema"}  # no timestamps or hosts


def test_dataset_invariants(collected, clevr):
    cfg, run, manifest = collected[1]
    table = read_episodes(run)
    rows = table.to_pylist()
    limit = clevr.max_episode_steps
    by_ep: dict[str, list[dict]] = {}
    for r in rows:
        by_ep.setdefault(r["episode_id"], []).append(r)
    assert sorted(by_ep) == sorted(f"real/{t}/{k}" for t in TASKS for k in range(EPISODES))

    novel = {
        w
        for lv in ("rephrase", "easy", "hard")
        for t in clevr.tasks(lv)
        for w in clevr.instructions(lv, t)
    }
    for ep_id, steps in by_ep.items():
        task = steps[0]["task"]
        assert [s["t"] for s in steps] == list(range(len(steps)))
        start = np.asarray(steps[0]["state"], np.float32)
        for i, s in enumerate(steps):
            assert (s["env"], s["level"], s["source"], s["generator"]) == (
                "clevr",
                "train",
                "real",
                None,
            )
            assert s["task"] == task and s["instruction"] == steps[0]["instruction"]
            nxt = np.asarray(s["next_state"], np.float32)
            ok = bool(clevr.success(task, start, nxt))
            assert s["success"] == ok, (ep_id, i)
            assert s["reward"] == pytest.approx(
                clevr.reward(task, start, np.asarray(s["state"], np.float32), nxt), abs=1e-5
            )
            assert not (s["terminated"] and s["truncated"])
            if s["terminated"]:
                assert ok and i == len(steps) - 1
            if s["truncated"]:
                assert not ok and i == len(steps) - 1 and len(steps) == limit
            if i + 1 < len(steps):
                assert not ok  # the episode ends as soon as the goal holds
                assert s["next_state"] == steps[i + 1]["state"]
        assert steps[-1]["terminated"] or steps[-1]["truncated"]
        assert steps[0]["instruction"] in clevr.instructions("train", task)
        assert steps[0]["instruction"] not in novel
    ends = [(s[-1]["terminated"], s[-1]["truncated"]) for s in by_ep.values()]
    assert (True, False) in ends and (False, True) in ends  # both kinds of ending were checked

    counts = manifest.counts
    assert counts["episodes"] == len(by_ep) == len(TASKS) * EPISODES
    assert counts["env_steps"] == len(rows)
    succ = sum(s[-1]["terminated"] for s in by_ep.values())
    assert counts["successes"] == succ
    for t in TASKS:
        assert counts["per_task"][t]["episodes"] == EPISODES
    assert 0.0 < counts["success_rate"] <= 1.0


def test_instructions_card_and_manifest(collected, clevr):
    from kalm_ray.data.text import encoder_info, load_instruction_table, read_instruction_table

    cfg, run, manifest = collected[1]
    table = read_instruction_table(run)
    assert encoder_info(table) == (manifest.counts["encoder"], manifest.counts["embedding_dim"])
    assert manifest.counts["embedding_dim"] == 32
    emb = load_instruction_table(run)
    for lv in ("train", "rephrase", "easy", "hard"):
        for t in clevr.tasks(lv):
            for w in clevr.instructions(lv, t):
                assert emb[w].shape == (32,)
    readme = run.read_bytes("data/real", "README.md").decode()
    assert "| task | episodes | mean length | success rate |" in readme and TASKS[0] in readme
    on_disk = json.loads(run.read_bytes("data/real", "manifest.json"))
    assert on_disk["fingerprint"] == manifest.fingerprint and on_disk["versions"]["ray"]
    assert run.exists("data/real", "config.yaml")


def test_rerun_is_noop_and_changed_config_writes_fresh_data(collected, capsys):
    import kalm_ray.stages.collect as collect_mod

    cfg, run, manifest = collected[1]
    before = _files(run)
    again = collect_mod.run_collect(cfg, run)
    assert again.output_id == manifest.output_id
    assert "up to date" in capsys.readouterr().out
    assert not [n for n in run.list("data") if ".replaced-" in n]

    fewer = cfg.collect.model_copy(update={"episodes_per_task": 2})
    changed = cfg.model_copy(update={"collect": fewer})
    fresh = collect_mod.run_collect(changed, run)
    assert fresh.output_id != manifest.output_id and fresh.fingerprint != manifest.fingerprint
    assert _files(run) != before
    assert [n for n in run.list("data") if n.startswith("real.replaced-")]


@pytest.mark.faults
@pytest.mark.parametrize("how", ["ray.kill", "os.kill"])
def test_killed_worker_is_replaced_and_nothing_is_lost_or_doubled(ray_local, clevr, how):
    """``ray.kill`` of the actor, or SIGKILL of its worker process, while it holds units."""
    import os
    import signal

    import ray

    from kalm_ray.data.collect_actor import CollectorPool, EpisodeCollector

    spec = CollectSpec(
        env="clevr",
        max_episode_steps=clevr.max_episode_steps,
        seed=1,
        epsilon=0.1,
        fail_fraction=0.0,
        action_noise=0.0,
    )
    units = plan_units(resolve_tasks(clevr, TASKS[:2]), episodes_per_task=3, unit_episodes=1)
    pool = CollectorPool(spec, num_workers=2, num_cpus_per_worker=1.0)
    # Asked before any unit is queued, so the answer does not wait for the actor's work.
    pid = ray.get(pool.actors[0].__ray_call__.remote(lambda worker: os.getpid()))
    got = []
    try:
        for result in pool.imap_unordered(units):
            if not got:
                if how == "ray.kill":
                    ray.kill(pool.actors[0])
                else:
                    os.kill(pid, signal.SIGKILL)
            got.append(result)
    finally:
        pool.shutdown()
    assert pool.restarts == 1
    assert sorted(r.unit.key for r in got) == sorted(u.key for u in units)
    local = EpisodeCollector(spec)
    for r in got:
        assert r.table.equals(local.run_unit(r.unit).table)


def test_metaworld_noisy_expert_episodes():
    """In-process (no Ray): the noisy metaworld.policies expert, labelled by the suite."""
    import gymnasium as gym

    from kalm_ray.data.collect_actor import EpisodeCollector, WorkUnit
    from kalm_ray.envs import get_suite

    mw = get_suite("metaworld")
    noisy = CollectSpec(
        env="metaworld",
        max_episode_steps=mw.max_episode_steps,
        seed=0,
        epsilon=0.0,
        fail_fraction=0.0,
        action_noise=0.3,
    )
    unit = WorkUnit("reach", mw.tasks("train").index("reach"), 0, 2)
    result = EpisodeCollector(noisy).run_unit(unit)
    assert result.table.equals(EpisodeCollector(noisy).run_unit(unit).table)
    rows = result.table.to_pylist()
    assert isinstance(mw.action_space, gym.spaces.Box)
    acts = np.array([r["action"] for r in rows], np.float32)
    assert acts.shape == (len(rows), 4) and np.all(np.abs(acts) <= 1.0)
    start = {}
    for r in rows:
        start.setdefault(r["episode_id"], np.asarray(r["state"], np.float32))
        ok = bool(
            mw.success("reach", start[r["episode_id"]], np.asarray(r["next_state"], np.float32))
        )
        assert r["success"] == ok and not (r["terminated"] and not ok)
        assert r["instruction"] in mw.instructions("train", "reach")
    quiet = EpisodeCollector(CollectSpec(**{**noisy.__dict__, "action_noise": 0.0})).run_unit(unit)
    assert not quiet.table.equals(result.table)  # the noise is there


# ---- bad input: one line, non-zero exit, before any work -----------------------------------------


def _write_cfg(tmp_path: Path, **collect) -> str:
    path = tmp_path / "cfg.yaml"
    data = {
        "name": "bad-input",
        "env": {"name": "clevr"},
        "collect": {"episodes_per_task": 1, **collect},
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _one_line_error(capsys, argv: list[str]) -> str:
    from kalm_ray.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("kalm: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        ("left:red:red", "is not a task"),
        ("move:red:left", "'easy' task; only train tasks are collected"),
    ],
)
def test_unknown_task_fails_before_work(tmp_path, capsys, task, needle):
    run_dir = tmp_path / "run"
    line = _one_line_error(
        capsys, ["collect", _write_cfg(tmp_path, tasks=[task]), "--run-dir", str(run_dir)]
    )
    assert "collect.tasks" in line and needle in line
    assert not (run_dir / "data").exists()


def test_missing_text_encoder_fails_before_work(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    data = {
        "name": "bad-input",
        "collect": {"episodes_per_task": 1},
        "text": {"encoder": "/no/model"},
    }
    path.write_text(yaml.safe_dump(data))
    line = _one_line_error(capsys, ["collect", str(path), "--run-dir", str(tmp_path / "run")])
    assert "text.encoder" in line and "/no/model" in line
    assert not (tmp_path / "run" / "data").exists()


def test_unwritable_or_malformed_run_dir(tmp_path, capsys):
    cfg = _write_cfg(tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in (str(a_file / "run"), "/proc/kalm-collect-test", "nosuchscheme://bucket/run"):
        line = _one_line_error(capsys, ["collect", cfg, "--run-dir", bad])
        assert "run" in line
    claimed = tmp_path / "claimed"
    claimed.mkdir()
    (claimed / "run.json").write_text(json.dumps({"experiment": "someone-else"}))
    line = _one_line_error(capsys, ["collect", cfg, "--run-dir", str(claimed)])
    assert "someone-else" in line


def test_clevr_lookahead_is_every_push_exactly_and_leaves_the_episodes_alone():
    """``collect.lookahead``: each row carries the next state of all 40 pushes from its state,
    as the pusher simulated them. The taken push's entry is the recorded next state to the
    bit (the lookahead replays the env's full physics state), and the episodes themselves
    are the same rows as without the column. An epsilon push records NaN."""
    from kalm_ray.data.collect_actor import EpisodeCollector, WorkUnit
    from kalm_ray.data.schema import column_matrix

    spec = CollectSpec(
        env="clevr",
        max_episode_steps=50,
        seed=3,
        epsilon=0.3,
        fail_fraction=0.0,
        action_noise=0.0,
        lookahead=True,
    )
    unit = WorkUnit(task="left:red:blue", task_index=0, start=0, stop=4)
    with_look = EpisodeCollector(spec).run_unit(unit).table
    plain = EpisodeCollector(CollectSpec(**{**spec.__dict__, "lookahead": False})).run_unit(unit)
    assert with_look.drop_columns(["lookahead"]).equals(plain.table)
    look = column_matrix(with_look, "lookahead").reshape(with_look.num_rows, 40, 10)
    nxt = column_matrix(with_look, "next_state")
    act = with_look.column("action").to_numpy()
    known = np.isfinite(look).all(axis=(1, 2))
    assert known.any() and not known.all()  # epsilon 0.3: some pushes were random
    assert np.array_equal(look[known, act[known]], nxt[known])
    moved = np.abs(look[known] - column_matrix(with_look, "state")[known][:, None]).max(axis=2)
    assert (moved > 0.05).sum(axis=1).min() >= 30  # most pushes move some ball
