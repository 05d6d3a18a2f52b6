"""The CQL learner: RLlib's CQL loss, one backward pass, target critics moved every step."""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.cql.torch.cql_torch_learner import CQLTorchLearner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, ParamDict, TensorType

from kalm_ray.rl.learners import apply_gradients_checked, use_fused_adam


class KalmCQLTorchLearner(CQLTorchLearner):
    """CQL learner: stock loss, one backward pass, target critics moved every step."""

    @override(CQLTorchLearner)
    def compute_gradients(self, loss_per_module: dict[ModuleID, TensorType], **kwargs) -> ParamDict:
        for optim in self._optimizer_parameters:
            optim.zero_grad(set_to_none=True)
        losses = [self._temp_losses.pop(k) for k in list(self._temp_losses)]
        torch.stack(losses).sum().backward()
        return {pid: p.grad for pid, p in self._params.items() if p.grad is not None}

    @override(CQLTorchLearner)
    def build(self) -> None:
        super().build()
        use_fused_adam(self)

    @override(CQLTorchLearner)
    def apply_gradients(self, gradients_dict: ParamDict) -> None:
        if not apply_gradients_checked(self, gradients_dict):
            return
        # NOTE: see the package docstring: stock CQL moves targets once per update() call.
        for mid in self.module.keys():
            module = self.module[mid].unwrapped()
            tau = self.config.get_config_for_module(mid).tau
            with torch.no_grad():
                for main, target in module.get_target_network_pairs():
                    torch._foreach_lerp_(list(target.parameters()), list(main.parameters()), tau)

    @override(CQLTorchLearner)
    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        # Skip DQNLearner's once-per-update() target sync (done per step above); keep the
        # learning-rate bookkeeping of the base Learner.
        from ray.rllib.core.learner.torch.torch_learner import TorchLearner

        TorchLearner.after_gradient_based_update(self, timesteps=timesteps)
