"""Machinery of the ``imagine`` stage (:mod:`kalm_ray.stages.imagine`).

- the stage's requests and limits: :func:`stage_requests`, :func:`level_step_limits`,
  :func:`max_new_tokens`, :func:`load_codec`, :func:`start_sampler`;
- the driver-side guard against generation actors lost for good (:func:`judged_once`) and
  the judged batches a stopped run leaves for its rerun (:class:`JudgedStore`);
- the writer that turns judged rows into Parquet parts and the filter/replay tallies
  (:func:`write_rollouts`, :func:`replay_report`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kalm_ray.artifacts import RunDir
from kalm_ray.cluster.actor_pool import MAX_ATTEMPTS
from kalm_ray.data.schema import Episode, episodes_to_table
from kalm_ray.errors import InputError
from kalm_ray.llm.grammar import step_template
from kalm_ray.llm.imagine.filter import FilterTally
from kalm_ray.llm.imagine.replay import Replayer, ReplayTally
from kalm_ray.llm.imagine.requests import (
    DataStarts,
    ResetStarts,
    StartSampler,
    build_requests,
    real_first_states,
)

if TYPE_CHECKING:
    import ray.data

    from kalm_ray.config import ExperimentConfig
    from kalm_ray.llm.codec import Codec

log = logging.getLogger("kalm_ray")

ROWS_PER_PART = 200_000
"""Transitions per Parquet part file written by the driver."""


def stage_requests(
    cfg: ExperimentConfig, run: RunDir, suite: Any, codec: Any
) -> tuple[pa.Table, int]:
    """The stage's request table and its longest rollout in env steps (bench/imagine.py too)."""
    from kalm_ray.llm.prompts import rollout_prompt

    icfg = cfg.imagine
    max_steps = icfg.max_steps or cfg.env.max_episode_steps or suite.max_episode_steps
    requests = build_requests(
        suite,
        levels=list(icfg.levels),
        rollouts_per_level=icfg.rollouts_per_level,
        max_tasks_per_level=icfg.max_tasks_per_level,
        seed=cfg.seed,
        starts=start_sampler(run, suite, icfg.start_states),
        prompt_fn=partial(rollout_prompt, codec),
    )
    return requests, max_steps


def level_step_limits(
    suite: Any, levels: list[str], max_steps: int, *, compose: bool = False
) -> dict[str, int]:
    """Steps an imagined rollout of each level may have: ``max_steps``, or less where the
    level's episodes are shorter (CLEVR ``easy``: one push, like its real episodes). With
    ``compose`` (``imagine.compose``) every part of a goal gets ``max_steps``: a level's limit
    is ``max_steps`` x its tasks' most parts, within the level's episode length."""
    limit = getattr(suite, "level_max_steps", None)
    out = {}
    for lv in levels:
        steps = max_steps * (max(len(suite.parts(t)) for t in suite.tasks(lv)) if compose else 1)
        out[lv] = min(steps, int(limit(lv))) if limit else steps
    return out


def load_codec(run: RunDir, *, env: str | None = None) -> Any:
    """The grounded model's codec (``model/codec.json``); InputError if it is not for ``env``."""
    from kalm_ray.llm.codec import CODEC_FILE, Codec

    if not run.exists("model", CODEC_FILE):
        raise InputError(
            f"{run.uri_of('model', CODEC_FILE)}: missing; run `{run.command('ground')}` first"
        )
    try:
        codec = Codec.from_dict(run.read_json("model", CODEC_FILE))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{run.uri_of('model', CODEC_FILE)}: not a usable codec ({e})") from None
    if env is not None and codec.env != env:
        raise InputError(
            f"{run.uri_of('model', CODEC_FILE)}: a model grounded on env {codec.env!r}, "
            f"not {env!r}"
        )
    return codec


def max_new_tokens(codec: Any, max_steps: int) -> int:
    """Token budget: one step more than the limit (so over-long rollouts show as such) + end."""
    return int(codec.max_step_tokens()) * (max_steps + 1) + 1


