"""Train stage wall time: training units as parallel Ray tasks vs one after another.

Starts its own local Ray cluster of ``--nodes`` nodes (``ray start --head`` and ``ray start
--address`` on this machine, token auth, own ports and temp dirs, as
``tests/test_cluster_jobs.py`` does; stopped by pid at the end), or with ``--local`` one
in-process Ray of ``--num-cpus`` logical CPUs (the quick preset's 8). Writes one synthetic
CLEVR-shaped run (obs 778 = 10 state + 768 embedding, 40 actions, ``--real``/``--imagined``
transitions; CLEVR's train wordings embedded for the quick success checks), then runs the
real ``run_train`` on the same units twice, each into a fresh copy of the run, in the order
``--order``: ``max_concurrent_units: 1`` (sequential, in the driver: the path before issue 18)
and ``max_concurrent_units: --parallel`` (Ray tasks of ``--cpus-per-unit`` CPUs; 0 = as
many as the cluster holds). The train section is ``--preset``'s with ``--iterations``,
``--algos``, ``--data`` and ``--seeds`` overridden. Prints both wall times, the ratio and
whether every unit's weights digest (``policy/summary.json``) is the same in both.

    .venv/bin/python bench/train_units.py                      # 2-node cluster, 4 units
    .venv/bin/python bench/train_units.py --local --num-cpus 8 --iterations 10 \\
        --data real real+imagined                              # the quick preset's 8 units
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
STATE_DIM, EMB_DIM = 10, 768


def write_run(folder: str, *, real: int, imagined: int) -> None:
    """A toy run shaped like the quick preset's CLEVR data (see tests/synthetic_data.py)."""
    from kalm_ray.artifacts import RunDir
    from kalm_ray.envs import get_suite
    sys.path.insert(0, str(ROOT))
    from tests.synthetic_data import ToyTask, write_toy_run

    run = RunDir(folder)
    task = ToyTask(discrete=True, state_dim=STATE_DIM, emb_dim=EMB_DIM)
    # ~3 transitions per toy episode (horizon 5, half of them solved early)
    write_toy_run(run, task, episodes=real // 3, imagined=imagined // 3, seed=5)
    suite = get_suite("clevr")
    texts = sorted({w for t in suite.tasks("train") for w in suite.instructions("train", t)})
    emb = np.random.default_rng(0).normal(size=(len(texts), EMB_DIM)).astype(np.float32)
    old = pq.read_table(run.path("data/instructions.parquet"))
    extra = pa.table(
        {
            "text": texts,
            "env": ["clevr"] * len(texts),
            "level": ["train"] * len(texts),
            "task": [""] * len(texts),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), EMB_DIM),
        }
    )
    pq.write_table(
        pa.concat_tables([old, extra.cast(old.schema)]), run.path("data/instructions.parquet")
    )


def train_section(args: argparse.Namespace) -> dict:
    with open(ROOT / args.preset) as f:
        train = dict(yaml.safe_load(f)["train"])
    train.update(algos=args.algos, data=args.data, seeds=args.seeds, iterations=args.iterations)
    if args.updates:
        train["updates_per_iteration"] = args.updates
    train["num_cpus_per_unit"] = args.cpus_per_unit
    return train


def run_once(base: str, where: str, train: dict, *, concurrent: int | None) -> dict:
    """``run_train`` into a fresh copy of the toy run; wall time and digests."""
    from kalm_ray.artifacts import RunDir
    from kalm_ray.config import parse_config
    from kalm_ray.stages.train import run_train

    shutil.copytree(base, where)
    run = RunDir(where)
    cfg = parse_config(
        {
            "name": "bench-train-units",
            "run_dir": where,
            "env": {"name": "clevr", "max_episode_steps": 5},
            "train": {**train, "max_concurrent_units": concurrent},
        }
    )
    t = time.perf_counter()
    manifest = run_train(cfg, run)
    wall = time.perf_counter() - t
    units = run.read_json("policy", "summary.json")["units"]
    return {
        "wall_s": round(wall, 2),
        "train_s": manifest.timings["train_s"],
        "units_s": manifest.timings["units_s"],
        "digests": {u["unit"]: u["weights_sha256"] for u in units},
    }


