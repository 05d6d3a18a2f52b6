"""Discrete CQL loss (Kumar et al. 2020, eq. 4 with the logsumexp regulariser) on a double-DQN
TD loss. Pure functions of tensors: no RLlib, no module."""

from __future__ import annotations

import torch


def double_dqn_target(
    q_next_online: torch.Tensor,
    q_next_target: torch.Tensor,
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Bootstrapped target ``r + gamma * (1 - terminated) * Q_target(s', argmax_a Q(s', a))``.

    A truncated step (time limit) is not terminal: it bootstraps like any other.

    Args:
        q_next_online: ``(B, A)`` online-network Q values at the next state (picks the action).
        q_next_target: ``(B, A)`` target-network Q values at the next state (scores it).
        rewards: ``(B,)`` rewards.
        terminateds: ``(B,)`` bool or 0/1, the episode ended because the goal was reached.
        gamma: discount per step, in (0, 1].

    Returns:
        ``(B,)`` targets, detached.
    """
    best = q_next_online.argmax(dim=-1, keepdim=True)
    v_next = q_next_target.gather(-1, best).squeeze(-1)
    return (rewards + gamma * (1.0 - terminateds.float()) * v_next).detach()


def conservative_penalty(q: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``logsumexp_a Q(s, a) - Q(s, a_data)`` per row: pushes down every action's Q (softly,
    weighted by its softmax share) and pushes up the action the data took.

    Args:
        q: ``(B, A)`` Q values.
        actions: ``(B,)`` int64 dataset actions.

    Returns:
        ``(B,)`` non-negative penalties.
    """
    q_data = q.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(q, dim=-1) - q_data


def discrete_cql_loss(
    *,
    q: torch.Tensor,
    q_next_online: torch.Tensor,
    q_next_target: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    gamma: float,
    min_q_weight: float,
) -> dict[str, torch.Tensor]:
    """Total loss = mean squared TD error (double DQN) + ``min_q_weight`` * mean conservative
    penalty.

    Args:
        q: ``(B, A)`` online Q values at the state (with gradient).
        q_next_online, q_next_target: ``(B, A)`` at the next state (no gradient needed).
        actions, rewards, terminateds: ``(B,)`` batch columns.
        gamma: discount; min_q_weight: CQL's alpha (0 gives plain double DQN).

    Returns:
        ``loss`` (scalar, to minimise) and scalar diagnostics: ``td_loss``, ``cql_loss``,
        ``q_data`` (mean Q of dataset actions), ``q_mean``, ``q_max``, ``target_mean``.
    """
    target = double_dqn_target(q_next_online, q_next_target, rewards, terminateds, gamma)
    q_data = q.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    td_loss = torch.mean((q_data - target) ** 2)
    cql_loss = conservative_penalty(q, actions).mean()
    return {
        "loss": td_loss + min_q_weight * cql_loss,
        "td_loss": td_loss,
        "cql_loss": cql_loss,
        "q_data": q_data.mean().detach(),
        "q_mean": q.mean().detach(),
        "q_max": q.max().detach(),
        "target_mean": target.mean(),
    }
