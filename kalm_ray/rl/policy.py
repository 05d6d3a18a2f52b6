"""Trained policies as evaluation sees them: an exported RLModule plus ``policy_info.json``.

A policy folder (``policy/<algo>-<data>-seed<k>/``) holds ``module/`` (an RLModule saved with
``save_to_path``; it loads with ``RLModule.from_checkpoint`` and needs no Algorithm),
``policy_info.json``, the full RLlib checkpoint ``checkpoint/`` and ``curve.csv``.
:func:`load_policy` returns a :class:`Policy` whose ``act`` is deterministic: the argmax of
the logits (BC/MARWIL) or of Q (discrete CQL), the Gaussian mean (continuous BC), or the
squashed mean (CQL/IQL).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kalm_ray.artifacts import RunDir
from kalm_ray.errors import InputError
from kalm_ray.localcopy import local_copy

POLICY_INFO = "policy_info.json"
MODULE_DIR = "module"
CHECKPOINT_DIR = "checkpoint"
CURVE_FILE = "curve.csv"
INFO_KEYS: tuple[str, ...] = (
    "algo",
    "data",
    "seed",
    "env",
    "obs_dim",
    "state_dim",
    "emb_dim",
    "encoder",
)


class Policy:
    """A loaded policy: ``act(obs)`` for a batch of observations (see :func:`make_obs`)."""

    def __init__(self, module: Any, info: dict[str, Any]):
        import gymnasium as gym
        import torch

        self.module = module.eval() if hasattr(module, "eval") else module
        self.info = dict(info)
        self.discrete = isinstance(module.action_space, gym.spaces.Discrete)
        self._torch = torch
        self._dist_cls = module.get_inference_action_dist_cls()

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic actions for ``(B, obs_dim)`` float32 observations.

        Returns ``(B,)`` int64 (discrete) or ``(B, act_dim)`` float32 within the action bounds.
        """
        from ray.rllib.core.columns import Columns
        from ray.rllib.core.distribution.torch.torch_distribution import TorchSquashedGaussian

        torch = self._torch
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != self.info["obs_dim"]:
            raise ValueError(
                f"Policy.act: expected (B, {self.info['obs_dim']}) observations, got {obs.shape}"
            )
        with torch.no_grad():
            out = self.module.forward_inference({Columns.OBS: torch.from_numpy(obs)})
            logits = out[Columns.ACTION_DIST_INPUTS]
            if self.discrete:
                return logits.argmax(dim=-1).cpu().numpy().astype(np.int64)
            dist = self._dist_cls.from_logits(logits)
            if isinstance(dist, TorchSquashedGaussian):
                # NOTE: RLlib's TorchSquashedGaussian.to_deterministic() returns the *unsquashed*
                # mean; the action the policy means is the squashed one.
                act = dist._squash(dist.loc)
            else:
                act = dist.to_deterministic().sample()
        space = self.module.action_space
        return np.clip(act.cpu().numpy().astype(np.float32), space.low, space.high)


def load_policy(policy_dir: str) -> Policy:
    """Load ``policy_dir`` (local path or URI) as a :class:`Policy`; InputError if incomplete."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    run = RunDir(policy_dir)
    for name in (POLICY_INFO, MODULE_DIR):
        if not run.exists(name):
            raise InputError(
                f"{run.uri_of(name)}: missing; not a trained policy folder (run `kalm train`)"
            )
    # Downloaded (and cached per content) when the policy is on an object store: one
    # mechanism for every worker-side read of the run dir (kalm_ray.localcopy). Its own
    # copy_files of the module folder failed on S3, whose listings name no top folder.
    with open(local_copy(run.uri_of(POLICY_INFO))) as f:
        info = json.load(f)
    module = RLModule.from_checkpoint(local_copy(run.uri_of(MODULE_DIR)))
    return Policy(module, info)