@contextlib.contextmanager
def local_cluster(args: argparse.Namespace):
    """A fresh cluster of ``--nodes`` ``ray start`` nodes on this machine; yields the env a
    driver needs to join it (address and auth token), stops its processes on exit."""
    sys.path.insert(0, str(ROOT))
    from tests.test_cluster_jobs import LocalCluster

    for attempt in range(3):  # a node can miss Ray's start-up deadlines on a busy machine
        c = LocalCluster(num_cpus=args.cpus_per_node)
        try:
            c.start_head()
            for _ in range(args.nodes - 1):
                c.add_node()
            c.wait_for_nodes()
            break
        except Exception:
            c.stop()
            if attempt == 2:
                raise
    try:
        yield {
            **c.env,
            "KALM_BENCH_ADDRESS": f"127.0.0.1:{c.gcs_port}",
            "KALM_BENCH_CLUSTER": f"{args.nodes} nodes x {args.cpus_per_node} CPUs "
            "(ray start, this machine)",
        }
    finally:
        c.stop()


@contextlib.contextmanager
def ray_driver(args: argparse.Namespace):
    """Ray for this driver: join ``KALM_BENCH_ADDRESS``, or start one in-process (--local)."""
    import ray

    address = os.environ.get("KALM_BENCH_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        desc = os.environ["KALM_BENCH_CLUSTER"]
    else:
        ray.init(
            num_cpus=args.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        desc = f"local, {args.num_cpus} logical CPUs"
    try:
        yield desc
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs per started node")
    p.add_argument("--local", action="store_true", help="one in-process Ray, no cluster")
    p.add_argument("--num-cpus", type=int, default=8, help="--local: logical CPUs")
    p.add_argument("--preset", default="configs/quick.yaml", help="train section taken from it")
    p.add_argument("--algos", nargs="+", default=["bc", "dcql"])
    p.add_argument("--data", nargs="+", default=["real"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--updates", type=int, default=0, help="per iteration; 0 = the preset's")
    p.add_argument("--cpus-per-unit", type=float, default=1.0)
    p.add_argument("--parallel", type=int, default=0, help="max_concurrent_units; 0 = None")
    p.add_argument("--real", type=int, default=3300, help="real transitions (quick: ~3,300)")
    p.add_argument("--imagined", type=int, default=900, help="imagined transitions")
    p.add_argument("--order", default="seq,par", help="which runs, in this order")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not args.local and "KALM_BENCH_ADDRESS" not in os.environ:
        # NOTE: Ray reads RAY_AUTH_MODE when it is imported: the driver joining the token-auth
        # cluster is a child process started with the cluster's environment.
        with local_cluster(args) as env:
            cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]
            return subprocess.run(cmd, env=env).returncode

    from kalm_ray.raysetup import configure_console

    configure_console(False)
    train = train_section(args)
    out: dict = {"args": vars(args), "train": train}
    with (
        tempfile.TemporaryDirectory(prefix="kalm-bench-units-") as tmp,
        ray_driver(args) as ray_desc,
    ):
        base = os.path.join(tmp, "base")
        write_run(base, real=args.real, imagined=args.imagined)
        out["ray"] = ray_desc
        for k, mode in enumerate(args.order.split(",")):
            concurrent = 1 if mode == "seq" else (args.parallel or None)
            print(f"--- {mode} (max_concurrent_units={concurrent}) on {ray_desc}", flush=True)
            out[mode] = run_once(
                base, os.path.join(tmp, f"{k}-{mode}"), train, concurrent=concurrent
            )
            print(f"    {mode}: {out[mode]['wall_s']}s (units {out[mode]['train_s']}s)", flush=True)
    n_units = len(out[mode]["digests"])
    print(
        f"\ntrain stage, {n_units} units ({'/'.join(args.algos)} x {'/'.join(args.data)} x "
        f"seeds {args.seeds}, {args.iterations} iterations of {train['updates_per_iteration']} "
        f"updates), {out['ray']}:"
    )
    for mode in ("seq", "par"):
        if mode in out:
            print(
                f"  {mode}: {out[mode]['wall_s']:7.1f}s wall "
                f"({out[mode]['train_s']:.1f}s training units)"
            )
    ok = True
    if "seq" in out and "par" in out:
        out["ratio_seq_over_par"] = round(out["seq"]["wall_s"] / out["par"]["wall_s"], 3)
        out["digests_equal"] = out["seq"]["digests"] == out["par"]["digests"]
        ok = out["digests_equal"]
        print(f"  speed-up parallel vs sequential: {out['ratio_seq_over_par']:.2f}x")
        print(f"  weights digests identical: {out['digests_equal']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
