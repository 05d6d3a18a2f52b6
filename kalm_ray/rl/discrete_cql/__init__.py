"""Discrete-action CQL on RLlib's new API stack (RLlib 2.60 ships CQL for Box actions only).

- :mod:`.loss` — the pure loss (double-DQN TD + conservative logsumexp term);
- :mod:`.module` — ``DiscreteQTorchRLModule``, an MLP Q head with a target copy;
- :mod:`.learner` — ``DiscreteCQLTorchLearner``, the loss plus per-step target updates;
- :mod:`.algorithm` — ``DiscreteCQLConfig`` / ``DiscreteCQL``, the offline training step.
"""

from __future__ import annotations

__all__ = ["DiscreteCQL", "DiscreteCQLConfig"]


def __getattr__(name: str):
    # Lazy: importing the package must not import RLlib (no work at import time).
    if name in __all__:
        from kalm_ray.rl.discrete_cql import algorithm

        return getattr(algorithm, name)
    raise AttributeError(name)
