"""Continuous CQL: RLlib 2.60's CQL with a leaner module and learner (same loss).

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

from typing import Any

import torch
from ray.rllib.algorithms.cql.cql import CQL, CQLConfig
from ray.rllib.algorithms.cql.torch.cql_torch_learner import CQLTorchLearner
from ray.rllib.algorithms.cql.torch.default_cql_torch_rl_module import DefaultCQLTorchRLModule
from ray.rllib.algorithms.sac.sac_learner import ACTION_DIST_INPUTS_NEXT, QF_PREDS, QF_TWIN_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchSquashedGaussian
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ALL_MODULES,
)
from ray.rllib.utils.typing import ModuleID, ParamDict, TensorType
from torch import nn

from kalm_ray.rl.discrete_cql.algorithm import offline_training_step
from kalm_ray.rl.discrete_cql.module import mlp
from kalm_ray.rl.learners import apply_gradients_checked, use_fused_adam


class ObsEncoder(nn.Module):
    """``obs -> hidden`` (ReLU after each layer), returning RLlib's ``{ENCODER_OUT: h}``."""

    def __init__(self, obs_dim: int, hidden: list[int]):
        super().__init__()
        self.net = nn.Sequential(mlp(obs_dim, hidden[:-1], hidden[-1]), nn.ReLU())

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {ENCODER_OUT: self.net(batch[Columns.OBS])}


class StateActionEncoder(nn.Module):
    """``[obs, action] -> hidden`` with the first layer split into an obs and an action part."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int]):
        super().__init__()
        self.obs_in = nn.Linear(obs_dim, hidden[0])
        self.act_in = nn.Linear(act_dim, hidden[0], bias=False)
        rest: list[nn.Module] = [nn.ReLU()]
        for a, b in zip(hidden[:-1], hidden[1:], strict=True):
            rest += [nn.Linear(a, b), nn.ReLU()]
        self.rest = nn.Sequential(*rest)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {
            ENCODER_OUT: self.rest(
                self.obs_in(batch[Columns.OBS]) + self.act_in(batch[Columns.ACTIONS])
            )
        }

    def repeated(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Features of N actions per state: obs (B, D), actions (B, N, A) -> (B, N, H)."""
        return self.rest(self.obs_in(obs).unsqueeze(1) + self.act_in(actions))


