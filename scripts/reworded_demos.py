"""Diagnostic: a copy of a run whose imagined data is real demonstrations under rephrased wordings.

What would imagined rollouts for the rephrase level give if the model that writes them acted
like the demonstrator? This copies a finished run dir (collect, ground and imagine done) to
``DST`` and replaces ``data/imagined`` with one episode per rephrase-level wording: a real
demonstration, relabelled with that wording, of the goal the wording is *read* as:

- ``--reading own``: the wording's own goal (a reader that understands every rephrasing);
- ``--reading linear``: the goal a linear classifier of the run's instruction features,
  fitted on the training wordings, reads it as (``scripts/wording_probe.py`` measures how often
  that is right): the best reading of the wording that the policy's own features allow.

Both are oracles for the *actions* (they are the demonstrator's, which no imagination writes);
``own`` is one for the reading as well. Neither is a method. Then::

    kalm run CONFIG --run-dir DST --from train

trains and evaluates on them (the real-only policies are the source run's for the same seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wording_probe import linear_reader, wordings  # noqa: E402  (a sibling script)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="a run dir with data/imagined done")
    p.add_argument("dst", type=Path, help="the copy to write (must not exist)")
    p.add_argument("--reading", choices=("own", "linear"), required=True)
    p.add_argument("--seed", type=int, default=0, help="which demonstration each wording gets")
    args = p.parse_args(argv)
    if args.dst.exists():
        p.error(f"{args.dst} exists")
    imagined = args.src / "data" / "imagined"
    if not list(imagined.glob("*.parquet")):
        p.error(f"{args.src}: no imagined data (data/imagined/*.parquet); run `kalm imagine` first")

    from kalm_ray.artifacts import RunDir, write_manifest
    from kalm_ray.data.text import read_instruction_table

    level, task, text, emb = wordings(read_instruction_table(str(args.src)))
    train, reph = level == "train", level == "rephrase"
    goals = sorted(set(task[train]))
    read_as = task[reph]
    if args.reading == "linear":
        read = linear_reader(emb[train], np.asarray([goals.index(g) for g in task[train]]))
        read_as = np.asarray(goals)[read(emb[reph])]

    schema = pq.read_schema(sorted(imagined.glob("*.parquet"))[0])
    real = pa.concat_tables(
        pq.read_table(f, columns=schema.names)
        for f in sorted((args.src / "data/real").glob("*.parquet"))
    )
    episode_of = {}  # goal -> its demonstrations' ids
    for eid, goal in zip(real["episode_id"].to_pylist(), real["task"].to_pylist(), strict=True):
        episode_of.setdefault(goal, {})[eid] = None
    generator = json.dumps({"oracle": "reworded_demos", "reading": args.reading})
    parts = []
    for i, (goal, wording, read_goal) in enumerate(
        zip(task[reph], np.asarray(text)[reph], read_as, strict=True)
    ):
        ids = list(episode_of[read_goal])
        pick = ids[int(np.random.default_rng([args.seed, i]).integers(len(ids)))]
        rows = real.filter(pc.equal(real["episode_id"], pick)).sort_by("t")
        n = rows.num_rows
        for name, value in (
            ("episode_id", f"imagined-rephrase-{i:06d}"),
            ("level", "rephrase"),
            ("task", str(goal)),
            ("instruction", str(wording)),
            ("source", "imagined"),
            ("generator", generator),
        ):
            at = schema.get_field_index(name)
            rows = rows.set_column(at, schema.field(name), pa.array([value] * n, pa.string()))
        parts.append(rows)
    table = pa.concat_tables(parts)

    shutil.copytree(args.src, args.dst, ignore=shutil.ignore_patterns("policy*", "eval*"))
    folder = args.dst / "data" / "imagined"
    for f in folder.glob("*.parquet"):
        f.unlink()
    pq.write_table(table, folder / "part-00000.parquet")
    run = RunDir(str(args.dst))
    write_manifest(run, "data/imagined", run.manifest("data/imagined"))
    right = float(np.mean(read_as == task[reph]))
    print(
        f"{args.dst}: {len(parts)} reworded demonstrations ({table.num_rows} rows), "
        f"read as their own goal {right:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
