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
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagined_subset import imagined_parts, write_copy  # noqa: E402  (sibling scripts)
from wording_probe import linear_reader, wordings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="a run dir with data/imagined done")
    p.add_argument("dst", type=Path, help="the copy to write (must not exist)")
    p.add_argument("--reading", choices=("own", "linear"), required=True)
    p.add_argument("--seed", type=int, default=0, help="which demonstration each wording gets")
    args = p.parse_args(argv)
    imagined = imagined_parts(p, args.src, args.dst)

    from kalm_ray.data.text import read_instruction_table
    from kalm_ray.errors import InputError

    try:
        level, task, text, emb = wordings(read_instruction_table(str(args.src)))
    except InputError as e:
        p.error(str(e))
    train, reph = level == "train", level == "rephrase"
    goals = sorted(set(task[train]))
    read_as = task[reph]
    if args.reading == "linear":
        read = linear_reader(emb[train], np.asarray([goals.index(g) for g in task[train]]))
        read_as = np.asarray(goals)[read(emb[reph])]

    schema = pq.read_schema(imagined[0])
    real = pa.concat_tables(
        pq.read_table(f, columns=schema.names)
        for f in sorted((args.src / "data/real").glob("*.parquet"))
    )
    episode_of = {}  # goal -> its demonstrations' ids
    for eid, goal in zip(real["episode_id"].to_pylist(), real["task"].to_pylist(), strict=True):
        episode_of.setdefault(goal, {})[eid] = None
    missing = sorted(set(read_as) - set(episode_of))
    if missing:
        p.error(f"{args.src}: no real demonstration of goal {missing[0]!r} to reword")
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

    write_copy(args.src, args.dst, table)
    right = float(np.mean(read_as == task[reph]))
    print(
        f"{args.dst}: {len(parts)} reworded demonstrations ({table.num_rows} rows), "
        f"read as their own goal {right:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
