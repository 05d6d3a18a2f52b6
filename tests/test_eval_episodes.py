"""Episode specs (paired, deterministic) and the batched episode runner, without Ray."""

from __future__ import annotations

import numpy as np
from test_eval_support import (
    TASKS,
    ScriptedPolicy,
    ToySuite,
    toy_embeddings,
    toy_make_env,
    toy_make_obs,
)

from kalm_ray.config import parse_config
from kalm_ray.eval.episodes import build_episode_specs, run_episodes, specs_digest
from kalm_ray.eval.eval_actor import EvalWorker, WorkUnit


def _cfg(**evaluate):
    return parse_config({"name": "toy", "seed": 3, "evaluate": evaluate})


def test_specs_are_a_pure_function_of_config_and_seed() -> None:
    cfg = _cfg(episodes_per_task=2)
    a, b = build_episode_specs(cfg, ToySuite()), build_episode_specs(cfg, ToySuite())
    assert a == b and specs_digest(a) == specs_digest(b)
    assert [s.index for s in a] == list(range(len(a)))
    assert len(a) == 2 * sum(len(t) for t in TASKS.values())
    other = build_episode_specs(
        parse_config({"name": "toy", "seed": 4, "evaluate": {"episodes_per_task": 2}}), ToySuite()
    )
    assert [s.seed for s in other] != [s.seed for s in a]


def test_specs_use_each_levels_own_wordings_and_distinct_seeds() -> None:
    specs = build_episode_specs(_cfg(episodes_per_task=3), ToySuite())
    for s in specs:
        assert s.wording in ToySuite().instructions(s.level, s.task)
    same_task = [s for s in specs if s.level == "train" and s.task == "t1"]
    assert len({s.wording for s in same_task}) == 3  # consecutive wordings, no repeats
    assert len({s.seed for s in specs}) == len(specs)


def test_task_cap_is_stable_and_leaves_other_episodes_unchanged() -> None:
    full = build_episode_specs(_cfg(), ToySuite())
    capped = build_episode_specs(_cfg(max_tasks_per_level=2), ToySuite())
    assert capped == build_episode_specs(_cfg(max_tasks_per_level=2), ToySuite())
    assert sum(s.level == "train" for s in capped) == 2
    key = {(s.level, s.task): (s.wording, s.seed) for s in full}
    assert all(key[(s.level, s.task)] == (s.wording, s.seed) for s in capped)
    only_easy = build_episode_specs(_cfg(levels=["easy"]), ToySuite())
    assert all(key[(s.level, s.task)] == (s.wording, s.seed) for s in only_easy)


def test_runner_batches_one_policy_call_per_step_and_keeps_spec_order() -> None:
    specs = build_episode_specs(_cfg(episodes_per_task=2), ToySuite())
    envs: dict = {}
    policy = ScriptedPolicy(smart=True)

    def get_env(slot, spec):
        return envs.setdefault(slot, toy_make_env(spec.level, spec.task))

    res = run_episodes(
        policy,
        specs,
        get_env=get_env,
        embeddings=toy_embeddings(),
        make_obs=toy_make_obs,
        n_envs=4,
        max_steps=12,
    )
    assert [r.index for r in res] == [s.index for s in specs]
    assert len(envs) == 4
    assert max(policy.calls) == 4 and sum(policy.calls) == sum(r.length for r in res)
    assert all(r.success for r in res)  # the smart policy reaches every target within 12 steps
    assert all(1 <= r.length <= 12 for r in res)


def test_results_do_not_depend_on_batch_size() -> None:
    specs = build_episode_specs(_cfg(episodes_per_task=2), ToySuite())
    kw = dict(
        make_env=toy_make_env, make_obs=toy_make_obs, embeddings=toy_embeddings(), max_steps=12
    )
    unit = WorkUnit(0, "p", "/x/bc-real-seed0", tuple(specs))
    one = EvalWorker(load_policy=lambda _: ScriptedPolicy(smart=False), n_envs=1, **kw).run(unit)
    many = EvalWorker(load_policy=lambda _: ScriptedPolicy(smart=False), n_envs=5, **kw).run(unit)
    assert one == many
    succ = np.array([r.success for r in one])
    assert 0 < succ.sum() < len(succ)  # the +1-only policy fails from the right of the target
