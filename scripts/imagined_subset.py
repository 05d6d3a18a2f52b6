"""Diagnostic: a copy of a run whose imagined data is a subset, to train and evaluate again.

Which imagined rollouts help the policies and which hurt? This copies a finished run dir
(collect, ground and imagine done) to ``DST`` with ``data/imagined`` cut to:

- ``--level L`` (repeatable): only the rollouts of these novel levels;
- ``--confirmed``: only rollouts whose actions, replayed from their start in the simulator,
  reach the goal (the replay check of :mod:`kalm_ray.llm.imagine.replay`).

``--confirmed`` is an oracle: the simulator picks imagined data, which the pipeline never
does. It bounds what better imagined data could give; it is not a method. Then::

    kalm run CONFIG --run-dir DST --from train

trains and evaluates on the subset (the real-only policies are the same as the source run's
for the same seeds, so the paired table compares the subset with real-only data).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def confirmed_episodes(table: pa.Table, env: str) -> set[str]:
    """Episode ids whose actions reach the goal when replayed in the simulator."""
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.imagine.replay import Replayer

    replayer = Replayer(get_suite(env))
    out = set()
    df = table.select(["episode_id", "t", "level", "task", "state", "action"]).to_pandas()
    for eid, ep in df.groupby("episode_id"):
        ep = ep.sort_values("t")
        got = replayer.replay(
            level=ep.level.iloc[0],
            task=ep.task.iloc[0],
            start=np.asarray(ep.state.iloc[0]),
            actions=np.stack(ep.action.values),
        )
        if got is not None and got[1]:
            out.add(eid)
    replayer.close()
    return out


def imagined_parts(p: argparse.ArgumentParser, src: Path, dst: Path) -> list[Path]:
    """The source's imagined Parquet files; one error line (exit 2) when there are none or
    ``dst`` exists, before anything is written."""
    if dst.exists():
        p.error(f"{dst} exists")
    parts = sorted((src / "data" / "imagined").glob("*.parquet"))
    if not parts:
        p.error(f"{src}: no imagined data (data/imagined/*.parquet); run `kalm imagine` first")
    return parts


def write_copy(src: Path, dst: Path, imagined: pa.Table) -> None:
    """A copy of the run ``src`` at ``dst`` (no policies, no evaluation) whose whole imagined
    data is ``imagined``, with the stage's manifest written again over the new file (it checks
    its files' sizes and digests)."""
    from kalm_ray.artifacts import RunDir, write_manifest

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("policy*", "eval*"))
    folder = dst / "data" / "imagined"
    for f in folder.glob("*.parquet"):
        f.unlink()
    pq.write_table(imagined, folder / "part-00000.parquet")
    run = RunDir(str(dst))
    write_manifest(run, "data/imagined", run.manifest("data/imagined"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="a run dir with data/imagined done")
    p.add_argument("dst", type=Path, help="the copy to write (must not exist)")
    p.add_argument("--level", action="append", help="keep only these levels (repeatable)")
    p.add_argument("--confirmed", action="store_true", help="keep only replay-confirmed rollouts")
    args = p.parse_args(argv)
    table = pa.concat_tables([pq.read_table(f) for f in imagined_parts(p, args.src, args.dst)])
    keep = np.ones(table.num_rows, bool)
    if args.level:
        keep &= np.isin(table["level"].to_numpy(zero_copy_only=False), args.level)
    if args.confirmed:
        ok = confirmed_episodes(table, table["env"][0].as_py())
        keep &= np.isin(table["episode_id"].to_numpy(zero_copy_only=False), list(ok))
    kept = table.filter(pa.array(keep))
    write_copy(args.src, args.dst, kept)
    per_level = {
        lv: len(set(kept.filter(pc.equal(kept["level"], lv))["episode_id"].to_pylist()))
        for lv in sorted(set(kept["level"].to_pylist()))
    }
    print(f"{args.dst}: {kept.num_rows} of {table.num_rows} imagined rows; episodes {per_level}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
