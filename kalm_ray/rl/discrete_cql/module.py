"""An RLModule with one Q head over a discrete action space (and a target copy for learning).

Inference returns the Q values as ``ACTION_DIST_INPUTS``: RLlib's categorical distribution
over them samples Boltzmann-style, and its deterministic form is ``argmax_a Q(s, a)``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import QNetAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from kalm_ray.rl.common import mlp

QF_PREDS = "qf_preds"
QF_NEXT_PREDS = "qf_next_preds"
QF_TARGET_NEXT_PREDS = "qf_target_next_preds"


def _model_config_get(model_config: Any, key: str, default: Any) -> Any:
    if isinstance(model_config, dict):
        return model_config.get(key, default)
    return getattr(model_config, key, default)


class DiscreteQTorchRLModule(TorchRLModule, QNetAPI, TargetNetworkAPI):
    """``Q(s, .)``: an MLP from the flat observation to one value per action.

    ``model_config`` keys: ``fcnet_hiddens`` (default ``[256, 256]``), ``fcnet_activation``
    (``relu``).
    """

    @override(RLModule)
    def setup(self) -> None:
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(
                f"DiscreteQTorchRLModule needs a Discrete action space, got {self.action_space}"
            )
        hidden = list(_model_config_get(self.model_config, "fcnet_hiddens", [256, 256]))
        act = _model_config_get(self.model_config, "fcnet_activation", "relu")
        obs_dim = int(self.observation_space.shape[0])
        self.qf = mlp(obs_dim, hidden, int(self.action_space.n), act)
        self.target_qf: nn.Module | None = None

    @override(RLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.qf(batch[Columns.OBS])}

    @override(RLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        q = self.qf(obs)
        # The next-state passes need no graph: one pass over [obs; next_obs] with grad (as
        # before issue 18) ran the backward over 2B rows, half of them zero gradient.
        with torch.no_grad():
            q_next = self.qf(next_obs)
            q_target_next = self.target_qf(next_obs)
        return {
            Columns.ACTION_DIST_INPUTS: q,
            QF_PREDS: q,
            QF_NEXT_PREDS: q_next,
            QF_TARGET_NEXT_PREDS: q_target_next,
        }

    @override(QNetAPI)
    def compute_q_values(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {QF_PREDS: self.qf(batch[Columns.OBS])}

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self.target_qf = make_target_network(self.qf)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.qf, self.target_qf)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {QF_TARGET_NEXT_PREDS: self.target_qf(batch[Columns.OBS])}
