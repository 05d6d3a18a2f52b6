"""Learner updates/s of CQL: kalm_ray's RLlib CQL and stock RLlib CQL vs d3rlpy.

``--algo cql`` (default), continuous CQL:

Same data (``--transitions`` rows: obs 475 = 91 state + 384 embedding, 4-d actions in
[-1, 1], episodes of 100), same network widths (2 x 256), batch 256, 10 sampled actions, twin
critics, one process and ``--threads`` torch threads. The three are timed in interleaved
rounds (the machine is shared, so a slow spell hits all of them); each round is
``--updates`` learner updates, data sampling included (RLlib: one ``algo.train()`` with
``dataset_num_iters_per_learner=--updates``; d3rlpy: ``sample_transition_batch`` +
``update``). Prints medians over rounds and the ratios to d3rlpy.

Not identical, by design of the libraries (see docs): d3rlpy tunes the conservative weight
(Lagrangian, ``alpha_learning_rate>0``) by default, RLlib keeps it fixed; stock RLlib's critic
is an obs stream + action stream + fusion layer (its SAC catalog), d3rlpy's and kalm_ray's a
2 x 256 MLP over ``[obs, action]``.

    pip install --no-deps d3rlpy==2.8.1 gym==0.26.2 h5py structlog colorama dataclasses-json \\
        typing-inspect "marshmallow<4" mypy_extensions
    # (--no-deps: d3rlpy pins gymnasium 1.0.0; ray 2.60 needs 1.2.2)
    .venv/bin/python bench/train.py [--transitions 100000] [--updates 50] [--rounds 3] [--profile]

``--algo dcql``, discrete CQL (the CLEVR algorithm): kalm_ray's ``dcql`` (double-DQN TD loss
+ the logsumexp conservative term, :mod:`kalm_ray.rl.discrete_cql`) vs d3rlpy's
``DiscreteCQL`` (also double DQN + logsumexp), on data shaped like CLEVR's: obs 778 (10 state +
768 ``word_halves`` embedding), 40 actions, episodes of 50; the same Q network (778 -> 256 ->
256 -> 40, ReLU), batch 256, one critic, Adam. No stock RLlib row: RLlib 2.60's CQL is
continuous only. Not identical: d3rlpy's TD loss is Huber and its target network is copied
every ``target_update_interval`` steps; ours is squared error with a Polyak step after every
update (both are a few elementwise ops next to the matmuls).

(``make bench`` installs d3rlpy this way: ``bench/requirements.txt``.)

``--memory``: after the timed rounds, each library runs again alone in a fresh process
(``--arm NAME``: build, warm up, one round) and reports its peak resident memory: the
process's own (``VmHWM``) plus, sampled every 0.2 s, the summed RSS of Ray's worker
processes (``ray::*`` of this process's own local cluster; Ray's system processes, GCS and
raylet, are not counted: they are the same for any Ray program). Printed next to the rates
as a ratio to d3rlpy's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

OBS_DIM, ACT_DIM, EPISODE = 91 + 384, 4, 100
D_OBS_DIM, D_ACTIONS, D_EPISODE = 10 + 768, 40, 50


def make_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random transitions in episodes of ``EPISODE`` steps (the last step of each truncated)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
    last = (np.arange(n) % EPISODE) == EPISODE - 1
    return {
        "obs": obs[:-1],
        "new_obs": obs[1:],
        "actions": rng.uniform(-1, 1, (n, ACT_DIM)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminateds": np.zeros(n, bool),
        "truncateds": last,
    }


def make_discrete_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """CLEVR-shaped random transitions: obs 778, actions in [0, 40), episodes of 50."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n + 1, D_OBS_DIM)).astype(np.float32)
    last = (np.arange(n) % D_EPISODE) == D_EPISODE - 1
    return {
        "obs": obs[:-1],
        "new_obs": obs[1:],
        "actions": rng.integers(0, D_ACTIONS, n).astype(np.int64),
        "rewards": (rng.random(n) < 0.05).astype(np.float32),
        "terminateds": np.zeros(n, bool),
        "truncateds": last,
    }


def write_prepared(data: dict[str, np.ndarray], folder: str) -> None:
    """The data as kalm_ray's prepared columns (what ``policy/_data/<mix>/`` holds)."""
    import pyarrow.parquet as pq

    from kalm_ray.rl.dataset import to_arrow

    os.makedirs(folder, exist_ok=True)
    pq.write_table(to_arrow(data), os.path.join(folder, "part-00000.parquet"))


