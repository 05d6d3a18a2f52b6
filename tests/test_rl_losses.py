"""Pure-function tests of the discrete CQL loss (no Ray, no RLlib)."""

from __future__ import annotations

import pytest
import torch

from kalm_ray.rl.discrete_cql.loss import conservative_penalty, discrete_cql_loss, double_dqn_target


def _batch(b: int = 6, a: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(b, a, generator=g, requires_grad=True),
        q_next_online=torch.randn(b, a, generator=g),
        q_next_target=torch.randn(b, a, generator=g),
        actions=torch.zeros(b, dtype=torch.int64),  # the data only ever takes action 0
        rewards=torch.rand(b, generator=g),
        terminateds=torch.tensor([True, False, False, False, False, False])[:b],
    )


def test_double_dqn_target_uses_online_argmax_target_value_and_real_discount():
    q_next_online = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    q_next_target = torch.tensor([[5.0, 3.0], [7.0, 9.0]])
    rewards = torch.tensor([1.0, 1.0])
    # Row 0 terminated: no bootstrap. Row 1 (maybe truncated, not terminated): bootstraps.
    y = double_dqn_target(q_next_online, q_next_target, rewards, torch.tensor([True, False]), 0.9)
    assert torch.allclose(y, torch.tensor([1.0, 1.0 + 0.9 * 7.0]))


def test_conservative_penalty_is_logsumexp_minus_data_q():
    q = torch.tensor([[1.0, 2.0, 3.0]])
    pen = conservative_penalty(q, torch.tensor([2]))
    assert torch.allclose(pen, torch.logsumexp(q, -1) - 3.0)
    assert (conservative_penalty(torch.randn(8, 4), torch.randint(0, 4, (8,))) >= 0).all()


def test_conservative_term_lowers_q_of_unseen_actions():
    b = _batch()
    out = discrete_cql_loss(**b, gamma=0.99, min_q_weight=1.0)
    (grad_cql,) = torch.autograd.grad(out["cql_loss"], b["q"])
    # Descent direction = -grad: every unseen action's Q goes down, the data action's goes up.
    assert (grad_cql[:, 1:] > 0).all()
    assert (grad_cql[:, 0] < 0).all()


def test_one_gradient_step_separates_seen_from_unseen_actions_only_with_cql():
    def step(weight: float) -> torch.Tensor:
        b = _batch(seed=1)
        loss = discrete_cql_loss(**b, gamma=0.99, min_q_weight=weight)["loss"]
        (g,) = torch.autograd.grad(loss, b["q"])
        return (b["q"] - 0.5 * g).detach() - b["q"].detach()

    plain, conservative = step(0.0), step(1.0)
    # Plain TD only touches the data action; CQL also pushes the unseen ones down.
    assert torch.allclose(plain[:, 1:], torch.zeros_like(plain[:, 1:]))
    assert (conservative[:, 1:] < 0).all()


@pytest.mark.parametrize("weight", [0.0, 2.5])
def test_loss_is_td_plus_weighted_penalty(weight: float):
    b = _batch(seed=2)
    out = discrete_cql_loss(**b, gamma=0.9, min_q_weight=weight)
    assert torch.allclose(out["loss"], out["td_loss"] + weight * out["cql_loss"])
    assert out["loss"].shape == ()
