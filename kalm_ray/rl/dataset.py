"""The offline-RL data pipeline: transitions + instruction embeddings -> RLlib's columns.

Ray Data reads ``data/real/`` (and ``data/imagined/``), checks that every instruction has an
embedding, joins each row with its embedding (:class:`JoinEmbeddings`), mixes the sources at
the configured ratio, permutes rows within blocks, and writes the prepared columnar dataset
once per data mix
(``policy/_data/<mix>/``). Every training unit of that mix then reads it with RLlib's own
offline reader; nothing is re-joined per unit or per update.

Columns written (``ray.rllib.core.columns.Columns``): ``obs``/``new_obs`` ``(obs_dim,)``
float32 = :func:`make_obs` of state/next_state and the embedding; ``actions`` (int64, or
``(act_dim,)`` float32); ``rewards`` float32; ``terminateds``/``truncateds`` bool, kept
distinct (a truncated step bootstraps, a terminated one does not); ``eps_id`` string.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kalm_ray.artifacts import RunDir
from kalm_ray.data.schema import column_matrix
from kalm_ray.data.text import load_instruction_table
from kalm_ray.envs.suite import LEVELS
from kalm_ray.errors import InputError

log = logging.getLogger("kalm_ray")

INSTRUCTIONS_FILE = "data/instructions.parquet"
SOURCE_DIRS: dict[str, str] = {"real": "data/real", "imagined": "data/imagined"}
MIX_SOURCES: dict[str, tuple[str, ...]] = {"real": ("real",), "real+imagined": ("real", "imagined")}
LOCAL_ROWS = 200_000
"""Above this many source rows (or on a remote run dir) ``engine=auto`` uses Ray Data."""
_READ_COLUMNS = [
    "episode_id",
    "instruction",
    "state",
    "action",
    "reward",
    "next_state",
    "terminated",
    "truncated",
]


def make_obs(state: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """The observation a policy sees: ``concat(state, embedding)``.

    The one place that defines the observation layout (training data and evaluation both
    call it).

    Args:
        state: ``(B, D)`` env states.
        embeddings: ``(B, E)`` instruction embeddings, row-aligned with ``state``.

    Returns:
        ``(B, D + E)`` float32.
    """
    state = np.asarray(state, dtype=np.float32)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if state.ndim != 2 or embeddings.ndim != 2 or len(state) != len(embeddings):
        raise ValueError(
            f"make_obs: need (B, D) and (B, E), got {state.shape} and {embeddings.shape}"
        )
    return np.concatenate([state, embeddings], axis=1)


def load_embeddings(run: RunDir) -> dict[str, np.ndarray]:
    """Instruction text -> embedding ``(E,)`` float32, from ``data/instructions.parquet``."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in load_instruction_table(run).items()}


def check_embeddings(instructions: list[str], table: dict[str, np.ndarray], *, where: str) -> None:
    """Raise InputError naming the first instruction (of ``where``) that has no embedding."""
    missing = [t for t in instructions if t not in table]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(
            f"{where}: instruction {missing[0]!r} has no embedding in {INSTRUCTIONS_FILE}{more}; "
            "it was made for other wordings than this code's; collect into a new --run-dir "
            "(an up-to-date collect is skipped)"
        )


WordingGroups = dict[tuple[str, str], list[str]]
"""``(level, task) -> wordings``: texts that name the same goal (see ``wording_copies``)."""


def wording_groups(run: RunDir) -> WordingGroups:
    """The wordings of each (level, task) of the run's instruction table."""
    from kalm_ray.data.text import read_instruction_table

    table = read_instruction_table(run).select(["text", "level", "task"]).to_pydict()
    groups: WordingGroups = {}
    for text, level, task in zip(table["text"], table["level"], table["task"], strict=True):
        groups.setdefault((level, task), []).append(text)
    return groups


def copy_targets(groups: WordingGroups, allowed: set[str]) -> list[list[str]]:
    """The wordings a transition may be copied under, group by group.

    A train-level group keeps every wording: they are the training instructions, given to
    the experimenter. A novel level's group keeps only the wordings in ``allowed`` (those the
    LLM was asked to imagine for): the others are the evaluation's alone, and a rollout
    imagined for one wording must not teach the policy a wording nobody gave imagination.
    """
    return [
        texts if level == LEVELS[0] else [t for t in texts if t in allowed]
        for (level, _), texts in groups.items()
    ]


