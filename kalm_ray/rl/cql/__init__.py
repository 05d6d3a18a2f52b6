"""Continuous CQL: RLlib 2.60's CQL with a leaner module and learner (same loss).

- :mod:`.module` — ``KalmCQLTorchRLModule``, MLP actor/critics, batched repeated-action Qs;
- :mod:`.learner` — ``KalmCQLTorchLearner``, RLlib's CQL loss, one backward pass, targets
  moved every step;
- :mod:`.algorithm` — ``KalmCQLConfig`` / ``KalmCQL``, no env runner, the offline training
  step of :mod:`kalm_ray.rl.common`.

What differs from stock ``CQLConfig`` and why:

- **Networks** are plain MLPs of ``fcnet_hiddens`` (ReLU): the policy ``obs -> hidden -> 2A``
  and each critic ``[obs, action] -> hidden -> 1`` (the usual CQL/d3rlpy shape; RLlib's SAC
  catalog builds separate obs/action streams plus a fusion net instead).
- **The CQL term's Q evaluations** (``num_actions`` random, current-policy and next-policy
  actions per state) reuse one policy pass per state (stock RLlib re-runs the policy on each
  repeated observation) and one first-layer pass per state: the critic's first layer is split
  as ``W [s; a] = W_s s + W_a a``, so ``W_s s`` is computed once for all sampled actions.
  The numbers are the same as evaluating the concatenated input.
- **Next-policy actions are scored at s**, ``Q(s, a' ~ pi(s'))``, as in the CQL authors' code
  and d3rlpy; stock RLlib 2.60 scores them at ``s'``.
- **One backward pass** for actor, critics and temperature: their parameter sets are disjoint
  and every cross term is already cut (frozen critics in the actor term, detached actions and
  log-probs in the critic term), so the summed loss gives each optimizer the same gradients
  as stock RLlib's one ``backward(retain_graph=True)`` per optimizer.
- **Fused Adam and one finiteness check per step** (:mod:`kalm_ray.rl.learners`).
- **Target critics move after every optimizer step** (Polyak ``tau``). Stock RLlib moves them
  in ``after_gradient_based_update``, once per ``update()`` call, i.e. once per iteration of
  ``dataset_num_iters_per_learner`` steps when learning from a data iterator.
- **No environment**: ``_is_online=False`` (stock CQL inherits SAC's online flag and builds an
  env runner), and the training step always iterates (stock CQL passes a single batch with a
  local learner and ``dataset_num_iters_per_learner=1`` and then fails).
"""

from __future__ import annotations

__all__ = ["KalmCQL", "KalmCQLConfig", "KalmCQLTorchLearner", "KalmCQLTorchRLModule"]
_WHERE = {
    "KalmCQL": "algorithm",
    "KalmCQLConfig": "algorithm",
    "KalmCQLTorchLearner": "learner",
    "KalmCQLTorchRLModule": "module",
}


def __getattr__(name: str):
    # Lazy: importing the package must not import RLlib (no work at import time). Also keeps
    # ``kalm_ray.rl.cql.<Name>``, the path of the single-file version, resolvable.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"kalm_ray.rl.cql.{_WHERE[name]}"), name)
    raise AttributeError(name)
