"""Progress from Ray workers to the driver's progress bar (one Ray role).

Ray Train's loop (ground) and the training units (train) run in worker processes whose
output the driver does not show (see :mod:`kalm_ray.raysetup`), and the driver blocks until
they end. So the driver starts a small named :class:`ProgressBoard` actor, the workers post
their step to it (:class:`ProgressPoster`, fire-and-forget, at most every
``min_interval_s``), and a driver thread polls the board into a tqdm bar
(:func:`show_progress`). Several workers at once (training units) post under their own
``source``; the bar shows the sum of their steps. Progress is best effort: a board that is
gone or unreachable never fails the work.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("kalm_ray")


class ProgressBoard:
    """Holds the latest progress report (a plain dict: ``step``, ``total``, ``loss``, ...).

    A report with a ``source`` (one of several workers) counts that source's own ``step``;
    :meth:`latest` then reports the sum over the sources.
    """

    def __init__(self) -> None:
        self._latest: dict[str, Any] = {}
        self._steps: dict[str, float] = {}

    def post(self, report: dict[str, Any]) -> None:
        # Reports can arrive out of order (fire-and-forget calls); keep the furthest step.
        source = report.get("source")
        if source is not None:
            self._steps[source] = max(self._steps.get(source, 0), float(report.get("step", 0)))
            self._latest = {**report, "step": sum(self._steps.values())}
        elif float(report.get("step", 0)) >= float(self._latest.get("step", -1)):
            self._latest = dict(report)

    def latest(self) -> dict[str, Any]:
        return dict(self._latest)


class ProgressPoster:
    """Worker side: posts to the named board, at most once every ``min_interval_s``.

    ``name=None`` (no board, e.g. the loop runs outside Ray) makes every call a no-op.
    """

    def __init__(self, name: str | None, *, min_interval_s: float = 0.5):
        self._name = name
        self._board: Any = None
        self._last = 0.0
        self._min_interval_s = min_interval_s

    def __call__(self, report: dict[str, Any], *, force: bool = False) -> None:
        if self._name is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self._min_interval_s:
            return
        try:
            import ray

            if self._board is None:
                self._board = ray.get_actor(self._name)
            self._board.post.remote(report)
            self._last = now
        except Exception as e:  # noqa: BLE001 - progress must never stop training
            log.debug("progress board %s unavailable (%s); progress off", self._name, e)
            self._name = None


@contextmanager
def show_progress(
    desc: str, *, total: int, unit: str = "step", poll_s: float = 1.0
) -> Iterator[str]:
    """Driver side: start a board, yield its actor name, show its reports as a tqdm bar.

    The bar follows ``report["step"]`` (a resumed run starts where it left off) and shows
    ``loss``, ``tok/s`` and ``heldout`` when reported. The board is killed on exit.
    """
    import ray
    from tqdm.auto import tqdm

    name = f"kalm-progress-{uuid.uuid4().hex[:12]}"
    board = ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).options(name=name).remote()
    stop = threading.Event()
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,
    )

    def update(report: dict[str, Any]) -> None:
        step = int(report.get("step", 0))
        if step > bar.n:
            bar.update(step - bar.n)
        post = {k: f"{report[k]:.4g}" for k in ("loss",) if report.get(k) is not None}
        if report.get("tokens_per_s"):
            post["tok/s"] = f"{report['tokens_per_s']:.0f}"
        if report.get("heldout"):  # the last held-out score (ground.score_every), a phrase
            post["held-out NLL"] = report["heldout"]
        if post:
            bar.set_postfix(post, refresh=False)

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                update(ray.get(board.latest.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - a slow or dead board only freezes the bar
                continue

    thread = threading.Thread(target=poll, name="kalm-progress", daemon=True)
    thread.start()
    try:
        yield name
        try:  # the last report, so a finished run ends at 100%
            update(ray.get(board.latest.remote(), timeout=10))
        except Exception:  # noqa: BLE001
            pass
    finally:
        stop.set()
        thread.join(timeout=5)
        bar.close()
        ray.kill(board, no_restart=True)
