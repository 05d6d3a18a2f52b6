"""Evaluation throughput: one worker in-process vs N Ray actors, on the same episode list.

    .venv/bin/python bench/evaluate.py [--workers 2] [--policies 2] [--envs-per-worker 8]
                                       [--max-tasks-per-level 40] [--repeat 3] [--run-dir DIR]

Prints episodes/s of each mode and the ratio (goal: >= 1.7x with 2 workers on 2 free
cores). Both modes run the same work units (every policy x chunks of the same CLEVR episode
specs, as ``kalm evaluate`` cuts them) through the same :class:`EvalWorker` code, are timed
from the first unit to the last result with every worker already started and holding
every policy (one single-episode warm-up unit per policy; start-up and warm-up are reported
apart), and must give identical per-episode outcomes.

The ratio means something only on free cores: on a machine shared with other jobs, Linux's
autogroup scheduler gives each session one share of the CPU however many processes it runs
(the actors are in the driver's session), so both modes get about the same CPU and the
ratio drops toward 1. The load average is printed for that reason.

Policies: with ``--run-dir``, the exported policies and instruction embeddings of that run;
otherwise bench stand-ins: seeded random MLPs (state + 384-d embedding -> 256 -> 256 -> 40,
argmax) with seeded random unit embeddings. A random policy rarely succeeds, so nearly
every episode runs its full 50 pushes: the slow end of evaluation.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path

import numpy as np

from kalm_ray.artifacts import RunDir
from kalm_ray.config import RayConfig, parse_config
from kalm_ray.envs import get_suite
from kalm_ray.eval.episodes import build_episode_specs
from kalm_ray.eval.eval_actor import EvalPool, EvalWorker, WorkUnit
from kalm_ray.eval.evaluate import find_policies, make_suite_env, make_units, wording_embeddings
from kalm_ray.eval.results import PolicyId
from kalm_ray.raysetup import init_ray

EMB_DIM = 384


class MLPPolicy:
    """Bench stand-in: a seeded random 2x256 MLP over ``concat(state, embedding)``, argmax."""

    def __init__(self, seed: int, obs_dim: int, n_actions: int = 40):
        import torch

        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(obs_dim, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, n_actions),
        ).eval()
        self.info = {"algo": "mlp", "seed": seed}
        self._torch = torch

    def act(self, obs: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.net(self._torch.as_tensor(obs)).argmax(-1).numpy()


def load_mlp(policy_dir: str, obs_dim: int) -> MLPPolicy:
    return MLPPolicy(int(policy_dir.rsplit("seed", 1)[1]), obs_dim)


def concat_obs(state: np.ndarray, emb: np.ndarray) -> np.ndarray:
    return np.concatenate([state, emb], axis=1).astype(np.float32)


def warm_units(units: list[WorkUnit]) -> list[WorkUnit]:
    """One single-episode unit per policy: loads every policy (and torch) before timing."""
    first = {u.policy: u for u in reversed(units)}
    return [
        WorkUnit(-1 - i, u.policy, u.policy_dir, u.specs[:1]) for i, u in enumerate(first.values())
    ]


def run_local(kwargs: dict, units: list[WorkUnit]) -> tuple[float, dict]:
    worker = EvalWorker(**kwargs)
    for w in warm_units(units):
        worker.run(w)
    t0 = time.perf_counter()
    out = {(u.policy, r.index): r for u in units for r in worker.run(u)}
    return time.perf_counter() - t0, out


def run_ray(kwargs: dict, units: list[WorkUnit], workers: int) -> tuple[float, float, dict]:
    import ray

    t0 = time.perf_counter()
    pool = EvalPool(kwargs, num_workers=workers, num_cpus=1.0)
    ray.get([a.run.remote(w) for a in pool.actors for w in warm_units(units)])
    t1 = time.perf_counter()
    try:
        out = {(u.policy, r.index): r for u, res in pool.run(units) for r in res}
    finally:
        pool.close()
    return time.perf_counter() - t1, t1 - t0, out


def _runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--policies", type=int, default=2, help="stand-in policies (without --run-dir)")
    p.add_argument("--envs-per-worker", type=int, default=8)
    p.add_argument("--max-tasks-per-level", type=int, default=40)
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode; medians are reported")
    p.add_argument("--run-dir", help="evaluate this run's exported policies instead of stand-ins")
    args = p.parse_args()

    cfg = parse_config(
        {
            "name": "bench",
            "env": {"name": "clevr"},
            "evaluate": {
                "envs_per_worker": args.envs_per_worker,
                "max_tasks_per_level": args.max_tasks_per_level,
            },
        }
    )
    suite = get_suite("clevr")
    specs = build_episode_specs(cfg, suite)
    if args.run_dir:
        run = RunDir(args.run_dir)
        policies = find_policies(run, env="clevr")
        embeddings = wording_embeddings(run, specs)
        from kalm_ray.rl.dataset import make_obs
        from kalm_ray.rl.policy import load_policy
    else:
        run = RunDir(str(Path(os.environ.get("TMPDIR", "/tmp")) / "kalm-bench-evaluate"))
        policies = [
            PolicyId(f"mlp-standin-seed{k}", "mlp", "standin", k) for k in range(args.policies)
        ]
        rng = np.random.default_rng(0)
        embeddings = {}
        for w in sorted({s.wording for s in specs}):
            v = rng.normal(size=EMB_DIM).astype(np.float32)
            embeddings[w] = v / np.linalg.norm(v)
        load_policy = functools.partial(load_mlp, obs_dim=suite.layout.dim + EMB_DIM)
        make_obs = concat_obs
    units = make_units(policies, specs, run=run, size=4 * args.envs_per_worker)
    kwargs = dict(
        make_env=functools.partial(make_suite_env, "clevr", suite.max_episode_steps),
        load_policy=load_policy,
        make_obs=make_obs,
        embeddings=embeddings,
        n_envs=args.envs_per_worker,
        max_steps=suite.max_episode_steps,
    )
    # NOTE: Ray starts worker processes at nice 15 (raylet config ``worker_niceness``), the
    # driver runs at 0: on a machine shared with other jobs the actors would then lose the
    # CPU to them and the ratio would measure priorities, not parallelism. Same nice for both.
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(RayConfig(num_cpus=max(8, os.cpu_count() or 1)))

    n = sum(len(u.specs) for u in units)
    load_before = os.getloadavg()[0]
    local, remote, startup = [], [], []
    ref: dict | None = None
    for _ in range(args.repeat):
        dt, out = run_local(kwargs, units)
        local.append(n / dt)
        ref = out if ref is None else ref
        dt, st, out = run_ray(kwargs, units, args.workers)
        remote.append(n / dt)
        startup.append(st)
        if out != ref:
            raise SystemExit(
                "FAIL: Ray actors gave different episode outcomes than the in-process run"
            )

    steps = sum(r.length for r in ref.values())  # type: ignore[union-attr]
    succ = sum(r.success for r in ref.values())  # type: ignore[union-attr]
    lo, hi = statistics.median(local), statistics.median(remote)
    print(
        f"evaluate bench: env=clevr policies={len(policies)} episodes={n} units={len(units)} "
        f"env_steps={steps} successes={succ} envs_per_worker={args.envs_per_worker} "
        f"cores={os.cpu_count()} repeat={args.repeat} "
        f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"  1 worker in-process : {lo:8.1f} episodes/s   (runs: {_runs(local)})")
    print(
        f"  {args.workers} Ray actors        : {hi:8.1f} episodes/s   (runs: "
        f"{_runs(remote)}; actor start-up + warm-up "
        f"{statistics.median(startup):.1f}s not counted)"
    )
    print(f"  ratio               : {hi / lo:8.2f}x   (goal >= 1.7x with 2 actors on 2 free cores)")
    print("  identical episode outcomes: yes")


if __name__ == "__main__":
    main()