class JoinEmbeddings:
    """Transition rows (a pyarrow batch) -> RLlib offline columns, given the instruction table.

    A row whose instruction has no embedding raises :class:`InputError` (never dropped).

    With ``copies > 0`` each row is also emitted ``copies`` more times, each copy under a
    wording drawn at random (seeded) from its instruction's group in ``wordings`` (texts of
    one goal at one level): a dataset that shows each goal in a few wordings teaches the
    policy that the others mean the same (measured on quick CLEVR data, BC: +4 pp train-level
    and +6 pp rephrase success with 3 copies). States, actions and rewards are unchanged: the
    labels follow the goal, not the wording.
    """

    def __init__(
        self,
        table: dict[str, np.ndarray],
        seed: int | None = None,
        *,
        wordings: list[list[str]] | None = None,
        copies: int = 0,
    ):
        self.texts = {t: i for i, t in enumerate(table)}
        self.matrix = np.stack(list(table.values())).astype(np.float32) if table else None
        # Rows come in episode order; permuting each block decorrelates RLlib's batches.
        self.rng = np.random.default_rng(seed) if seed is not None else None
        self.copies = int(copies)
        if self.copies and not wordings:
            raise ValueError("JoinEmbeddings: copies > 0 needs the wording groups")
        self.alternatives: dict[int, np.ndarray] = {}
        for group in wordings or []:
            ids = np.asarray([self.texts[t] for t in group if t in self.texts], np.int64)
            for i in ids:
                self.alternatives.setdefault(int(i), ids)
        self.wording_rng = np.random.default_rng([seed or 0, 1])

    def _reworded(self, idx: np.ndarray) -> np.ndarray:
        """Each index replaced by a random one of its group (itself when it has none)."""
        out = np.empty_like(idx)
        u = self.wording_rng.random(len(idx))
        for j, i in enumerate(idx):
            alt = self.alternatives.get(int(i))
            out[j] = i if alt is None else alt[int(u[j] * len(alt))]
        return out

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        instr = batch.column("instruction").to_pylist()
        try:
            idx = np.fromiter((self.texts[t] for t in instr), dtype=np.int64, count=len(instr))
        except KeyError as e:
            raise InputError(
                f"instruction {e.args[0]!r} has no embedding in {INSTRUCTIONS_FILE}"
            ) from None
        action = batch.column("action")
        if pa.types.is_fixed_size_list(action.type):
            actions = column_matrix(batch, "action")
        else:
            actions = action.to_numpy().astype(np.int64)
        # Output row j is copy ``copy[j]`` of input row ``row[j]`` under wording ``emb_idx[j]``.
        n, reps = len(idx), 1 + self.copies
        row, copy = np.tile(np.arange(n), reps), np.repeat(np.arange(reps), n)
        emb_idx = np.concatenate([idx] + [self._reworded(idx) for _ in range(self.copies)])
        if self.rng is not None:
            order = self.rng.permutation(len(row))
            row, copy, emb_idx = row[order], copy[order], emb_idx[order]
        emb = self.matrix[emb_idx]
        eps = batch.column("episode_id").to_pylist()
        return {
            "obs": make_obs(column_matrix(batch, "state")[row], emb),
            "actions": actions[row],
            "rewards": batch.column("reward").to_numpy().astype(np.float32)[row],
            "new_obs": make_obs(column_matrix(batch, "next_state")[row], emb),
            "terminateds": batch.column("terminated")
            .to_numpy(zero_copy_only=False)
            .astype(bool)[row],
            "truncateds": batch.column("truncated")
            .to_numpy(zero_copy_only=False)
            .astype(bool)[row],
            # A copy is a transition of its own episode id, so none is mistaken for the original.
            "eps_id": np.asarray(
                [eps[r] if c == 0 else f"{eps[r]}#w{c}" for r, c in zip(row, copy, strict=True)],
                dtype=object,
            ),
        }


def join_batch(
    batch: pa.Table,
    *,
    table: dict[str, np.ndarray],
    seed: int | None,
    wordings: list[list[str]] | None = None,
    copies: int = 0,
) -> dict[str, np.ndarray]:
    """``map_batches`` function form of :class:`JoinEmbeddings`."""
    return JoinEmbeddings(table, seed, wordings=wordings, copies=copies)(batch)


