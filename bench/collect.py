"""Collection throughput: one worker in-process vs N Ray workers, on the same work units.

    .venv/bin/python bench/collect.py [--env clevr] [--workers 2] [--tasks 40]
                                      [--episodes-per-task 4] [--repeat 3]

Prints env steps/s of each and the ratio (goal: >= 1.7x with 2 workers on 2 cores for
CLEVR). Both runs are timed from the first unit to the last result, with the Ray actors
already started (start-up is reported apart), and must produce identical transitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pyarrow as pa

from kalm_ray.config import RayConfig
from kalm_ray.data.collect import UNIT_EPISODES, plan_units, resolve_tasks
from kalm_ray.data.collect_actor import (
    CollectorPool,
    CollectSpec,
    EpisodeCollector,
    UnitResult,
    WorkUnit,
)
from kalm_ray.envs import get_suite
from kalm_ray.raysetup import init_ray


def _table(results: list[UnitResult]) -> pa.Table:
    return pa.concat_tables([r.table for r in sorted(results, key=lambda r: r.unit.key)])


def run_local(spec: CollectSpec, units: list[WorkUnit]) -> tuple[float, list[UnitResult]]:
    collector = EpisodeCollector(spec)
    t0 = time.perf_counter()
    results = [collector.run_unit(u) for u in units]
    return time.perf_counter() - t0, results


def run_ray(
    spec: CollectSpec, units: list[WorkUnit], workers: int
) -> tuple[float, float, list[UnitResult]]:
    t0 = time.perf_counter()
    pool = CollectorPool(spec, num_workers=workers, num_cpus_per_worker=1.0)
    pool.wait_ready()
    t1 = time.perf_counter()
    try:
        results = list(pool.imap_unordered(units))
    finally:
        pool.shutdown()
    return time.perf_counter() - t1, t1 - t0, results


def _runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.0f}" for x in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="clevr", choices=["clevr", "metaworld"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tasks", type=int, default=40, help="first N train tasks")
    p.add_argument("--episodes-per-task", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode; medians are reported")
    args = p.parse_args()

    suite = get_suite(args.env)
    spec = CollectSpec(
        env=suite.name,
        max_episode_steps=suite.max_episode_steps,
        seed=0,
        epsilon=0.1,
        fail_fraction=0.0,
        action_noise=0.1,
    )
    tasks = resolve_tasks(suite, None)[: args.tasks]
    units = plan_units(tasks, episodes_per_task=args.episodes_per_task, unit_episodes=UNIT_EPISODES)
    EpisodeCollector(spec).run_unit(WorkUnit(tasks[0][1], tasks[0][0], 0, 1))  # imports, first env
    # NOTE: Ray starts worker processes at nice 15 (raylet ``worker_niceness``) and the driver
    # at 0: on a machine shared with other jobs the actors would lose the CPU to them and the
    # ratio would measure priorities, not parallelism. Same nice for both (as bench/evaluate.py).
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(RayConfig(num_cpus=max(8, os.cpu_count() or 1)))

    local, remote, startup = [], [], []
    ref: pa.Table | None = None
    for _ in range(args.repeat):
        dt, res = run_local(spec, units)
        steps = sum(r.env_steps for r in res)
        local.append(steps / dt)
        ref = _table(res) if ref is None else ref
        dt, st, res = run_ray(spec, units, args.workers)
        remote.append(sum(r.env_steps for r in res) / dt)
        startup.append(st)
        if not _table(res).equals(ref):
            raise SystemExit(
                "FAIL: Ray workers produced different transitions than the in-process run"
            )

    episodes = sum(u.episodes for u in units)
    lo, hi = statistics.median(local), statistics.median(remote)
    print(
        f"collect bench: env={args.env} units={len(units)} episodes={episodes} env_steps={steps} "
        f"cores={os.cpu_count()} repeat={args.repeat}"
    )
    print(f"  1 worker in-process : {lo:9.0f} env steps/s   (runs: {_runs(local)})")
    print(
        f"  {args.workers} Ray workers     : {hi:9.0f} env steps/s   (runs: {_runs(remote)}; "
        f"actor start-up {statistics.median(startup):.1f}s not counted)"
    )
    print(
        f"  ratio               : {hi / lo:9.2f}x   (goal >= 1.7x with 2 workers on 2 free cores)"
    )
    print("  identical transitions: yes")


if __name__ == "__main__":
    main()