def start_sampler(run: RunDir, suite: Any, mode: str) -> StartSampler:
    """Real episodes' first states (``data``) or the env's reset distribution (``reset``)."""
    reset = ResetStarts(suite)
    if mode == "reset":
        return reset
    return DataStarts(
        real_first_states(run),
        fallback=reset,
        task_dependent=bool(suite.layout.entities),
        valid=getattr(suite, "valid_start", None),
    )


def judged_once(
    make: Callable[[pa.Table], ray.data.Dataset],
    requests: pa.Table,
    *,
    attempts: int = MAX_ATTEMPTS,
) -> Iterator[pa.Table]:
    """Batches of judged rows (``make(requests)``) holding every request exactly once.

    NOTE: Ray Data restarts a generation actor that crashes and retries its batch (actor
    pools default to max_restarts=-1, max_task_retries=-1), but an actor that is gone for
    good (``ray.kill``, restarts used up) fails the whole dataset with ActorDiedError, rows
    in flight included. The requests not received yet then go through a fresh dataset, up to
    ``attempts`` passes in all. Rows are keyed by ``request_id``, so a batch that Ray runs
    twice can never count twice. The rules are the actor pool's
    (:mod:`kalm_ray.cluster.actor_pool`), applied to Ray Data's pool: an actor that fails to
    start raises at once, lost work is redone, the same limit of deaths ends the stage.
    """
    import pyarrow.compute as pc
    from ray.exceptions import RayActorError

    seen: set[str] = set()
    for attempt in range(1, attempts + 1):
        todo = requests
        if seen:
            done = pc.is_in(requests["request_id"], value_set=pa.array(sorted(seen), pa.string()))
            todo = requests.filter(pc.invert(done))
        if todo.num_rows == 0:
            return
        try:
            for batch in make(todo).iter_batches(batch_format="pyarrow", batch_size=None):
                fresh = []
                for rid in batch.column("request_id").to_pylist():
                    fresh.append(rid not in seen)
                    seen.add(rid)
                if not all(fresh):
                    batch = batch.filter(pa.array(fresh, pa.bool_()))
                if batch.num_rows:
                    yield batch
            return
        except RayActorError as e:
            if attempt == attempts or getattr(e, "actor_init_failed", False):
                raise
            log.warning(
                "imagine: a generation actor died for good (%s); generating the %d requests "
                "not received yet again (pass %d of %d)",
                type(e).__name__,
                requests.num_rows - len(seen),
                attempt + 1,
                attempts,
            )


