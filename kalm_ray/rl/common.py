"""Pieces shared by kalm_ray's RLlib algorithms (:mod:`kalm_ray.rl.discrete_cql`,
:mod:`kalm_ray.rl.cql`): the MLP their networks are built from and the offline training step.
The optimizer-step speedups all of kalm_ray's learners use are in :mod:`kalm_ray.rl.learners`.
"""

from __future__ import annotations

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.utils.metrics import (
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    OFFLINE_SAMPLING_TIMER,
    TIMERS,
)
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


def mlp(in_dim: int, hidden: list[int], out_dim: int, activation: str = "relu") -> nn.Sequential:
    """``in_dim -> hidden... -> out_dim`` with ``activation`` between layers (none at the end)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), _ACTIVATIONS[activation]()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def offline_training_step(algo: Algorithm) -> None:
    """One offline iteration: ``dataset_num_iters_per_learner`` updates from data iterators.

    The training step of ``DiscreteCQL`` and ``KalmCQL``.
    """
    # Same offline step as RLlib's MARWIL/BC (always through a data iterator, which also
    # sidesteps CQL's single-batch path bug with dataset_num_iters_per_learner=1).
    with algo.metrics.log_time((TIMERS, OFFLINE_SAMPLING_TIMER)):
        iterators = algo.offline_data.sample(
            num_samples=algo.config.train_batch_size_per_learner,
            num_shards=algo.config.num_learners,
            return_iterator=True,
        )
        rows = algo.config.train_batch_size_per_learner * max(1, algo.config.num_learners)
        algo.metrics.log_value(
            NUM_ENV_STEPS_SAMPLED_LIFETIME,
            rows * (algo.config.dataset_num_iters_per_learner or 1),
            reduce="lifetime_sum",
        )
    with algo.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
        results = algo.learner_group.update(
            training_data=TrainingData(data_iterators=iterators),
            minibatch_size=algo.config.train_batch_size_per_learner,
            num_iters=algo.config.dataset_num_iters_per_learner,
            timesteps={
                NUM_ENV_STEPS_SAMPLED_LIFETIME: algo.metrics.peek(NUM_ENV_STEPS_SAMPLED_LIFETIME)
            },
            **algo.offline_data.iter_batches_kwargs,
        )
        algo.metrics.aggregate(results, key=LEARNER_RESULTS)
