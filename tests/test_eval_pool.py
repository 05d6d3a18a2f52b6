"""The Ray actor pool: same results as in-process, and a killed actor changes no count."""

from __future__ import annotations

import pytest
from test_eval_support import ToySuite, load_scripted, toy_embeddings, toy_make_env, toy_make_obs

from kalm_ray.artifacts import RunDir
from kalm_ray.config import parse_config
from kalm_ray.errors import KalmError
from kalm_ray.eval.episodes import build_episode_specs
from kalm_ray.eval.eval_actor import EvalPool, EvalWorker
from kalm_ray.eval.evaluate import make_units
from kalm_ray.eval.results import PolicyId

POLICIES = [
    PolicyId("bc-real-seed0-slow", "bc", "real", 0),
    PolicyId("bc-real+imagined-seed0-slow", "bc", "real+imagined", 0),
]


def _setup(tmp_path):
    cfg = parse_config({"name": "toy", "evaluate": {"episodes_per_task": 3}})
    specs = build_episode_specs(cfg, ToySuite())
    units = make_units(POLICIES, specs, run=RunDir(str(tmp_path)), size=6)
    kwargs = dict(
        make_env=toy_make_env,
        load_policy=load_scripted,
        make_obs=toy_make_obs,
        embeddings=toy_embeddings(),
        n_envs=3,
        max_steps=12,
    )
    return specs, units, kwargs


def _reference(units, kwargs) -> dict:
    worker = EvalWorker(**kwargs)
    return {(u.policy, r.index): r for u in units for r in worker.run(u)}


@pytest.mark.faults
@pytest.mark.parametrize("how", ["ray.kill", "os.kill"])
def test_killed_actor_is_replaced_and_counts_do_not_change(ray_local, tmp_path, how) -> None:
    """``ray.kill`` of the actor, or SIGKILL of its worker process, mid-evaluation."""
    import os
    import signal

    specs, units, kwargs = _setup(tmp_path)
    assert len(units) >= 6
    expected = _reference(units, kwargs)
    pool = EvalPool(kwargs, num_workers=2, num_cpus=1, max_in_flight=2)
    # Asked before any unit is queued, so the answer does not wait for the actor's work.
    pid = ray_local.get(pool.actors[0].__ray_call__.remote(lambda worker: os.getpid()))
    got: dict = {}
    yielded = 0
    try:
        for unit, results in pool.run(units):
            if yielded == 0:  # mid-evaluation: the actor still holds queued units
                if how == "ray.kill":
                    ray_local.kill(pool.actors[0])
                else:
                    os.kill(pid, signal.SIGKILL)
            yielded += 1
            for r in results:
                assert (unit.policy, r.index) not in got, "an episode was counted twice"
                got[(unit.policy, r.index)] = r
    finally:
        pool.close()
    assert pool.replaced >= 1
    assert yielded == len(units)
    assert got == expected  # same episodes, same outcomes: nothing lost, nothing doubled
    assert len(got) == len(POLICIES) * len(specs)


def test_pool_matches_in_process_worker(ray_local, tmp_path) -> None:
    _, units, kwargs = _setup(tmp_path)
    pool = EvalPool(kwargs, num_workers=2, num_cpus=1)
    try:
        got = {(u.policy, r.index): r for u, res in pool.run(units) for r in res}
    finally:
        pool.close()
    assert got == _reference(units, kwargs)
    assert pool.replaced == 0


def test_actor_that_cannot_start_is_one_error_not_a_retry_loop(ray_local, tmp_path) -> None:
    _, units, kwargs = _setup(tmp_path)
    kwargs["embeddings"] = {"bad": "not a vector"}  # EvalWorker.__init__ raises ValueError
    pool = EvalPool(kwargs, num_workers=1, num_cpus=1)
    try:
        with pytest.raises(KalmError, match="failed to start: .*ValueError"):
            list(pool.run(units[:2]))
    finally:
        pool.close()
    assert pool.replaced == 0


def test_pool_size_defaults_to_available_cpus_capped_by_units() -> None:
    from kalm_ray.eval.evaluate import pool_size

    assert pool_size(None, available_cpus=8.0, num_cpus_per_worker=1.0, n_units=100) == 8
    assert pool_size(None, available_cpus=8.0, num_cpus_per_worker=2.0, n_units=100) == 4
    assert pool_size(None, available_cpus=8.0, num_cpus_per_worker=1.0, n_units=3) == 3
    assert pool_size(None, available_cpus=0.5, num_cpus_per_worker=1.0, n_units=3) == 1
    assert pool_size(6, available_cpus=2.0, num_cpus_per_worker=1.0, n_units=100) == 6
    assert pool_size(6, available_cpus=2.0, num_cpus_per_worker=1.0, n_units=2) == 2


def test_pool_actors_are_spread_over_nodes(monkeypatch) -> None:
    """Eval actors ask for SPREAD placement (as collection's do), with the configured CPUs."""
    import ray

    seen: list[dict] = []

    class FakeCls:
        @staticmethod
        def remote(**kwargs):
            return object()

    def fake_remote(**options):
        seen.append(options)
        return lambda cls: FakeCls

    monkeypatch.setattr(ray, "remote", fake_remote)
    pool = EvalPool({}, num_workers=3, num_cpus=0.5)
    assert len(pool.actors) == 3
    assert seen == [{"num_cpus": 0.5, "max_restarts": 0, "scheduling_strategy": "SPREAD"}]
