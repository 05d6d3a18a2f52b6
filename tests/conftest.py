"""Shared fixtures. Ray tests share one local Ray per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with 8 logical CPUs (offline RLlib deadlocks with 2), dashboard off."""
    import ray

    # Ray's own 30 s start-up wait can run out on a loaded 2-core machine: retry a few times.
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(
                num_cpus=8,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            )
        except Exception:  # noqa: BLE001 - any start-up failure gets the same retry
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    # Left running for the rest of the session; pytest exit shuts it down.