@dataclass
class MixInfo:
    """What :func:`prepare_mix` wrote for one data mix."""

    mix: str
    path: str
    """Folder of the prepared Parquet files (a path on the run dir's filesystem)."""
    rows: dict[str, int]
    """Source -> rows in the prepared dataset (after resampling to the ratio and adding the
    wording copies)."""
    source_rows: dict[str, int]
    """Source -> rows available on disk."""
    state_dim: int
    emb_dim: int

    @property
    def obs_dim(self) -> int:
        return self.state_dim + self.emb_dim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mix_counts(n_real: int, n_imagined: int, ratio: float | None) -> tuple[int, int]:
    """Rows of each source in a mix whose imagined share is ``ratio``.

    All real rows are kept; imagined rows are subsampled or repeated so that
    ``imagined / (real + imagined) == ratio`` (rounded). ``ratio=None`` keeps both as they are
    (proportional to size); ``ratio=1`` keeps only imagined rows.
    """
    if ratio is None or n_imagined == 0:
        return n_real, n_imagined
    if ratio >= 1.0:
        return 0, n_imagined
    return n_real, int(round(ratio / (1.0 - ratio) * n_real))


def _resample(ds, n_have: int, n_want: int, seed: int):
    """About ``n_want`` rows of ``ds`` (``n_have`` rows): whole repeats plus a Bernoulli sample."""
    # NOTE: no ``random_shuffle``/``limit``/``unique`` in this pipeline: in Ray Data 2.60 they
    # ran through shuffle/aggregation workers that, on a 2-core machine, started ~90 worker
    # processes and took minutes for a few thousand rows. A per-block sample is a plain map.
    if n_want == n_have:
        return ds
    copies = -(-n_want // n_have)
    repeated = ds.union(*[ds] * (copies - 1)) if copies > 1 else ds
    return repeated.random_sample(n_want / (copies * n_have), seed=seed)


def source_files(run: RunDir, source: str) -> list[str]:
    """Paths (on ``run.fs``) of a source's Parquet files; InputError when there are none."""
    folder = SOURCE_DIRS[source]
    files = [run.path(folder, f) for f in run.list(folder) if f.endswith(".parquet")]
    if not files:
        raise InputError(
            f"{run.uri_of(folder)}: no Parquet files; run the stage that writes them first"
        )
    return files


def read_source(run: RunDir, source: str):
    """A Ray Dataset of one source's transitions (only the columns training needs)."""
    import ray.data

    return ray.data.read_parquet(
        source_files(run, source), filesystem=run.fs, columns=_READ_COLUMNS
    )


def source_instructions(run: RunDir, source: str) -> tuple[list[str], int]:
    """Distinct instructions and the row count of a source, from its Parquet files alone."""

    texts: set[str] = set()
    rows = 0
    for path in source_files(run, source):
        col = pq.read_table(path, columns=["instruction"], filesystem=run.fs).column("instruction")
        texts.update(pc.unique(col).to_pylist())
        rows += len(col)
    return sorted(texts), rows


def to_arrow(columns: dict[str, np.ndarray]) -> pa.Table:
    """Joined columns as an Arrow table; 2-D columns become Ray's tensor extension type, which
    Ray Data (and so RLlib's reader) reads back as ``(rows, width)`` arrays."""
    from ray.data.extensions import ArrowTensorArray

    return pa.table(
        {
            k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v)
            for k, v in columns.items()
        }
    )


def pick_engine(engine: str, run: RunDir, rows: int) -> str:
    """``auto``: ``local`` for a local run dir of at most :data:`LOCAL_ROWS` rows, else ``ray``."""
    if engine != "auto":
        return engine
    return "local" if run.is_local and rows <= LOCAL_ROWS else "ray"


