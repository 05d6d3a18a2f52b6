"""The behaviour policy that collects CLEVR-Robot data: greedy one-push lookahead.

For each of the 40 pushes it replays the push on a scratch copy of the simulator (the
env's full physics state, velocities and solver warm start included, so the prediction is
exactly what the env will do) and picks the push that most reduces the goal's distance
term (:func:`kalm_ray.envs.clevr.tasks.distance`). Ties (e.g. several pushes that reach
the goal) are broken at random; when no push makes progress it pushes at random, which
is how it gets out of spots where one push cannot help. With probability ``epsilon`` it
pushes at random anyway. Deterministic given its ``rng``.

Cost: 40 simulated pushes per action (~40 ms on one core).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from kalm_ray.envs.clevr.sim import N_ACTIONS, PushSim
from kalm_ray.envs.clevr.tasks import distance, parse_task

MIN_PROGRESS = 1e-4
"""A push must shorten the distance term by more than this (m) to count as progress."""
TIE = 1e-9


class ScriptedPolicy:
    """Greedy lookahead pusher for one task.

    Args:
        task: the goal (any CLEVR task id).
        epsilon: probability of a uniformly random push.
        rng: the only source of randomness.
    """

    def __init__(self, task: str, epsilon: float = 0.0, rng: np.random.Generator | None = None):
        parse_task(task)  # fail early on a bad id
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.task = task
        self.epsilon = float(epsilon)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._scratch: PushSim | None = None
        self.lookahead: np.ndarray | None = None
        """``(40, 10)`` float32: the state after each push from the state of the last
        :meth:`act`, as simulated to choose it; None when that push was an epsilon one."""

    def _sim(self, model=None) -> PushSim:
        if self._scratch is None or (model is not None and self._scratch.model is not model):
            self._scratch = PushSim(model)
        return self._scratch

    def act(self, env_or_state: gym.Env | np.ndarray, *, start: np.ndarray | None = None) -> int:
        """The push to make now.

        Args:
            env_or_state: a CLEVR env (possibly wrapped; its exact physics state is used)
                or a state (10,) (balls placed at rest, as after ``reset``).
            start: the episode's first state; read only by ``move`` goals. Taken from the
                env when one is given; defaults to the state itself otherwise.
        """
        self.lookahead = None
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(N_ACTIONS))
        if isinstance(env_or_state, gym.Env):
            env = env_or_state.unwrapped
            sim = self._sim(env.sim.model)
            snapshot = env.sim.snapshot()
            start = env.start if start is None else start
            sim.restore(snapshot)
        else:
            sim = self._sim()
            sim.set_state(np.asarray(env_or_state, dtype=np.float64))
            snapshot = sim.snapshot()
        now = sim.get_state().astype(np.float32)
        start = now if start is None else np.asarray(start)
        current = distance(self.task, start, now)
        scores = np.empty(N_ACTIONS)
        after = np.empty((N_ACTIONS, len(now)), np.float32)
        for action in range(N_ACTIONS):
            sim.restore(snapshot)
            sim.push(action)
            # float32, as the env observes: the predicate sees what the env will see.
            after[action] = sim.get_state().astype(np.float32)
            scores[action] = distance(self.task, start, after[action])
        self.lookahead = after
        best = scores.min()
        if best > current - MIN_PROGRESS:
            return int(self.rng.integers(N_ACTIONS))
        return int(self.rng.choice(np.flatnonzero(scores <= best + TIE)))
