"""Imagined rollouts checked against the simulator: a hallucination diagnostic, nothing more.

For an accepted imagined rollout, its actions are replayed from its start state in the real
environment, and the two state sequences are compared: did the imagined rollout succeed,
did the replay, does the replay confirm an imagined success, and how far apart are the
states step by step. The KALM paper reports how often imagined trajectories break physics;
this is our measure of it.

The simulator never creates, labels or selects imagined data: the imagine stage decides
what it keeps before a rollout is replayed, and writes only the imagined states. A replay
starts from the imagined rollout's own start state: an env that can be placed at a given
state (``set_state``: CLEVR-Robot) is placed there; any other (Meta-World, whose slot state
does not hold every joint) is reset with the request's seed, which is how
``imagine.start_states: reset`` made that start, and the replay is used only when the reset
gives back that very start (otherwise it is counted as ``not_replayable``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def state_error(imagined: np.ndarray, replayed: np.ndarray) -> float:
    """Mean absolute difference (env units) over the steps after the start and every dimension.

    Args:
        imagined, replayed: ``(T + 1, D)`` states; row 0 (the shared start) is ignored.
    """
    a = np.asarray(imagined, np.float64)
    b = np.asarray(replayed, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"state_error needs equal (T+1, D) shapes, got {a.shape}, {b.shape}")
    if len(a) < 2:
        return 0.0
    return float(np.abs(a[1:] - b[1:]).mean())


def can_place_start(suite: Any) -> bool:
    """Whether the suite's env can be reset to a given state (``set_state``: CLEVR-Robot)."""
    probe = suite.make_env("train")
    try:
        return hasattr(probe.unwrapped, "set_state")
    finally:
        probe.close()


class Replayer:
    """Replays action sequences in the suite's real env, placed at a given start state."""

    def __init__(self, suite: Any):
        self.suite = suite
        self._envs: dict[str, Any] = {}
        # Without set_state a replay needs a start made by env.reset(seed) (see the module doc).
        self.placeable = can_place_start(suite)

    def replay(
        self,
        *,
        level: str,
        task: str,
        start: np.ndarray,
        actions: np.ndarray,
        seed: int | None = None,
    ) -> tuple[np.ndarray, bool] | None:
        """``(states (T+1, D), success)`` of ``actions`` from ``start`` in the simulator, or
        None when the env cannot be brought to ``start`` (no ``set_state``, and resetting
        with ``seed`` gives another state).

        Every action is applied even after the goal holds (the imagined rollout decides its
        length); ``success`` is the env's own (``info["success"]``; composite tasks in stage
        order) at any step, like an episode's.
        """
        env = self._envs.get(level)
        if env is None:
            env = self._envs[level] = self.suite.make_env(level, max_episode_steps=10_000)
        start = np.asarray(start, np.float32).reshape(-1)
        if self.placeable:
            s, _ = env.reset(options={"task": task, "state": start.astype(np.float64)})
        elif seed is None:
            return None
        else:
            s, _ = env.reset(seed=int(seed), options={"task": task})
            if not np.allclose(np.asarray(s, np.float32), start, rtol=0.0, atol=1e-6):
                return None
        states, ok = [np.asarray(s, np.float32)], False
        for a in actions:
            act = int(a) if np.ndim(a) == 0 else np.asarray(a, np.float32)
            s, _, _, _, info = env.step(act)
            states.append(np.asarray(s, np.float32))
            ok |= bool(info.get("success", False))
        return np.stack(states), ok

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


@dataclass
class ReplayTally:
    """Per-level counts of the replay check, for ``filter_report.json["replay"]``."""

    max_samples: int = 6
    levels: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    not_replayable: dict[str, int] = field(default_factory=dict)
    """Per level: accepted rollouts the env could not be brought to the start of."""

    def skip(self, level: str) -> None:
        """Count a rollout whose start the env cannot reproduce."""
        self.not_replayable[level] = self.not_replayable.get(level, 0) + 1

    def add(
        self,
        *,
        level: str,
        task: str,
        instruction: str,
        imagined: np.ndarray,
        replayed: np.ndarray,
        imagined_success: bool,
        replayed_success: bool,
        doubtful: bool = False,
    ) -> None:
        c = self.levels.setdefault(
            level,
            {
                "rollouts": 0,
                "imagined_success": 0,
                "replayed_success": 0,
                "confirmed": 0,
                "errors": [],
            },
        )
        if doubtful:
            # A success that did not hold up under the consistency draws: not in the data, so
            # counted apart; how often the replay confirms these says what the check removes.
            d = c.setdefault("doubtful", [0, 0])
            d[0] += 1
            d[1] += int(replayed_success)
            return
        c["rollouts"] += 1
        c["imagined_success"] += int(imagined_success)
        c["replayed_success"] += int(replayed_success)
        c["confirmed"] += int(imagined_success and replayed_success)
        c["errors"].append(state_error(imagined, replayed))
        if imagined_success:
            # By imagined length: the world model's errors compound step by step, so how
            # agreement falls with length says how far its rollouts can be trusted.
            k = c.setdefault("by_steps", {}).setdefault(len(imagined) - 1, [0, 0])
            k[0] += 1
            k[1] += int(replayed_success)
        # A few of each level for the report's side-by-side plot: the first in (task,
        # instruction, states) order, not arrival order, so a resumed run reports the same.
        self.samples.append(
            {
                "level": level,
                "task": task,
                "instruction": instruction,
                "imagined": np.asarray(imagined, np.float32).tolist(),
                "replayed": np.asarray(replayed, np.float32).tolist(),
            }
        )
        self.samples.sort(key=lambda s: (s["level"], s["task"], s["instruction"], s["imagined"]))
        mine = [i for i, s in enumerate(self.samples) if s["level"] == level]
        for i in reversed(mine[max(1, self.max_samples // 3) :]):
            del self.samples[i]

    def report(self) -> dict[str, Any]:
        per_level = {}
        for lv, c in self.levels.items():
            n = c["rollouts"]
            per_level[lv] = {
                "rollouts": int(n),
                "imagined_success_rate": c["imagined_success"] / n if n else 0.0,
                "replayed_success_rate": c["replayed_success"] / n if n else 0.0,
                # Of the imagined successes, the fraction the simulator confirms.
                "agreement": c["confirmed"] / c["imagined_success"]
                if c["imagined_success"]
                else None,
                # fsum: exact, so the mean does not depend on the order rollouts arrived in
                "mean_state_error": math.fsum(c["errors"]) / n if n else 0.0,
                # steps -> imagined successes of that length, and how many replays confirm
                "agreement_by_steps": {
                    str(t): {"imagined_successes": a, "confirmed": b}
                    for t, (a, b) in sorted(c.get("by_steps", {}).items())
                },
            }
            if "doubtful" in c:  # imagine.consistency_draws: the successes it kept out
                a, b = c["doubtful"]
                per_level[lv]["doubtful"] = {"imagined_successes": a, "confirmed": b}
        return {
            "available": True,
            "per_level": per_level,
            "not_replayable": dict(self.not_replayable),
            "samples": self.samples,
            "note": "diagnostic only: replays never create, label or select imagined data",
        }