def build_ours(folder: str, n: int, updates: int, *, discrete: bool = False):
    """Our RLlib algorithm on the benchmark data: CQL (continuous) or discrete CQL."""
    import gymnasium as gym

    from kalm_ray.config import TrainConfig
    from kalm_ray.rl.algos import build_config

    train = TrainConfig(hidden=[256, 256], batch_size=256, updates_per_iteration=updates)
    space = (
        gym.spaces.Discrete(D_ACTIONS)
        if discrete
        else gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
    )
    cfg = build_config(
        "dcql" if discrete else "cql",
        train=train,
        data_path=folder,
        filesystem=None,
        obs_dim=D_OBS_DIM if discrete else OBS_DIM,
        action_space=space,
        num_rows=n,
        seed=0,
    )
    return cfg.build_algo()


def mdp_dataset(data: dict[str, np.ndarray], **kw):
    """The benchmark data as a d3rlpy dataset (``kw``: e.g. a discrete action space)."""
    import d3rlpy

    return d3rlpy.dataset.MDPDataset(
        observations=data["obs"],
        actions=data["actions"],
        rewards=data["rewards"],
        terminals=data["terminateds"].astype(np.float32),
        timeouts=data["truncateds"].astype(np.float32),
        **kw,
    )


def build_d3rlpy_dcql(data: dict[str, np.ndarray]):
    import d3rlpy

    dataset = mdp_dataset(
        data, action_space=d3rlpy.constants.ActionSpace.DISCRETE, action_size=D_ACTIONS
    )
    algo = d3rlpy.algos.DiscreteCQLConfig(
        batch_size=256,
        learning_rate=3e-4,
        encoder_factory=d3rlpy.models.encoders.VectorEncoderFactory([256, 256]),
        n_critics=1,
    ).create(device="cpu:0")
    algo.build_with_dataset(dataset)
    return algo, dataset


def build_stock(folder: str, updates: int):
    """RLlib 2.60's CQLConfig as shipped: its module, learner, data path (OfflinePreLearner)."""
    import gymnasium as gym
    from ray.rllib.algorithms.cql import CQLConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    cfg = (
        CQLConfig()
        .environment(
            observation_space=gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32),
            action_space=gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32),
        )
        .training(
            lr=None,
            actor_lr=1e-4,
            critic_lr=3e-4,
            alpha_lr=1e-4,
            train_batch_size_per_learner=256,
            num_actions=10,
            twin_q=True,
            bc_iters=0,
        )
        .rl_module(
            model_config=DefaultModelConfig(
                fcnet_hiddens=[256, 256],
                fcnet_activation="relu",
                head_fcnet_hiddens=[],
                fusionnet_hiddens=[],
            )
        )
        .offline_data(
            input_=folder,
            dataset_num_iters_per_learner=updates,
            map_batches_kwargs={"concurrency": 1, "num_cpus": 1},
            iter_batches_kwargs={"prefetch_batches": 1},
        )
        .learners(num_learners=0)
        .debugging(seed=0, log_level="WARN")
    )
    # NOTE: stock CQL inherits SAC's online flag and would build an env runner (it needs an
    # env); the learner and data path timed here do not depend on it.
    cfg._is_online = False
    return cfg.build_algo()


def build_d3rlpy(data: dict[str, np.ndarray]):
    import d3rlpy

    dataset = mdp_dataset(data)
    enc = d3rlpy.models.encoders.VectorEncoderFactory([256, 256])
    algo = d3rlpy.algos.CQLConfig(
        batch_size=256,
        actor_encoder_factory=enc,
        critic_encoder_factory=enc,
        n_action_samples=10,
        n_critics=2,
    ).create(device="cpu:0")
    algo.build_with_dataset(dataset)
    return algo, dataset


def rate_rllib(algo, updates: int) -> float:
    t = time.perf_counter()
    algo.train()
    return updates / (time.perf_counter() - t)


def rate_d3rlpy(algo, dataset, updates: int) -> float:
    t = time.perf_counter()
    for _ in range(updates):
        algo.update(dataset.sample_transition_batch(256))
    return updates / (time.perf_counter() - t)


class PeakMemory:
    """Peak RSS (MB) of this process (Linux) and, sampled in a thread, of its Ray workers."""

    def __init__(self, every_s: float = 0.2):
        import threading

        self.workers_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, every_s: float) -> None:
        import psutil

        me = os.getpid()
        while not self._stop.wait(every_s):
            total = 0
            # This process's own Ray workers: its local cluster's raylet is its child.
            for proc in psutil.Process(me).children(recursive=True):
                try:
                    if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::"):
                        total += proc.memory_info().rss
                except psutil.Error:  # exited between the listing and the read
                    continue
            self.workers_mb = max(self.workers_mb, total / 2**20)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        # VmHWM, the peak of this address space: ru_maxrss would carry the parent's peak over
        # exec (Linux keeps it in the process, not the address space).
        with open("/proc/self/status") as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        own = hwm_kib / 1024
        return {
            "process_mb": own,
            "ray_workers_mb": self.workers_mb,
            "total_mb": own + self.workers_mb,
        }


def start_ray() -> None:
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)