class JudgedStore:
    """The judged batches of a resumable imagine run, one Parquet file each
    (``judged-NNNNNN.parquet``) in the staging folder, each marked finished
    (:class:`~kalm_ray.artifacts.Staging`).

    A rerun takes the marked batches back (:meth:`resume`), generates only the requests none
    of them holds (:meth:`todo`), and rebuilds the stage's output from all of them
    (:meth:`all`): the episode parts left by the stopped run are deleted and written again,
    so they can never hold a rollout twice. :meth:`clear` removes the batches once the stage
    is complete.
    """

    PREFIX = "judged-"

    def __init__(self, run: RunDir, folder: str):
        from kalm_ray.artifacts import Staging

        self.run, self.folder, self.staging = run, folder, Staging(run, folder)
        self.n = 0

    def resume(self) -> list[pa.Table]:
        done = self.staging.finished()
        batches = [
            pq.read_table(self.run.path(self.folder, name), filesystem=self.run.fs)
            for name in sorted(n for n in done if n.startswith(self.PREFIX))
        ]
        names = self.run.list(self.folder)
        for name in names:  # the stopped run's episode parts: rebuilt from the batches
            if name.startswith("part-"):
                self.run.delete(self.folder, name)
        # New batches never reuse a name (an unmarked, half-written file is simply replaced).
        ours = [n for n in names if n.startswith(self.PREFIX) and n.endswith(".parquet")]
        self.n = 1 + max((int(n[len(self.PREFIX) : -8]) for n in ours), default=-1)
        return batches

    @staticmethod
    def todo(requests: pa.Table, resumed: list[pa.Table]) -> pa.Table:
        """The requests no resumed batch holds."""
        import pyarrow.compute as pc

        ids = sorted({r for b in resumed for r in b.column("request_id").to_pylist()})
        if not ids:
            return requests
        done = pc.is_in(requests["request_id"], value_set=pa.array(ids, pa.string()))
        return requests.filter(pc.invert(done))

    def all(self, resumed: list[pa.Table], fresh: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """The resumed batches, then each fresh one once it is saved and marked."""
        yield from resumed
        for batch in fresh:
            name = f"{self.PREFIX}{self.n:06d}.parquet"
            pq.write_table(batch, self.run.path(self.folder, name), filesystem=self.run.fs)
            self.staging.mark_finished(name, {"rows": batch.num_rows})
            self.n += 1
            yield batch

    def clear(self) -> None:
        self.staging.remove(self.PREFIX)


def write_rollouts(
    judged: Iterable[pa.Table],
    *,
    run: RunDir,
    folder: str,
    tally: FilterTally,
    total: int,
    schema: pa.Schema,
    env: str,
    generator: dict[str, Any],
    keep_failures: bool,
    replayer: Replayer | None = None,
    replay: ReplayTally | None = None,
) -> dict[str, float]:
    """Consume the judged batches (progress bar), write Parquet parts, fill ``tally``.

    With a ``replayer``, each accepted rollout's actions are then replayed in the simulator
    into ``replay`` (a diagnostic: what is kept was decided before, from the rollout alone).

    Returns throughput numbers: wall seconds, generated tokens, tokens/s, rollouts/s, and how
    many episodes and transitions were written.
    """
    from tqdm.auto import tqdm

    action_dim = (
        None
        if pa.types.is_integer(schema.field("action").type)
        else schema.field("action").type.list_size
    )
    dim = schema.field("state").type.list_size
    pending: list[Episode] = []
    n_rows = n_eps = n_parts = tokens = done = accepted = pending_rows = 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal pending, n_rows, n_parts, pending_rows
        if pending:
            table = episodes_to_table(pending, schema)
            pq.write_table(
                table, run.path(folder, f"part-{n_parts:05d}.parquet"), filesystem=run.fs
            )
            n_parts, n_rows, pending, pending_rows = n_parts + 1, n_rows + table.num_rows, [], 0

    with tqdm(total=total, desc="imagine", unit="rollout") as bar:
        for batch in judged:
            for r in batch.to_pylist():
                # doubtful: a success that did not hold up under the consistency draws
                # (imagine.consistency_draws); neither a success nor a failure to learn from
                doubtful = bool(r.get("doubtful", False)) and r["success"]
                success = r["success"] and not doubtful
                kept = r["accepted"] and not doubtful and (success or keep_failures)
                tally.add(
                    level=r["level"],
                    task=r["task"],
                    accepted=r["accepted"],
                    reason=r["reason"] or None,
                    repairs=r["repairs"],
                    success=success,
                    kept=kept,
                    doubtful=doubtful,
                    tokens=r["num_generated_tokens"],
                    text=r["generated_text"],
                    detail=r["detail"],
                )
                tokens += r["num_generated_tokens"]
                accepted += int(r["accepted"])
                if kept:
                    pending.append(
                        _episode(r, env=env, dim=dim, action_dim=action_dim, generator=generator)
                    )
                    n_eps, pending_rows = n_eps + 1, pending_rows + int(r["n_steps"])
                if r["accepted"] and replayer is not None:
                    _replay_one(
                        r, replayer, replay, dim=dim, action_dim=action_dim, doubtful=doubtful
                    )
                if pending_rows >= ROWS_PER_PART:
                    flush()
            done += batch.num_rows
            bar.update(batch.num_rows)
            bar.set_postfix(accepted=f"{accepted / max(done, 1):.2f}")
    flush()
    if n_parts == 0:
        # No rollout kept: an empty part with the schema, so the folder is a valid (empty)
        # episode source and `train` on real+imagined trains on the real rows alone.
        pq.write_table(
            schema.empty_table(), run.path(folder, "part-00000.parquet"), filesystem=run.fs
        )
        n_parts = 1
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "rollouts_per_s": done / wall if wall else 0.0,
        "episodes_written": n_eps,
        "transitions_written": n_rows,
        "parts": n_parts,
    }


