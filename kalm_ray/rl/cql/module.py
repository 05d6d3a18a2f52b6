"""The CQL RLModule: MLP actor and critics, batched repeated-action Q evaluations.

See the package docstring for what differs from RLlib's ``DefaultCQLTorchRLModule``.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.cql.torch.default_cql_torch_rl_module import DefaultCQLTorchRLModule
from ray.rllib.algorithms.sac.sac_learner import ACTION_DIST_INPUTS_NEXT, QF_PREDS, QF_TWIN_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchSquashedGaussian
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.utils.annotations import override
from torch import nn

from kalm_ray.rl.common import mlp


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
