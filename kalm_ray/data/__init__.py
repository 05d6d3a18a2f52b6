"""Episode data: the transition schema, the ``collect`` stage, instruction embeddings.

Modules: :mod:`~kalm_ray.data.schema` (Parquet schema, ``Episode``),
:mod:`~kalm_ray.data.collect` (``run_collect``), :mod:`~kalm_ray.data.collect_actor`
(the Ray collection role), :mod:`~kalm_ray.data.text` (text encoders and the
``instructions`` table, ``load_instruction_table``), :mod:`~kalm_ray.data.card`.
Nothing heavy (Ray, torch) is imported here.

An episode folder (``data/real/``) holds ``*.parquet`` files beside ``manifest.json``,
``README.md`` and ``config.yaml``; ``pyarrow.parquet.read_table(folder)`` would trip on
those, so read it with :func:`read_episodes` / :func:`episode_files` (Ray Data's
``read_parquet`` already keeps only ``.parquet`` files).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from kalm_ray.artifacts import RunDir
from kalm_ray.data.schema import Episode, column_matrix, episodes_to_table, transition_schema
from kalm_ray.errors import InputError

REAL_DIR = "data/real"


def episode_files(run: RunDir | str, folder: str = REAL_DIR) -> list[str]:
    """Filesystem paths (for ``run.fs``) of the Parquet files of an episode folder, sorted."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    names = [n for n in run.list(folder) if n.endswith(".parquet")]
    if not names:
        raise InputError(f"{run.uri_of(folder)}: no episode files; run `kalm collect CONFIG` first")
    return [run.path(folder, n) for n in names]


def read_episodes(
    run: RunDir | str, folder: str = REAL_DIR, *, columns: list[str] | None = None
) -> pa.Table:
    """All transitions of an episode folder as one table, in file (task) and row order."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    tables = [
        pq.read_table(p, filesystem=run.fs, columns=columns) for p in episode_files(run, folder)
    ]
    return pa.concat_tables(tables)


__all__ = [
    "REAL_DIR",
    "Episode",
    "column_matrix",
    "episode_files",
    "episodes_to_table",
    "read_episodes",
    "transition_schema",
]
