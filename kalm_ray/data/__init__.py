"""Episode data: the transition schema, the ``collect`` stage's machinery, instruction embeddings.

Modules: :mod:`~kalm_ray.data.schema` (Parquet schema, ``Episode``),
:mod:`~kalm_ray.data.collect` (units and episode files of :mod:`kalm_ray.stages.collect`),
:mod:`~kalm_ray.data.collect_actor`
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
TRANSITION_COLUMNS: tuple[str, ...] = (
    "episode_id", "t", "task", "instruction", "state", "action", "reward", "next_state",
    "terminated", "truncated",
)
"""Columns every episode file must have (see :func:`~kalm_ray.data.schema.transition_schema`)."""


def episode_files(run: RunDir | str, folder: str = REAL_DIR) -> list[str]:
    """Filesystem paths (for ``run.fs``) of the Parquet files of an episode folder, sorted."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    names = [n for n in run.list(folder) if n.endswith(".parquet")]
    if not names:
        raise InputError(
            f"{run.uri_of(folder)}: no episode files; run `{run.command('collect')}` first"
        )
    return [run.path(folder, n) for n in names]


def check_parquet_files(run: RunDir | str, folder: str = REAL_DIR) -> int:
    """Open the footer of every Parquet file of an episode folder; returns how many there are.

    A stage checks its inputs with this before any work: a truncated or foreign file is then
    one InputError naming the file, not an exception from inside a Ray Data task minutes
    later. Only footers and column names are read (cheap); damage inside a data page still
    shows when the rows are read. A folder with no Parquet file passes (0): the stage that
    reads it says so in its own words.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    names = [n for n in run.list(folder) if n.endswith(".parquet")]
    for name in names:
        path, uri = run.path(folder, name), run.uri_of(folder, name)
        try:
            with run.fs.open_input_file(path) as f:
                columns = set(pq.ParquetFile(f).schema_arrow.names)
        # A flipped byte in a footer's metadata can also fail as UnicodeDecodeError.
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{uri}: not a readable Parquet file ({why[:200]})") from None
        missing = [c for c in TRANSITION_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"{uri}: not an episode file (no column {missing[0]!r})")
    return len(names)


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
    "TRANSITION_COLUMNS",
    "Episode",
    "check_parquet_files",
    "column_matrix",
    "episode_files",
    "episodes_to_table",
    "read_episodes",
    "transition_schema",
]