def build_arm(
    name: str, data: dict[str, np.ndarray], folder: str, args: argparse.Namespace
) -> tuple[Any, Any]:
    """``(round, algo)``: a library's timed round (``--updates`` updates, returns updates/s)
    and its RLlib algorithm to stop at the end (None for d3rlpy). RLlib arms need Ray started
    and the prepared data in ``folder``."""
    discrete = args.algo == "dcql"
    if name == "d3rlpy":
        d3, dataset = (build_d3rlpy_dcql if discrete else build_d3rlpy)(data)
        return (lambda: rate_d3rlpy(d3, dataset, args.updates)), None
    if name == "kalm_ray":
        algo = build_ours(folder, args.transitions, args.updates, discrete=discrete)
    else:
        algo = build_stock(folder, args.updates)
    return (lambda: rate_rllib(algo, args.updates)), algo


def stop_algo(algo: Any) -> None:
    from kalm_ray.rl.unit import close_iterators

    close_iterators(algo)
    algo.stop()


def run_arm(args: argparse.Namespace) -> dict[str, float]:
    """One library alone in this process: build, warm up, one round; rate and peak memory."""
    import torch

    torch.set_num_threads(args.threads)
    mem = PeakMemory()
    data = (make_discrete_data if args.algo == "dcql" else make_data)(args.transitions)
    with tempfile.TemporaryDirectory(prefix="kalm-bench-train-") as tmp:
        folder = os.path.join(tmp, "prepared")
        if args.arm != "d3rlpy":
            start_ray()
            write_prepared(data, folder)
        timed, algo = build_arm(args.arm, data, folder, args)
        timed()  # warm-up
        rate = timed()
        if algo is not None:
            import ray

            stop_algo(algo)
            ray.shutdown()
    return {"rate": rate, **mem.stop()}


def memory_of_arms(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, float]]:
    """:func:`run_arm` of each library in a fresh process, one after another."""
    import subprocess

    out = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--arm",
            name,
            "--algo",
            args.algo,
            "--transitions",
            str(args.transitions),
            "--updates",
            str(args.updates),
            "--threads",
            str(args.threads),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", choices=["cql", "dcql"], default="cql")
    p.add_argument("--transitions", type=int, default=100_000)
    p.add_argument("--updates", type=int, default=50, help="learner updates per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-stock", action="store_true", help="skip stock RLlib CQL")
    p.add_argument("--profile", action="store_true", help="cProfile one round of kalm_ray's CQL")
    p.add_argument("--memory", action="store_true", help="also each library's peak memory")
    p.add_argument("--arm", choices=["d3rlpy", "kalm_ray", "rllib_stock"], help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.arm:  # a child of --memory: one library alone, one JSON line on stdout
        print(json.dumps(run_arm(args)), flush=True)
        return 0

    import ray
    import torch

    torch.set_num_threads(args.threads)
    start_ray()
    discrete = args.algo == "dcql"
    if discrete:
        args.no_stock = True  # RLlib 2.60 has no discrete CQL
    data = (make_discrete_data if discrete else make_data)(args.transitions)
    names = ["d3rlpy", "kalm_ray"] + ([] if args.no_stock else ["rllib_stock"])
    with tempfile.TemporaryDirectory(prefix="kalm-bench-train-") as tmp:
        folder = os.path.join(tmp, "prepared")
        write_prepared(data, folder)
        built = {name: build_arm(name, data, folder, args) for name in names}
        runners = {name: timed for name, (timed, _) in built.items()}
        for fn in runners.values():  # warm-up: first batches, lazy state, PreLearner mapping
            fn()
        rates: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.rounds):
            for name, fn in runners.items():
                rates[name].append(fn())
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()),
                flush=True,
            )
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            runners["kalm_ray"]()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        for _, algo in built.values():
            if algo is not None:
                stop_algo(algo)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["d3rlpy"]
    shape = f"obs {D_OBS_DIM}, {D_ACTIONS} actions" if discrete else f"obs {OBS_DIM}"
    print(
        f"\n{'discrete ' if discrete else ''}CQL learner updates/s (median of {args.rounds} "
        f"rounds of {args.updates}; {args.transitions} transitions, {shape}, batch 256, 2x256, "
        f"torch threads {args.threads})"
    )
    for k, v in med.items():
        print(f"  {k:<12} {v:8.2f}   ratio to d3rlpy {v / base:5.2f}x")
    ray.shutdown()
    memory = memory_of_arms(args, list(rates)) if args.memory else None
    if memory:
        d3 = memory["d3rlpy"]["total_mb"]
        print("peak memory, each library alone in a fresh process (MB: process + Ray workers)")
        for k, m in memory.items():
            print(
                f"  {k:<12} {m['total_mb']:8.0f} ({m['process_mb']:.0f} + "
                f"{m['ray_workers_mb']:.0f})   ratio to d3rlpy {m['total_mb'] / d3:5.2f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rates": rates, "median": med, "memory": memory, "args": vars(args)}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
