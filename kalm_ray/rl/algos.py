"""RLlib algorithm configs for kalm_ray's offline algorithms, built from ``TrainConfig``.

| algo | actions | RLlib class |
|---|---|---|
| ``bc`` | both | ``BCConfig`` (learner: :class:`kalm_ray.rl.learners.KalmBCTorchLearner`) |
| ``marwil`` | discrete | ``MARWILConfig`` (same learner) |
| ``dcql`` | discrete | :class:`kalm_ray.rl.discrete_cql.DiscreteCQLConfig` |
| ``cql`` | continuous | :class:`kalm_ray.rl.cql.KalmCQLConfig` (RLlib CQL, faster module/learner) |
| ``iql`` | continuous | ``IQLConfig`` |

Per-algorithm defaults are in :data:`DEFAULT_PARAMS`; ``train.algo_params[algo]`` overrides
them key by key and goes to the config's ``.training(...)`` (``lr`` there overrides
``train.lr`` for that algorithm). An unknown key raises ConfigError.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from kalm_ray.config import TrainConfig
from kalm_ray.errors import ConfigError

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "bc": {},
    "marwil": {"beta": 1.0, "vf_coeff": 1.0},
    "dcql": {"min_q_weight": 1.0, "tau": 0.005, "target_update_freq": 1, "double_q": True},
    # bc_iters=0: SAC's actor loss from the start, as in d3rlpy's CQL.
    "cql": {
        "bc_iters": 0,
        "min_q_weight": 5.0,
        "num_actions": 10,
        "temperature": 1.0,
        "tau": 0.005,
        "twin_q": True,
        "deterministic_backup": True,
    },
    "iql": {"beta": 0.1, "expectile": 0.8},
}
"""Settings each algorithm starts from (RLlib names); ``train.algo_params`` overrides them."""

_SAC_FAMILY = ("cql", "iql")
# Max rows RLlib's iterator shuffles locally per learner (on top of the per-block shuffle).
_SHUFFLE_ROWS = 20_000


def config_class(algo: str) -> type:
    """The RLlib AlgorithmConfig class of ``algo`` (imports RLlib)."""
    if algo == "bc":
        from ray.rllib.algorithms.bc import BCConfig

        return BCConfig
    if algo == "marwil":
        from ray.rllib.algorithms.marwil import MARWILConfig

        return MARWILConfig
    if algo == "dcql":
        from kalm_ray.rl.discrete_cql.algorithm import DiscreteCQLConfig

        return DiscreteCQLConfig
    if algo == "cql":
        from kalm_ray.rl.cql.algorithm import KalmCQLConfig

        return KalmCQLConfig
    if algo == "iql":
        from ray.rllib.algorithms.iql import IQLConfig

        return IQLConfig
    raise ConfigError(f"train.algos: unknown algorithm {algo!r}")


def algo_params(algo: str, train: TrainConfig) -> dict[str, Any]:
    """Defaults for ``algo`` overridden by ``train.algo_params[algo]``."""
    return {**DEFAULT_PARAMS[algo], **train.algo_params.get(algo, {})}


def model_config(algo: str, hidden: list[int]) -> Any:
    """Network sizes: ``hidden`` layers (ReLU) for the policy and, where there is one, Q/V."""
    if algo in ("dcql", "cql"):
        return {"fcnet_hiddens": list(hidden), "fcnet_activation": "relu"}
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    if algo in _SAC_FAMILY:
        # SAC catalog: obs encoder (fcnet) -> head (head_fcnet); Q fuses obs/action streams.
        return DefaultModelConfig(
            fcnet_hiddens=list(hidden[:1]),
            fcnet_activation="relu",
            head_fcnet_hiddens=list(hidden[1:]),
            head_fcnet_activation="relu",
            fusionnet_hiddens=[],
            fusionnet_activation="relu",
        )
    return DefaultModelConfig(
        fcnet_hiddens=list(hidden),
        fcnet_activation="relu",
        head_fcnet_hiddens=[],
        vf_share_layers=False,
    )


def learner_resources(train: TrainConfig) -> dict[str, Any]:
    """``AlgorithmConfig.learners(...)`` resource settings from ``train`` (nothing hard-coded)."""
    out: dict[str, Any] = {
        "num_learners": train.num_learners,
        "num_gpus_per_learner": train.num_gpus_per_learner,
    }
    if train.num_cpus_per_learner is not None:
        out["num_cpus_per_learner"] = train.num_cpus_per_learner
    return out


def prelearner_map_kwargs(train: TrainConfig) -> dict[str, Any]:
    """``map_batches`` keyword arguments of RLlib's PreLearner stage (MARWIL only).

    A fixed pool of ``train.prelearner_actors`` actors (default one per learner, at least one:
    plenty at our sizes, and it leaves logical CPUs free for the Parquet reads).
    """
    from ray.data import ActorPoolStrategy

    size = train.prelearner_actors or max(1, train.num_learners)
    # NOTE: RLlib's defaults carry ``concurrency`` (deprecated since Ray 2.51, it logs a
    # warning); None drops it, and ``compute`` says the same thing the current way.
    return {
        "compute": ActorPoolStrategy(size=size),
        "concurrency": None,
        "num_cpus": train.num_cpus_per_prelearner,
    }


def new_config(algo: str) -> Any:
    """A fresh RLlib AlgorithmConfig of ``algo`` (imports RLlib)."""
    cfg = config_class(algo)()
    from kalm_ray.raysetup import reapply_console

    # NOTE: importing RLlib adds its own console handler (to "ray.rllib"); give it the
    # console threshold the others have (quiet unless ray.verbose).
    reapply_console()
    return cfg


def training_kwargs(algo: str, train: TrainConfig) -> dict[str, Any]:
    """``AlgorithmConfig.training`` arguments of ``algo``: the learning rate(s) under the names
    the algorithm takes, then ``train.algo_params`` over the defaults."""
    params = algo_params(algo, train)
    lr = params.pop("lr", train.lr)
    if algo == "cql":
        lrs = {"actor_lr": lr, "critic_lr": lr, "alpha_lr": lr}
    elif algo == "iql":
        lrs = {"actor_lr": lr, "critic_lr": lr, "value_lr": lr}
    else:
        lrs = {"lr": lr}
    lrs.update({k: params.pop(k) for k in list(params) if k in lrs})
    if algo in _SAC_FAMILY:
        lrs["lr"] = None  # NOTE: the SAC family on the new stack requires lr=None.
    return {"gamma": train.gamma, "train_batch_size_per_learner": train.batch_size, **lrs, **params}


def algo_params_refusals(train: TrainConfig) -> list[str]:
    """One line per algorithm in ``train.algos`` whose ``train.algo_params`` RLlib's config does
    not take (a misspelt key), naming it. Why: otherwise every training unit fails inside its
    Ray task, after collect, ground and imagine have run. Imports RLlib only for algorithms
    given params."""
    out = []
    for algo in train.algos:
        if train.algo_params.get(algo):
            try:
                new_config(algo).training(**training_kwargs(algo, train))
            except TypeError as e:
                out.append(f"train.algo_params.{algo}: {e}")
    return out


def build_config(
    algo: str,
    *,
    train: TrainConfig,
    data_path: str,
    filesystem: Any,
    obs_dim: int,
    action_space: gym.Space,
    num_rows: int,
    seed: int,
):
    """An RLlib AlgorithmConfig for one training unit, reading the prepared ``data_path``.

    Args:
        data_path: folder of prepared Parquet (see :func:`kalm_ray.rl.dataset.prepare_mix`),
            a path on ``filesystem`` (a ``pyarrow.fs`` filesystem, None for local).
        obs_dim: width of ``obs`` (state + embedding).
        num_rows: rows in the prepared data (sizes the local shuffle buffer).
    """
    cfg = new_config(algo)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    cfg.environment(observation_space=obs_space, action_space=action_space)
    cfg.framework("torch")
    try:
        cfg.training(**training_kwargs(algo, train))
    except TypeError as e:
        raise ConfigError(f"train.algo_params.{algo}: {e}") from None
    if algo in ("bc", "marwil"):
        from kalm_ray.rl.learners import KalmBCTorchLearner

        cfg.learners(learner_class=KalmBCTorchLearner)
    cfg.rl_module(model_config=model_config(algo, train.hidden))
    if algo != "marwil":
        # MARWIL's connector needs the module (advantages), so it keeps RLlib's PreLearner.
        from kalm_ray.rl.offline_data import PreparedOfflineData

        cfg.offline_data(
            offline_data_class=PreparedOfflineData,
            materialize_data=False,
            materialize_mapped_data=True,
        )
    cfg.offline_data(
        input_=data_path,
        input_filesystem=filesystem,
        dataset_num_iters_per_learner=train.updates_per_iteration,
        map_batches_kwargs=prelearner_map_kwargs(train),
        iter_batches_kwargs={
            "prefetch_batches": 1,
            "drop_last": True,
            "local_shuffle_buffer_size": min(num_rows, _SHUFFLE_ROWS),
            # Seeded, so the same config trains the same weights (found by the driver-kill
            # resume test: unseeded, two runs differed by up to 1.5e-3 in BC weights).
            "local_shuffle_seed": seed,
        },
    )
    cfg.learners(**learner_resources(train))
    cfg.env_runners(num_env_runners=0)
    cfg.evaluation(evaluation_interval=None)
    cfg.debugging(seed=seed, log_level="WARN")
    return cfg
