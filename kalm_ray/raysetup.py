"""Starting or joining Ray the same way from every stage."""

from __future__ import annotations

import logging
import os

from kalm_ray.config import RayConfig

log = logging.getLogger("kalm_ray")


def init_ray(cfg: RayConfig) -> None:
    """Join ``cfg.address`` or start a local Ray; a no-op when Ray is already up.

    A local Ray gets max(8, cores) logical CPUs by default: offline RLlib with 2 logical
    CPUs deadlocks (the env runner and the PreLearner take both, the Parquet read never
    schedules; see shared notes §4.7). The dashboard binds to ``cfg.dashboard_host``.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Jobs submitted to a cluster set RAY_ADDRESS; join it rather than start a new Ray.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=cfg.num_cpus or max(8, os.cpu_count() or 1),
        include_dashboard=cfg.dashboard,
        dashboard_host=cfg.dashboard_host,
        log_to_driver=False,
        configure_logging=False,
    )