def token_budget(
    codec: Codec, requests: pa.Table, level_steps: dict[str, int], report: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Per level: tokens of one step (mean over its requests: a Meta-World task's entities
    set it), of the longest legal rollout, and generated per rollout (mean), for
    ``filter_report.json["tokens"]``. ``report``: :meth:`FilterTally.report`."""
    levels = requests.column("level").to_pylist()
    starts = requests.column("start_state").to_pylist()
    per_step: dict[str, list[int]] = {}
    for lv, st in zip(levels, starts, strict=True):
        per_step.setdefault(lv, []).append(len(step_template(codec, np.asarray(st, np.float32))))
    out = {}
    for lv, steps in per_step.items():
        tally = report.get("per_level", {}).get(lv, {})
        n = max(1, int(tally.get("requested", len(steps))))
        out[lv] = {
            "per_step": float(np.mean(steps)),
            "per_rollout_max": float(np.mean(steps)) * level_steps[lv] + 1,
            "generated_per_rollout": float(tally.get("generated_tokens", 0)) / n,
        }
    return out


def _replay_one(
    r: dict[str, Any],
    replayer: Replayer,
    replay: Any,
    *,
    dim: int,
    action_dim: int | None,
    doubtful: bool = False,
) -> None:
    n = int(r["n_steps"])
    states = np.asarray(r["states"], np.float32).reshape(n + 1, dim)
    actions = np.asarray(r["actions"], np.float32)
    actions = actions.astype(np.int64) if action_dim is None else actions.reshape(n, action_dim)
    out = replayer.replay(
        level=r["level"], task=r["task"], start=states[0], actions=actions, seed=int(r["seed"])
    )
    if out is None:
        replay.skip(r["level"])
        return
    replayed, ok = out
    replay.add(
        level=r["level"],
        task=r["task"],
        instruction=r["instruction"],
        imagined=states,
        replayed=replayed,
        imagined_success=bool(r["success"]),
        replayed_success=ok,
        doubtful=doubtful,
    )


def replay_report(replayer: Replayer | None, replay: ReplayTally) -> dict[str, Any]:
    """``filter_report.json["replay"]``: the per-level check, or why there is none."""
    if replayer is None:
        return {"available": False, "why": "imagine.replay_check is off"}
    return replay.report()


def _episode(
    r: dict[str, Any], *, env: str, dim: int, action_dim: int | None, generator: dict[str, Any]
) -> Episode:
    n = int(r["n_steps"])
    actions = np.asarray(r["actions"], np.float32)
    return Episode(
        episode_id=f"imagined-{r['request_id']}",
        env=env,
        task=r["task"],
        level=r["level"],
        instruction=r["instruction"],
        states=np.asarray(r["states"], np.float32).reshape(n + 1, dim),
        actions=actions.astype(np.int64) if action_dim is None else actions.reshape(n, action_dim),
        rewards=np.asarray(r["rewards"], np.float32),
        successes=np.asarray(r["successes"], np.float32) > 0.5,
        terminated=bool(r["terminated"]),
        truncated=bool(r["truncated"]),
        source="imagined",
        generator=json.dumps({**generator, "seed": int(r["seed"])}, sort_keys=True),
    )


@contextmanager
def quiet_ray_progress():
    """Ray Data's own bars off while ours runs (two sets of bars garble the terminal).

    A Dataset copies the DataContext when it is created, so this must wrap the dataset's
    creation, not only its consumption.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = old


def log_summary(report: dict[str, Any]) -> None:
    for level, c in report["per_level"].items():
        top = sorted(((n, r) for r, n in c["reasons"].items() if n), reverse=True)[:3]
        log.info(
            "imagine %-8s accepted %4d/%-4d (%.0f%%), successful %d%s; top rejections: %s",
            level,
            c["accepted"],
            c["requested"],
            100 * c["accepted_fraction"],
            c["successful"],
            f" (doubtful, not kept: {c['doubtful']})" if c.get("doubtful") else "",
            ", ".join(f"{r} {n}" for n, r in top) or "none",
        )
    t = report["throughput"]
    log.info(
        "imagine: %.1f rollouts/s, %.0f tokens/s, %d episodes written",
        t["rollouts_per_s"],
        t["tokens_per_s"],
        t["episodes_written"],
    )
