"""The discrete-CQL Learner: double-DQN TD loss + the conservative term, one (fused) Adam
optimizer, and a Polyak-averaged target network moved after every optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import QNetAPI, TargetNetworkAPI
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, ParamDict, TensorType

from kalm_ray.rl.discrete_cql.loss import discrete_cql_loss
from kalm_ray.rl.discrete_cql.module import QF_NEXT_PREDS, QF_PREDS, QF_TARGET_NEXT_PREDS
from kalm_ray.rl.learners import apply_gradients_checked, use_fused_adam


class DiscreteCQLTorchLearner(TorchLearner):
    """Learner for :class:`~kalm_ray.rl.discrete_cql.module.DiscreteQTorchRLModule`."""

    @override(Learner)
    def build(self) -> None:
        super().build()
        use_fused_adam(self)
        self._updates_since_sync: dict[ModuleID, int] = {}
        self.module.foreach_module(
            lambda mid, mod: (
                mod.make_target_networks() if isinstance(mod, TargetNetworkAPI) else None
            )
        )

    @classmethod
    @override(Learner)
    def rl_module_required_apis(cls) -> list[type]:
        return [QNetAPI, TargetNetworkAPI]

    @override(TorchLearner)
    def compute_loss_for_module(
        self,
        *,
        module_id: ModuleID,
        config: Any,
        batch: dict[str, Any],
        fwd_out: dict[str, TensorType],
    ) -> TensorType:
        out = discrete_cql_loss(
            q=fwd_out[QF_PREDS],
            q_next_online=fwd_out[QF_NEXT_PREDS]
            if config.double_q
            else fwd_out[QF_TARGET_NEXT_PREDS],
            q_next_target=fwd_out[QF_TARGET_NEXT_PREDS],
            actions=batch[Columns.ACTIONS],
            rewards=batch[Columns.REWARDS],
            terminateds=batch[Columns.TERMINATEDS],
            gamma=config.gamma,
            min_q_weight=config.min_q_weight,
        )
        loss = out.pop("loss")
        self.metrics.log_dict(out, key=module_id, window=1)
        return loss

    @override(TorchLearner)
    def apply_gradients(self, gradients_dict: ParamDict) -> None:
        if not apply_gradients_checked(self, gradients_dict):
            return
        # NOTE: Learner.after_gradient_based_update runs once per `update()` call, i.e. once
        # per RLlib iteration when learning from a data iterator (many optimizer steps), so
        # the target net is moved here, after each optimizer step.
        for mid in self.module.keys():
            module = self.module[mid].unwrapped()
            if not isinstance(module, TargetNetworkAPI):
                continue
            cfg = self.config.get_config_for_module(mid)
            n = self._updates_since_sync.get(mid, 0) + 1
            if n >= cfg.target_update_freq:
                n = 0
                with torch.no_grad():
                    for main, target in module.get_target_network_pairs():
                        torch._foreach_lerp_(
                            list(target.parameters()), list(main.parameters()), cfg.tau
                        )
            self._updates_since_sync[mid] = n
