"""Shared fixtures. Ray tests share one local Ray per test session."""

from __future__ import annotations

import json
import os

import pytest
from helpers import SMALL, toy_episodes, toy_suite

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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """The ground stage's small tiny model, its tokenizer and codec, and JSONL training examples
    (test_ground.py, test_ground_fit.py; test_rl_train.py has a ``prepared`` of its own)."""
    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.model import build_tiny
    from kalm_ray.llm.prompts import EpisodeArrays, episode_examples

    root = tmp_path_factory.mktemp("ground")
    codec = Codec.for_suite(toy_suite(), 32)
    model, tok = build_tiny(codec, ["push the red ball left"], overrides=SMALL)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    codec.save(root)
    rows = []
    for e in toy_episodes(12):
        rows += episode_examples(codec, tok, EpisodeArrays(**e), max_seq_len=256)[0]
    (root / "examples").mkdir()
    (root / "examples" / "part-0.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"root": root, "codec": codec}
