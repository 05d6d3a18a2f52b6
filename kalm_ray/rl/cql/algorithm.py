"""Continuous CQL as an RLlib offline algorithm: config (module, learner, no env runner) and
the offline training step."""

from __future__ import annotations

from ray.rllib.algorithms.cql.cql import CQL, CQLConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from kalm_ray.rl.common import offline_training_step
from kalm_ray.rl.cql.learner import KalmCQLTorchLearner
from kalm_ray.rl.cql.module import KalmCQLTorchRLModule


class KalmCQLConfig(CQLConfig):
    """RLlib's CQLConfig with this package's module and learner, no env runner, and iterator
    training."""

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
