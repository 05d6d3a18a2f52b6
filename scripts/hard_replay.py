"""Diagnostic: do the kept imagined hard rollouts act toward their goals in the real simulator?

The replay check (``filter_report.json["replay"]``) says how often an imagined success is a
real one. For multi-relation goals that is all or nothing; this says more. Each kept ``hard``
rollout of ``RUN_DIR/data/imagined`` is replayed from its start state in MuJoCo, and so is a
sequence of uniformly random actions of the same length from the same start. For both it
reports the share of rollouts whose last state meets the whole goal and the share of the
goal's relations (the suite's ``parts``) that hold in it, beside the share that held at the
start::

    python scripts/hard_replay.py RUN_DIR [--seed 0]

A diagnostic only: nothing here changes, picks or labels imagined data.
"""

from __future__ import annotations

import argparse
import glob
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def replay_parts(table: pa.Table, suite: Any, *, seed: int = 0) -> dict[str, float]:
    """Replay each ``hard`` episode of ``table`` (the transition schema) and random actions of
    the same length from its start; the shares of whole goals met and of parts holding."""
    from kalm_ray.llm.imagine.replay import Replayer

    replayer, rng = Replayer(suite), np.random.default_rng(seed)
    hard = table.filter(pc.equal(table.column("level"), "hard"))
    df = hard.select(["episode_id", "t", "task", "state", "action"]).to_pandas()
    n_actions = int(suite.action_space.n)
    rows = []
    for _, ep in df.groupby("episode_id"):
        ep = ep.sort_values("t")
        task, parts = ep.task.iloc[0], suite.parts(ep.task.iloc[0])
        start = np.asarray(ep.state.iloc[0], np.float32)
        actions = np.asarray(ep.action.tolist())
        row = [len(actions), np.mean([suite.success(p, start, start) for p in parts])]
        for acts in (actions, rng.integers(0, n_actions, size=len(actions))):
            states, _ = replayer.replay(level="hard", task=task, start=start, actions=acts)
            end = states[-1]
            row += [suite.success(task, start, end), np.mean([suite.success(p, start, end)
                                                             for p in parts])]
        rows.append(row)
    r = np.asarray(rows, float).reshape(-1, 6)
    mean = r.mean(axis=0) if len(r) else np.full(6, np.nan)
    return {
        "rollouts": float(len(r)),
        "mean_steps": mean[0],
        "parts_at_start": mean[1],
        "goal": mean[2],
        "parts_at_end": mean[3],
        "random_goal": mean[4],
        "random_parts_at_end": mean[5],
    }


def main() -> None:
    from kalm_ray.envs import get_suite

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--seed", type=int, default=0, help="random actions' seed")
    args = ap.parse_args()
    files = sorted(glob.glob(f"{args.run_dir}/data/imagined/*.parquet"))
    if not files:
        raise SystemExit(f"{args.run_dir}/data/imagined: no Parquet files")
    out = replay_parts(pa.concat_tables(pq.read_table(f) for f in files), get_suite("clevr"),
                       seed=args.seed)
    print(f"{int(out['rollouts'])} kept hard rollouts, {out['mean_steps']:.1f} steps on average")
    print(f"replayed:       goal {out['goal']:.3f}, relations holding at the end "
          f"{out['parts_at_end']:.3f} (at the start {out['parts_at_start']:.3f})")
    print(f"random actions: goal {out['random_goal']:.3f}, relations holding at the end "
          f"{out['random_parts_at_end']:.3f}")


if __name__ == "__main__":
    main()
