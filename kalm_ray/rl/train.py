"""Machinery of the ``train`` stage (:mod:`kalm_ray.stages.train`): the units a stopped run
finished (:func:`finished_units`), the one-after-another loop in the driver
(:func:`train_in_driver`, ``train.max_concurrent_units: 1``), and the stage's error
(:class:`UnitFailed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from kalm_ray.artifacts import RunDir, Staging
from kalm_ray.config import TrainConfig
from kalm_ray.errors import InputError, KalmError
from kalm_ray.rl.dataset import MixInfo
from kalm_ray.rl.policy import CHECKPOINT_DIR, MODULE_DIR, POLICY_INFO
from kalm_ray.rl.quick_eval import QuickEvalSpec
from kalm_ray.rl.unit import Unit, train_unit
from kalm_ray.stage import OUTPUT_DIRS

log = logging.getLogger("kalm_ray")

DATA_DIR = "_data"
SUMMARY = "summary.json"


class UnitFailed(KalmError):
    """One or more training units raised; the finished ones stay staged for the rerun."""

    exit_code = 1


def asked_wordings(run: RunDir, suite: Any) -> set[str] | None:
    """The novel wordings the imagine stage gave the LLM, from the config it ran under
    (``data/imagined/config.yaml``: the data may have been made under other settings than
    this config's). None when there is none: then only the wordings the imagined data carry
    are copy targets, a subset of these.

    Only the four keys the requests depend on are read, with today's defaults, so a config
    saved by an older version (other keys, other bounds) still says what was asked.

    Raises:
        InputError: the file does not hold them readably.
    """
    import yaml

    from kalm_ray.config import ImagineConfig
    from kalm_ray.llm.imagine.requests import level_wordings

    where = ("data", "imagined", "config.yaml")
    if not run.exists(*where):
        return None
    try:
        made = yaml.safe_load(run.read_bytes(*where))
        im = made.get("imagine") or {}
        defaults = ImagineConfig()
        levels = [str(v) for v in im.get("levels", defaults.levels)]
        per_level = int(im.get("rollouts_per_level", defaults.rollouts_per_level))
        max_tasks = im.get("max_tasks_per_level", defaults.max_tasks_per_level)
        seed = int(made.get("seed", 0))
        pairs = [
            p
            for level in levels
            for p in level_wordings(
                suite,
                level,
                rollouts_per_level=per_level,
                max_tasks_per_level=None if max_tasks is None else int(max_tasks),
                seed=seed,
            )
        ]
    except (yaml.YAMLError, AttributeError, TypeError, ValueError, KeyError) as e:
        raise InputError(
            f"{run.uri_of(*where)}: cannot tell which wordings imagination was given "
            f"({type(e).__name__}: {e})"
        ) from None
    return {text for _, text in pairs}


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of a unit's exception."""
    msg = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def finished_units(run: RunDir, out: str, units: list[Unit]) -> dict[str, dict[str, Any]]:
    """``name -> summary`` of the units a stopped run finished in the staging folder ``out``
    (marked, ``policy_info.json`` unchanged since, module and checkpoint present)."""
    done = {}
    for u in units:
        res = Staging(run, f"{out}/{u.name}").finished().get(POLICY_INFO)
        if res is not None and all(
            run.exists(out, u.name, d) for d in (MODULE_DIR, CHECKPOINT_DIR)
        ):
            done[u.name] = res
    return done


def train_in_driver(
    units: list[Unit],
    *,
    train: TrainConfig,
    run: RunDir,
    out_dir: str,
    mixes: dict[str, MixInfo],
    action_space: Any,
    info: dict[str, Any],
    embeddings: dict[str, Any],
    quick: QuickEvalSpec | None,
    master_seed: int,
    progress: str | None = None,
) -> Iterator[tuple[Unit, dict[str, Any] | BaseException]]:
    """``max_concurrent_units: 1``: the units one after another in this process, each
    yielded with its summary or its exception (as :meth:`UnitPool.imap_unordered` does)."""
    from kalm_ray.progress import ProgressPoster

    quick_eval = quick.build(embeddings) if quick is not None else None
    poster = ProgressPoster(progress)
    try:
        for unit in units:
            try:
                res: dict[str, Any] | BaseException = train_unit(
                    unit,
                    train=train,
                    run=run,
                    out_dir=out_dir,
                    mix=mixes[unit.data],
                    action_space=action_space,
                    info=info,
                    quick_eval=quick_eval,
                    master_seed=master_seed,
                    progress=poster,
                )
            except Exception as e:  # noqa: BLE001 - a unit's failure is reported, not raised
                log.debug("train %s failed", unit.name, exc_info=True)
                res = e
            yield unit, res
    finally:
        if quick_eval is not None:
            quick_eval.close()


def encoder_name(run: RunDir, fallback: str) -> str:
    """The instruction encoder recorded by the collect stage (``fallback`` if not recorded)."""
    m = run.manifest(OUTPUT_DIRS["collect"])
    return str((m.counts.get("encoder") if m else None) or fallback)
