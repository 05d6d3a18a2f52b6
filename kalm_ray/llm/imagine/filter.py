"""The validity filter: every generated text gets a verdict, never an exception.

A rollout is accepted or rejected with exactly one reason from :data:`REASONS` (checked in
that order, the first failing check names the reason). Accepted rollouts may be repaired in
the ways listed in :data:`REPAIRS` only, and the number of repaired values is returned with
the verdict so the stage can report it. Nothing here trusts the model's output: any
exception raised while decoding is turned into a rejection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

REASONS: dict[str, str] = {
    "empty": "no step at all: no text, or the end token straight away",
    "unparseable": "text outside the codec's language (tokens that are not bins or actions, "
    "broken step grammar, or the decoder failed in any other way)",
    "wrong_step_shape": "a step with the wrong number of state or action values "
    "(e.g. cut off mid-step)",
    "too_long": "more steps than the env's episode limit (imagine.max_steps)",
    "no_end": "the text stops without the end-of-trajectory token (the token budget ran out, "
    "or the model wrote the tokenizer's EOS instead)",
    "non_finite": "a NaN or infinite state or action value",
    "bad_action": "an action outside the action space (a discrete id out of range, or a "
    "continuous value beyond bounds_tolerance)",
    "out_of_bounds": "a state value outside the env's bounds by more than "
    "imagine.bounds_tolerance of the range",
    "impossible_step": "a step no push can make: a value moved beyond where the walls keep "
    "it (layout.reach_low/high), a change larger than the env's physical maximum "
    "(layout.max_step_delta), or objects moving more in total than one step can move them "
    "(layout.max_step_total); each plus step_tolerance and one quantisation bin",
    "overlap": "two objects closer together than any state allows (layout.min_object_gap less "
    "one quantisation bin's diagonal) and than they were at the start: CLEVR balls pushed "
    "into each other",
    "no_progress": "no state value ever moves more than one quantisation bin from the start",
}
"""Rejection reasons, in the order they are checked; the keys are the report's keys."""

REPAIRS: dict[str, str] = {
    "clip_state": "a state value outside the bounds by at most bounds_tolerance of the range "
    "is clipped to the bound",
    "clip_action": "a continuous action value outside the action space by at most "
    "bounds_tolerance of its range is clipped to the bound",
}
"""The only repairs applied to accepted rollouts; each clipped value counts as one repair."""


