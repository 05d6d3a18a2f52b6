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
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from kalm_ray.artifacts import RunDir
from kalm_ray.errors import InputError

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


def _local_copy(policy_dir: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local folder with the policy's files (downloaded when ``policy_dir`` is a URI)."""
    src = RunDir(policy_dir)
    if src.is_local:
        return src.root, None
    tmp = tempfile.TemporaryDirectory(prefix="kalm-policy-")
    for name in (POLICY_INFO, MODULE_DIR):
        if src.fs.get_file_info(src.path(name)).type == pafs.FileType.Directory:
            pafs.copy_files(
                src.path(name),
                os.path.join(tmp.name, name),
                source_filesystem=src.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        else:
            with open(os.path.join(tmp.name, name), "wb") as f:
                f.write(src.read_bytes(name))
    return tmp.name, tmp


def load_policy(policy_dir: str) -> Policy:
    """Load ``policy_dir`` (local path or URI) as a :class:`Policy`; InputError if incomplete."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    run = RunDir(policy_dir)
    for name in (POLICY_INFO, MODULE_DIR):
        if not run.exists(name):
            raise InputError(
                f"{run.uri_of(name)}: missing; not a trained policy folder (run `kalm train`)"
            )
    local, tmp = _local_copy(policy_dir)
    try:
        with open(os.path.join(local, POLICY_INFO)) as f:
            info = json.load(f)
        module = RLModule.from_checkpoint(os.path.join(local, MODULE_DIR))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return Policy(module, info)