def _q(
    encoder: nn.Module, head: nn.Module, obs: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:
    """``(B,)`` Q values of ``(B, D)`` observations and ``(B, A)`` actions."""
    return head(encoder({Columns.OBS: obs, Columns.ACTIONS: actions})[ENCODER_OUT])[..., 0]


def _frozen(*nets: nn.Module) -> list[nn.Parameter]:
    params = [p for n in nets for p in n.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    return params


class KalmCQLTorchRLModule(DefaultCQLTorchRLModule):
    """CQL module with MLP actor/critics and batched repeated-action Q evaluations."""

    @override(DefaultCQLTorchRLModule)
    def setup(self) -> None:
        hidden = list(self.model_config["fcnet_hiddens"])
        obs_dim, act_dim = int(self.observation_space.shape[0]), int(self.action_space.shape[0])
        self.twin_q = self.model_config["twin_q"]
        self.action_dist_cls = TorchSquashedGaussian
        self.pi_encoder = ObsEncoder(obs_dim, hidden)
        self.pi = nn.Linear(hidden[-1], 2 * act_dim)
        if not self.inference_only:
            self.qf_encoder = StateActionEncoder(obs_dim, act_dim, hidden)
            self.qf = nn.Linear(hidden[-1], 1)
            if self.twin_q:
                self.qf_twin_encoder = StateActionEncoder(obs_dim, act_dim, hidden)
                self.qf_twin = nn.Linear(hidden[-1], 1)

    def _critics(self) -> list[tuple[StateActionEncoder, nn.Module]]:
        pairs = [(self.qf_encoder, self.qf)]
        if self.twin_q:
            pairs.append((self.qf_twin_encoder, self.qf_twin))
        return pairs

    def _dist(self, logits: torch.Tensor) -> TorchSquashedGaussian:
        low, high = float(self.action_space.low.min()), float(self.action_space.high.max())
        return TorchSquashedGaussian.from_logits(logits, low=low, high=high)

    @override(DefaultCQLTorchRLModule)
    def _forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        obs, next_obs, actions = batch[Columns.OBS], batch[Columns.NEXT_OBS], batch[Columns.ACTIONS]
        B, n = obs.shape[0], self.model_config["num_actions"]
        out: dict[str, Any] = {}
        logits_both = self.pi(
            self.pi_encoder({Columns.OBS: torch.cat([obs, next_obs])})[ENCODER_OUT]
        )
        logits, logits_next = logits_both[:B], logits_both[B:]
        out[Columns.ACTION_DIST_INPUTS], out[ACTION_DIST_INPUTS_NEXT] = logits, logits_next
        dist, dist_next = self._dist(logits), self._dist(logits_next)
        a_pi, out["logp_resampled"] = dist.rsample_and_logp()
        with torch.no_grad():
            a_next, logp_next = dist_next.sample_and_logp()
            out["logp_next_resampled"] = logp_next
            # CQL's sampled actions: N per state from the current policy at s and at s'.
            a_curr_n, logp_curr_n = dist.sample_and_logp(sample_shape=(n,))
            a_next_n, logp_next_n = dist_next.sample_and_logp(sample_shape=(n,))
            a_rand = torch.rand(B, n, actions.shape[-1], device=obs.device) * 2.0 - 1.0
            low = torch.as_tensor(self.action_space.low, device=obs.device)
            high = torch.as_tensor(self.action_space.high, device=obs.device)
            a_rand = low + (a_rand + 1.0) * 0.5 * (high - low)
            out["logps_curr_repeat"] = logp_curr_n.transpose(0, 1).unsqueeze(-1)
            out["logps_next_repeat"] = logp_next_n.transpose(0, 1).unsqueeze(-1)
            # Target: min over the target critics at (s', a' ~ pi(s')).
            targets = [(self.target_qf_encoder, self.target_qf)]
            if self.twin_q:
                targets.append((self.target_qf_twin_encoder, self.target_qf_twin))
            out["q_target_next"] = torch.min(
                torch.stack([_q(enc, head, next_obs, a_next) for enc, head in targets]), dim=0
            ).values
        # Per critic, one pass over s for [data action, N random, N pi(s), N pi(s')] actions; the
        # obs half of the first layer runs once per state. Q(s, a' ~ pi(s')) as in Kumar et al.'s
        # reference code and d3rlpy (stock RLlib evaluates these at s' instead).
        acts = torch.cat(
            [actions.unsqueeze(1), a_rand, a_curr_n.transpose(0, 1), a_next_n.transpose(0, 1)],
            dim=1,
        )
        for (enc, head), (pred_key, rand_key, curr_key, next_key) in zip(
            self._critics(),
            (
                (QF_PREDS, "q_rand_repeat", "q_curr_repeat", "q_next_repeat"),
                (QF_TWIN_PREDS, "q_twin_rand_repeat", "q_twin_curr_repeat", "q_twin_next_repeat"),
            ),
            strict=False,  # one critic without twin_q: only the first key set
        ):
            q_s = head(enc.repeated(obs, acts))  # (B, 1 + 3N, 1)
            out[pred_key] = q_s[:, 0, 0]
            out[rand_key], out[curr_key], out[next_key] = (
                q_s[:, 1 : n + 1],
                q_s[:, n + 1 : 2 * n + 1],
                q_s[:, 2 * n + 1 :],
            )
        out["actions_curr_repeat"] = a_curr_n
        # Actor term: Q of the reparameterised policy action, critics frozen (the gradient
        # reaches the policy only).
        frozen = _frozen(*(m for pair in self._critics() for m in pair))
        q_pi = [_q(enc, head, obs, a_pi) for enc, head in self._critics()]
        for p in frozen:
            p.requires_grad_(True)
        out["q_curr"] = torch.min(torch.stack(q_pi), dim=0).values
        return out


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
        # NOTE: see the module docstring: stock CQL moves targets once per update() call.
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


class KalmCQLConfig(CQLConfig):
    """RLlib's CQLConfig with the module/learner above, no env runner, and iterator training."""

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or KalmCQL)
        self._is_online = False

    @override(CQLConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=KalmCQLTorchRLModule)

    @override(CQLConfig)
    def get_default_learner_class(self) -> type:
        return KalmCQLTorchLearner


class KalmCQL(CQL):
    """CQL with MARWIL's offline training step (always a data iterator, shuffle kwargs passed)."""

    @classmethod
    @override(CQL)
    def get_default_config(cls) -> KalmCQLConfig:
        return KalmCQLConfig()

    @override(CQL)
    def training_step(self) -> None:
        offline_training_step(self)


__all__ = [
    "KalmCQL",
    "KalmCQLConfig",
    "KalmCQLTorchLearner",
    "KalmCQLTorchRLModule",
    "ALL_MODULES",
    "RLModule",
]