class RolloutDecoder(Protocol):
    """What the filter needs from a codec (``kalm_ray.llm.codec.Codec`` fulfils it)."""

    def decode_rollout(
        self, start_state: np.ndarray, text: str, *, max_steps: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class FilterLimits:
    """Everything the array checks compare against, per state dimension.

    Attributes:
        low, high: ``(D,)`` state bounds (env units).
        max_step_delta: ``(D,)`` largest physical change per env step (env units).
        quantum: ``(D,)`` one quantisation bin of the codec (env units); the smallest
            change the codec can express, allowed on top of every limit.
        bounds_tolerance: fraction of ``high - low`` a value may overshoot and be clipped.
        step_tolerance: relative slack on ``max_step_delta``.
        n_actions: discrete action count, or None for continuous actions.
        action_low, action_high: ``(A,)`` bounds of continuous actions (None if discrete).
        reach_low, reach_high: ``(D,)`` where a value that moved can end (None = no check
            beyond ``low``/``high``).
        max_step_total: largest summed object displacement per step (None = no check).
        object_dims: dimensions per object for ``max_step_total`` and ``min_object_gap``.
        min_object_gap: smallest distance between two objects in a state (None = no check).
    """

    low: np.ndarray
    high: np.ndarray
    max_step_delta: np.ndarray
    quantum: np.ndarray
    bounds_tolerance: float = 0.02
    step_tolerance: float = 0.1
    n_actions: int | None = None
    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None
    reach_low: np.ndarray | None = None
    reach_high: np.ndarray | None = None
    max_step_total: float | None = None
    object_dims: int = 1
    min_object_gap: float | None = None

    @classmethod
    def for_suite(
        cls,
        suite: Any,
        *,
        n_bins: int,
        bounds_tolerance: float = 0.02,
        step_tolerance: float = 0.1,
    ) -> FilterLimits:
        """Limits of a suite whose codec quantises each state dimension into ``n_bins``."""
        lay = suite.layout
        low = np.asarray(lay.low, np.float64)
        high = np.asarray(lay.high, np.float64)
        space = suite.action_space
        discrete = isinstance(space, gym.spaces.Discrete)
        return cls(
            low=low,
            high=high,
            max_step_delta=np.asarray(lay.max_step_delta, np.float64),
            quantum=(high - low) / n_bins,  # the codec decodes to bin centres
            bounds_tolerance=bounds_tolerance,
            step_tolerance=step_tolerance,
            n_actions=int(space.n) if discrete else None,
            action_low=None if discrete else np.asarray(space.low, np.float64).reshape(-1),
            action_high=None if discrete else np.asarray(space.high, np.float64).reshape(-1),
            reach_low=_optional(getattr(lay, "reach_low", None)),
            reach_high=_optional(getattr(lay, "reach_high", None)),
            max_step_total=getattr(lay, "max_step_total", None),
            object_dims=int(getattr(lay, "object_dims", 1)),
            min_object_gap=getattr(lay, "min_object_gap", None),
        )

    @property
    def dim(self) -> int:
        return len(self.low)


@dataclass(frozen=True)
class Verdict:
    """The filter's decision on one generated text.

    Attributes:
        accepted: whether the rollout may be used.
        reason: one key of :data:`REASONS` when rejected, else None.
        detail: a short human-readable explanation (for the report's examples).
        states: ``(T + 1, D)`` float32 after repairs (None when rejected before decoding).
        actions: ``(T,)`` int64 or ``(T, A)`` float32 (None when rejected before decoding).
        repairs: number of values clipped (0 when rejected).
    """

    accepted: bool
    reason: str | None = None
    detail: str = ""
    states: np.ndarray | None = None
    actions: np.ndarray | None = None
    repairs: int = 0

    @property
    def n_steps(self) -> int:
        return 0 if self.actions is None else len(self.actions)


def _optional(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x, np.float64)


def reject(reason: str, detail: str = "") -> Verdict:
    """A rejection; ``reason`` must be one of :data:`REASONS`."""
    if reason not in REASONS:
        raise ValueError(f"unknown filter reason {reason!r}")
    return Verdict(accepted=False, reason=reason, detail=detail[:300])


def check_text(
    decoder: RolloutDecoder,
    start_state: np.ndarray,
    text: Any,
    *,
    limits: FilterLimits,
    max_steps: int,
) -> Verdict:
    """Decode a generated text and check the rollout; never raises on model output.

    Args:
        decoder: the codec (``decode_rollout(start_state, text, max_steps=...)`` returning
            ``(T + 1, D)`` states and ``T`` actions, raising ``CodecError(reason, detail)``).
        start_state: ``(D,)`` the state the request started from.
        text: what the model generated (anything: None, bytes and NaN are handled).
        limits: bounds and per-step limits of the env.
        max_steps: the episode limit.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return reject("empty", "no text")
    try:
        states, actions = decoder.decode_rollout(
            np.asarray(start_state, np.float32), str(text), max_steps=max_steps
        )
    except Exception as e:  # noqa: BLE001 - model output must never crash the stage
        reason = getattr(e, "reason", None)
        detail = str(getattr(e, "detail", "") or e)
        if reason not in REASONS:
            detail = f"{reason or type(e).__name__}: {detail}"
            reason = "unparseable"
        return reject(reason, detail)
    return check_arrays(start_state, states, actions, limits=limits, max_steps=max_steps)


def check_arrays(
    start_state: np.ndarray,
    states: Any,
    actions: Any,
    *,
    limits: FilterLimits,
    max_steps: int,
) -> Verdict:
    """Check a decoded rollout against the env's limits; repairs by clipping only.

    Args:
        start_state: ``(D,)`` the request's start state (states[0] is replaced by it).
        states: ``(T + 1, D)`` decoded states, env units.
        actions: ``(T,)`` discrete ids or ``(T, A)`` continuous actions.
        limits: see :class:`FilterLimits`.
        max_steps: the episode limit.

    Returns:
        A :class:`Verdict`; accepted ones carry float32 states and int64/float32 actions.
    """
    try:
        states = np.asarray(states, dtype=np.float64)
        actions = np.asarray(actions, dtype=np.float64)
    except (TypeError, ValueError) as e:
        return reject("wrong_step_shape", f"ragged steps ({e})")
    d = limits.dim
    if states.ndim != 2 or states.shape[1] != d:
        return reject("wrong_step_shape", f"states of shape {states.shape}, want (T+1, {d})")
    n = states.shape[0] - 1
    if n <= 0:
        return reject("empty", "no step")
    if n > max_steps:
        return reject("too_long", f"{n} steps > limit {max_steps}")
    discrete = limits.n_actions is not None
    want = (n,) if discrete else (n, len(limits.action_low))  # type: ignore[arg-type]
    if actions.shape != want:
        return reject("wrong_step_shape", f"actions of shape {actions.shape}, want {want}")
    if not (np.isfinite(states).all() and np.isfinite(actions).all()):
        return reject("non_finite", "NaN or inf in the decoded rollout")
    # states[0] becomes the request's start state, so it must be finite too (a NaN start
    # would otherwise pass every comparison below: NaN > x is False).
    start = np.asarray(start_state, np.float64).reshape(-1)
    if start.shape != (d,):
        return reject("wrong_step_shape", f"start state of shape {start.shape}, want ({d},)")
    if not np.isfinite(start).all():
        return reject("non_finite", "NaN or inf in the start state")
    states = states.copy()
    states[0] = start

    repairs = 0
    if discrete:
        if (
            (actions != np.round(actions)).any()
            or (actions < 0).any()
            or (actions >= limits.n_actions).any()
        ):
            return reject("bad_action", f"discrete action outside [0, {limits.n_actions})")
        actions = actions.astype(np.int64)
    else:
        span = limits.action_high - limits.action_low  # type: ignore[operator]
        slack = limits.bounds_tolerance * span
        if (actions < limits.action_low - slack).any() or (
            actions > limits.action_high + slack
        ).any():
            return reject("bad_action", "continuous action beyond the action space")
        clipped = np.clip(actions, limits.action_low, limits.action_high)
        repairs += int((clipped != actions).sum())
        actions = clipped.astype(np.float32)

    body = states[1:]
    slack = limits.bounds_tolerance * (limits.high - limits.low)
    under, over = body < limits.low - slack, body > limits.high + slack
    if under.any() or over.any():
        t, j = np.argwhere(under | over)[0]
        return reject(
            "out_of_bounds",
            f"step {t + 1} dim {j}: {body[t, j]:.4g} outside "
            f"[{limits.low[j]:.4g}, {limits.high[j]:.4g}]",
        )
    clipped = np.clip(body, limits.low, limits.high)
    repairs += int((clipped != body).sum())
    states[1:] = clipped

    allowed = limits.max_step_delta * (1.0 + limits.step_tolerance) + limits.quantum
    steps = np.diff(states, axis=0)
    jumps = np.abs(steps)
    if (jumps > allowed).any():
        t, j = np.argwhere(jumps > allowed)[0]
        return reject(
            "impossible_step",
            f"step {t + 1} dim {j}: moved {jumps[t, j]:.4g} > max {allowed[j]:.4g}",
        )
    if limits.reach_low is not None and limits.reach_high is not None:
        # Only values that moved: a start may sit closer to a wall than a pushed ball can.
        moved = jumps > limits.quantum
        pad = limits.quantum
        outside = moved & ((body < limits.reach_low - pad) | (body > limits.reach_high + pad))
        if outside.any():
            t, j = np.argwhere(outside)[0]
            return reject(
                "impossible_step",
                f"step {t + 1} dim {j}: moved to {body[t, j]:.4g}, where nothing can be pushed "
                f"(reach [{limits.reach_low[j]:.4g}, {limits.reach_high[j]:.4g}])",
            )
    # An object's decoded position may be off by up to one bin in each of its dimensions.
    k = max(1, limits.object_dims)
    diag = math.sqrt(k) * limits.quantum.max()
    if limits.max_step_total is not None:
        per_object = np.linalg.norm(steps.reshape(n, -1, k), axis=-1)
        total = np.where(per_object > 0, per_object - diag, 0.0)
        total = np.clip(total, 0.0, None).sum(axis=1)
        cap = limits.max_step_total * (1.0 + limits.step_tolerance)
        if (total > cap).any():
            t = int(np.argmax(total > cap))
            return reject(
                "impossible_step",
                f"step {t + 1}: objects moved {total[t]:.3g} in all > max {cap:.3g}",
            )
    if limits.min_object_gap is not None:
        gaps, (i, j) = object_gaps(states, k)
        # A pair the request's start already had that close is the start's doing, not the
        # model's.
        floor = limits.min_object_gap - diag
        close = (gaps[1:] < floor) & (gaps[1:] < gaps[0] - diag)
        if close.any():
            t, p = np.argwhere(close)[0]
            return reject(
                "overlap",
                f"step {t + 1}: objects {i[p]} and {j[p]} {gaps[t + 1, p]:.3g} apart "
                f"< min {floor:.3g}",
            )
    if (np.abs(states[1:] - states[0]) <= limits.quantum).all():
        return reject("no_progress", "no value moved more than one bin from the start")
    return Verdict(
        accepted=True, states=states.astype(np.float32), actions=actions, repairs=repairs
    )


def physical_rejection(states: Any, actions: Any, limits: FilterLimits) -> str | None:
    """Why the filter rejects a rollout's steps so far (None: they pass), from ``states[0]``.

    ``no_progress`` is not a reason here: it judges a finished rollout, a later step may still
    move something, and one real push may move nothing (a ball against a wall). Used by the
    stepwise imaginer to stop a candidate at its first rejected step, and to score a world
    model's single steps from real states (:func:`kalm_ray.llm.ground.metrics.dynamics_metrics`).
    """
    v = check_arrays(states[0], states, actions, limits=limits, max_steps=len(actions))
    return None if v.accepted or v.reason == "no_progress" else v.reason


def object_gaps(
    states: np.ndarray, object_dims: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Distance between every two objects of each state: ``(T, P)`` for ``(T, D)`` states whose
    objects are ``object_dims`` consecutive dimensions each, with the ``(i, j)`` object indices
    of the ``P`` pairs (``i < j``)."""
    pos = np.asarray(states).reshape(len(states), -1, object_dims)
    i, j = np.triu_indices(pos.shape[1], 1)
    return np.linalg.norm(pos[:, i] - pos[:, j], axis=-1), (i, j)


def _zero_reasons() -> dict[str, int]:
    return {r: 0 for r in REASONS}


@dataclass
class FilterTally:
    """Counts for ``filter_report.json``: per level, per (level, task), per reason.

    ``examples`` keeps a few rejected texts per reason, so a reader sees what the model wrote
    rather than just a number: the first few in (task, text) order, not in arrival order, so
    the report does not depend on the order Ray delivers batches (a resumed run equals an
    uninterrupted one).
    """

    max_examples: int = 3
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {
            "requested": 0,
            "accepted": 0,
            "successful": 0,
            "doubtful": 0,
            "kept": 0,
            "repaired_rollouts": 0,
            "repaired_values": 0,
            "generated_tokens": 0,
            "reasons": _zero_reasons(),
        }

    def add(
        self,
        *,
        level: str,
        task: str,
        accepted: bool,
        reason: str | None,
        repairs: int,
        success: bool,
        kept: bool,
        tokens: int,
        text: str = "",
        detail: str = "",
        doubtful: bool = False,
    ) -> None:
        """Count one rollout (``doubtful``: accepted, its success did not hold up)."""
        for c in (
            self.levels.setdefault(level, self._empty()),
            self.tasks.setdefault(level, {}).setdefault(task, self._empty()),
        ):
            c["requested"] += 1
            c["generated_tokens"] += int(tokens)
            if accepted:
                c["accepted"] += 1
                c["successful"] += int(success)
                c["doubtful"] += int(doubtful)
                c["kept"] += int(kept)
                c["repaired_rollouts"] += int(repairs > 0)
                c["repaired_values"] += int(repairs)
            else:
                c["reasons"][reason] = c["reasons"].get(reason, 0) + 1
        if not accepted:
            ex = self.examples.setdefault(reason or "", [])
            ex.append({"task": task, "detail": detail, "text": text[:500]})
            ex.sort(key=lambda e: (e["task"], e["text"], e["detail"]))
            del ex[self.max_examples :]

    def report(self) -> dict[str, Any]:
        """The JSON-ready report (without throughput, which the stage adds)."""
        total = self._empty()
        for c in self.levels.values():
            for k in (
                "requested",
                "accepted",
                "successful",
                "doubtful",
                "kept",
                "repaired_rollouts",
                "repaired_values",
                "generated_tokens",
            ):
                total[k] += c[k]
            for r, n in c["reasons"].items():
                total["reasons"][r] = total["reasons"].get(r, 0) + n

        def frac(c: dict[str, Any]) -> dict[str, Any]:
            return {
                **c,
                "accepted_fraction": c["accepted"] / c["requested"] if c["requested"] else 0.0,
            }

        return {
            **frac(total),
            "per_level": {lv: frac(c) for lv, c in self.levels.items()},
            "per_task": {lv: {t: frac(c) for t, c in ts.items()} for lv, ts in self.tasks.items()},
            "reason_docs": dict(REASONS),
            "repair_docs": dict(REPAIRS),
            "examples": {r: ex for r, ex in self.examples.items() if ex},
        }