def prepare_mix(
    run: RunDir,
    mix: str,
    out_dir: str,
    *,
    embeddings: dict[str, np.ndarray],
    ratio: float | None,
    seed: int,
    engine: str = "auto",
    wordings: WordingGroups | None = None,
    wording_copies: int = 0,
    asked: set[str] | None = None,
) -> MixInfo:
    """Join, mix and write one data mix to ``out_dir`` (relative to the run dir).

    ``engine``: ``ray`` runs read -> join -> write as Ray Data tasks (large data, clusters);
    ``local`` does the same with pyarrow in this process (small data: no task scheduling);
    ``auto`` picks by size (:func:`pick_engine`). Both write the same columns.
    Rows are permuted within each block; training adds a local shuffle buffer on top (see
    ``kalm_ray.rl.algos``). With ``ratio`` set, the ``ray`` engine reaches the imagined share in
    expectation (Bernoulli sampling), the ``local`` one exactly. ``wording_copies`` extra
    copies of every row carry other wordings of its goal (see :class:`JoinEmbeddings`): any
    training wording, and of a novel level's only those in ``asked`` (the wordings the imagine
    stage gave the LLM) or in the data (:func:`copy_targets`).
    Raises InputError when a source folder is empty or an instruction has no embedding.
    """
    have: dict[str, int] = {}
    present: set[str] = set()
    for source in MIX_SOURCES[mix]:
        texts, have[source] = source_instructions(run, source)
        check_embeddings(texts, embeddings, where=run.uri_of(SOURCE_DIRS[source]))
        present.update(texts)
    targets = copy_targets(wordings, present | (asked or set())) if wordings else None
    if "imagined" in have and have["imagined"] == 0:
        log.warning(
            "%s holds no rollouts (the filter kept none): mix %r trains on real data only",
            run.uri_of(SOURCE_DIRS["imagined"]),
            mix,
        )
    n_real, n_im = mix_counts(
        have["real"], have.get("imagined", 0), ratio if "imagined" in have else None
    )
    want = {"real": n_real, "imagined": n_im}
    if not any(want.values()):
        raise InputError(f"data mix {mix!r}: no rows")
    if pick_engine(engine, run, sum(have.values())) == "local":
        _prepare_local(
            run,
            out_dir,
            have=have,
            want=want,
            join=JoinEmbeddings(embeddings, seed, wordings=targets, copies=wording_copies),
            seed=seed,
        )
    else:
        parts = [
            _resample(read_source(run, s), have[s], want[s], seed + i)
            for i, s in enumerate(have)
            if want[s] > 0
        ]
        mixed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        # A task (not an actor pool) so that Ray Data fuses read -> join -> write into one task
        # per file on pooled workers; an actor would start a process of its own.
        joined = mixed.map_batches(
            join_batch,
            fn_kwargs={
                "table": embeddings,
                "seed": seed,
                "wordings": targets,
                "copies": wording_copies,
            },
            batch_format="pyarrow",
            batch_size=8192,
        )
        joined.write_parquet(run.path(out_dir), filesystem=run.fs)
    schema = pq.read_schema(source_files(run, "real")[0], filesystem=run.fs)
    return MixInfo(
        mix=mix,
        path=run.path(out_dir),
        rows={s: want[s] * (1 + wording_copies) for s in have},
        source_rows=have,
        state_dim=schema.field("state").type.list_size,
        emb_dim=len(next(iter(embeddings.values()))),
    )


def _prepare_local(
    run: RunDir,
    out_dir: str,
    *,
    have: dict[str, int],
    want: dict[str, int],
    join: JoinEmbeddings,
    seed: int,
) -> None:
    """The ``local`` engine: every source in memory, exact resampling, one Parquet file."""
    rng = np.random.default_rng(seed)
    tables = []
    for source, n in have.items():
        if want[source] == 0:
            continue
        t = pq.read_table(source_files(run, source), columns=_READ_COLUMNS, filesystem=run.fs)
        if source == "imagined":
            # The imagine stage writes rollouts in the order Ray delivers them; sorted, the same
            # rollouts give the same batches and so the same policy (real data is written in
            # episode order already). Row i of an episode follows row i - 1: the sort is stable.
            t = t.take(pc.sort_indices(t, [("episode_id", "ascending")]))
        if want[source] != n:
            full, rest = divmod(want[source], n)
            idx = np.concatenate([np.tile(np.arange(n), full), rng.choice(n, rest, replace=False)])
            t = t.take(idx)
        tables.append(t)
    joined = join(pa.concat_tables(tables, promote_options="default"))
    run.makedirs(out_dir)
    pq.write_table(to_arrow(joined), run.path(out_dir, "part-00000.parquet"), filesystem=run.fs)
