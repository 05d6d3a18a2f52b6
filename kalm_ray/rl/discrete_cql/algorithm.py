"""Discrete CQL as an RLlib offline algorithm (new API stack): config + training step.

RLlib 2.60's CQL samples uniform actions from ``action_space.low/high`` and so only works for
Box actions. This one keeps RLlib's offline machinery (``OfflineData`` reading Ray Data,
``OfflinePreLearner``, the learner group) and swaps in a Q module and a CQL learner.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.connectors.common.add_observations_from_episodes_to_batch import (
    AddObservationsFromEpisodesToBatch,
)
from ray.rllib.connectors.learner.add_next_observations_from_episodes_to_train_batch import (
    AddNextObservationsFromEpisodesToTrainBatch,
)
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from kalm_ray.rl.common import offline_training_step
from kalm_ray.rl.discrete_cql.learner import DiscreteCQLTorchLearner
from kalm_ray.rl.discrete_cql.module import DiscreteQTorchRLModule


class DiscreteCQLConfig(AlgorithmConfig):
    """Config of :class:`DiscreteCQL`. Training settings beyond AlgorithmConfig's:

    - ``min_q_weight``: weight of the conservative term (CQL's alpha; 0 = double DQN).
    - ``tau``: Polyak step of the target network per sync.
    - ``target_update_freq``: optimizer steps between target syncs (1 = every step).
    - ``double_q``: pick the next action with the online net (double DQN) or the target net.
    """

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or DiscreteCQL)
        self._is_online = False
        self.lr = 3e-4
        self.gamma = 0.99
        self.train_batch_size_per_learner = 256
        self.min_q_weight = 1.0
        self.tau = 0.005
        self.target_update_freq = 1
        self.double_q = True
        # Like RLlib's BC/CQL: map rows to batches once, then iterate the mapped data.
        self.materialize_data = False
        self.materialize_mapped_data = True

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        min_q_weight: float | None = NotProvided,
        tau: float | None = NotProvided,
        target_update_freq: int | None = NotProvided,
        double_q: bool | None = NotProvided,
        **kwargs: Any,
    ) -> DiscreteCQLConfig:
        super().training(**kwargs)
        for name, value in (
            ("min_q_weight", min_q_weight),
            ("tau", tau),
            ("target_update_freq", target_update_freq),
            ("double_q", double_q),
        ):
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=DiscreteQTorchRLModule)

    @override(AlgorithmConfig)
    def get_default_learner_class(self) -> type:
        return DiscreteCQLTorchLearner

    @override(AlgorithmConfig)
    def build_learner_connector(self, input_observation_space, input_action_space, device=None):
        pipeline = super().build_learner_connector(
            input_observation_space=input_observation_space,
            input_action_space=input_action_space,
            device=device,
        )
        # The TD target needs the next observation of every row.
        pipeline.insert_after(
            AddObservationsFromEpisodesToBatch, AddNextObservationsFromEpisodesToTrainBatch()
        )
        return pipeline

    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()
        if self.action_space is not None and not isinstance(self.action_space, gym.spaces.Discrete):
            self._value_error(f"DiscreteCQL needs a Discrete action space, got {self.action_space}")
        if self.num_learners == 0 and not self.dataset_num_iters_per_learner:
            self._value_error(
                "DiscreteCQL with a local learner needs `dataset_num_iters_per_learner`."
            )
        if not 0.0 < self.tau <= 1.0 or self.target_update_freq < 1 or self.min_q_weight < 0:
            self._value_error(
                "DiscreteCQL: need 0 < tau <= 1, target_update_freq >= 1, min_q_weight >= 0"
            )


class DiscreteCQL(Algorithm):
    """Offline discrete CQL: each iteration runs ``dataset_num_iters_per_learner`` updates."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> DiscreteCQLConfig:
        return DiscreteCQLConfig()

    @override(Algorithm)
    def training_step(self) -> None:
        offline_training_step(self)
