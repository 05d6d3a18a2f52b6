"""Optimizer-step speedups shared by kalm_ray's learners (BC/MARWIL, discrete CQL, CQL).

Profiled on a 2-core CPU (BC, 256x256 MLP, batch 256), a stock RLlib ``TorchLearner`` update
took ~70 ms, of which ~13 ms was Adam's per-tensor Python loop and ~19 ms twelve
``torch.isfinite(grad).all()`` checks; forward + backward took ~30 ms. Two changes, same math:

- :func:`use_fused_adam`: Adam's fused kernel (one kernel for all tensors; CPU and CUDA).
- :func:`apply_gradients_checked`: one finiteness check on the global gradient norm instead
  of one per tensor (twice); a non-finite step is skipped as a whole, with a warning.
"""

from __future__ import annotations

import logging

import torch
from ray.rllib.algorithms.marwil.torch.marwil_torch_learner import MARWILTorchLearner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ParamDict

log = logging.getLogger("kalm_ray")


def use_fused_adam(learner: TorchLearner) -> None:
    """Switch every Adam optimizer of a built learner to the fused implementation.

    Call before the first step (Adam's per-parameter state is created lazily, and the fused
    kernel keeps its step counter as a tensor on the parameters' device).
    """
    for optim in learner._named_optimizers.values():
        if type(optim) is torch.optim.Adam:
            optim.defaults.update(fused=True, foreach=False)
            for group in optim.param_groups:
                group.update(fused=True, foreach=False)


def apply_gradients_checked(learner: TorchLearner, gradients: ParamDict) -> bool:
    """Set the gradients and step every optimizer once, unless a gradient is not finite.

    Returns whether the step was taken. Unlike ``TorchLearner.apply_gradients`` this does not
    drive torch LR schedulers or AMP grad scalers (kalm_ray configures neither).
    """
    if learner._grad_scalers is not None or learner._lr_scheduler_classes is not None:
        raise ValueError(
            "apply_gradients_checked: grad scalers / torch LR schedulers are not supported"
        )
    for pid, grad in gradients.items():
        learner._params[pid].grad = grad
    grads = [g for g in gradients.values() if g is not None]
    if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()):
        log.warning("non-finite gradient: optimizer step skipped")
        return False
    for optim in learner._named_optimizers.values():
        optim.step()
    return True


class KalmBCTorchLearner(MARWILTorchLearner):
    """RLlib's BC/MARWIL learner (same loss) with the fused optimizer step."""

    @override(MARWILTorchLearner)
    def build(self) -> None:
        super().build()
        use_fused_adam(self)

    @override(TorchLearner)
    def apply_gradients(self, gradients_dict: ParamDict) -> None:
        apply_gradients_checked(self, gradients_dict)
