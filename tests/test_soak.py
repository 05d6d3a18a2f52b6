"""Load: ``imagine`` on 5,000 requests with the tiny model and 2 generation actors.

Checks steady memory (RSS of each generation actor and of the driver grows < 10% from the
end of warm-up to the end) and that no row is lost or duplicated (5,000 judged rows, one
per request id, and the stage's report counts all of them). Marked ``slow``: a few minutes
on two cores. ``KALM_SOAK_REQUESTS`` changes the request count (for a quick try).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

N_REQUESTS = int(os.environ.get("KALM_SOAK_REQUESTS", "5000"))
WARMUP_FRACTION = 0.2
"""RSS is compared from this fraction of the rows on (the model and allocator are warm)."""
MAX_GROWTH = 0.10


def _upstream(root: Path):
    """``data/real`` (a few CLEVR start states), the untrained tiny model, manifests."""
    import pyarrow.parquet as pq

    from kalm_ray.artifacts import Manifest, RunDir, write_manifest
    from kalm_ray.data.schema import Episode, episodes_to_table, transition_schema
    from kalm_ray.envs import LEVELS, get_suite
    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.model import build_tiny, set_generation_stops

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, n_bins=64)
    run = RunDir(str(root))
    run.claim("soak")
    rng = np.random.default_rng(0)
    eps = []
    for k in range(8):
        s = rng.uniform([-0.4, -0.1] * 5, [0.0, 0.5] * 5).astype(np.float32)
        eps.append(
            Episode(
                episode_id=f"r{k}",
                env="clevr",
                task=suite.tasks("train")[k],
                level="train",
                instruction="x",
                states=np.stack([s, s]),
                actions=np.zeros(1, np.int64),
                rewards=np.zeros(1, np.float32),
                successes=np.zeros(1, bool),
                terminated=False,
                truncated=True,
            )
        )
    run.makedirs("data", "real")
    pq.write_table(
        episodes_to_table(eps, transition_schema(10, suite.action_space)),
        run.path("data", "real", "part-0.parquet"),
    )
    write_manifest(run, "data/real", Manifest.new("collect", "c", {}))
    texts = [w for lv in LEVELS for t in suite.tasks(lv) for w in suite.instructions(lv, t)]
    model, tok = build_tiny(codec, texts, init_from_encoder=False)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    set_generation_stops(root / "model", tok, codec)
    codec.save(root / "model")
    write_manifest(run, "model", Manifest.new("ground", "g", {}))


def _ray_workers() -> list:
    """``psutil.Process`` of every worker of this session's raylet."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    return psutil.Process(raylet).children(recursive=True)


def _generator_rss() -> dict[int, int]:
    """pid -> RSS bytes of each live generation actor (process title names HFGenerator)."""
    import psutil

    out = {}
    for p in _ray_workers():
        try:
            title = " ".join(p.cmdline())
            if "HFGenerator" in title:
                out[p.pid] = p.memory_info().rss
        except psutil.Error:
            pass
    return out


class _Spy:
    """Wraps the judged rows (a dataset or an iterable of tables, whichever the stage hands
    ``write_rollouts``): records request ids and samples RSS as rows come in."""

    def __init__(self, ds, total: int):
        import psutil

        self.ds, self.total = ds, total
        self.ids: list[str] = []
        self.samples: list[dict] = []
        self.me = psutil.Process()
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        self.samples.append(
            {
                "rows": len(self.ids),
                "t": round(time.perf_counter() - self.t0, 1),
                "driver": self.me.memory_info().rss,
                "actors": _generator_rss(),
            }
        )

    def __iter__(self):
        return self.iter_batches(batch_format="pyarrow", batch_size=None)

    def iter_batches(self, **kw):
        """The batches of the wrapped dataset, or of the wrapped iterable of tables."""
        step, mark = max(1, self.total // 20), 0
        batches = self.ds.iter_batches(**kw) if hasattr(self.ds, "iter_batches") else self.ds
        for batch in batches:
            self.ids.extend(batch.column("request_id").to_pylist())
            if len(self.ids) >= mark:
                self.sample()
                mark = len(self.ids) + step
            yield batch
        self.sample()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # Ray worker start-up alone took minutes on a loaded 2-core machine
def test_imagine_soak(ray_local, tmp_path, monkeypatch):
    import cloudpickle

    from kalm_ray.config import parse_config
    from kalm_ray.stages import imagine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _upstream(tmp_path)
    spies: list[_Spy] = []
    real_write = imagine.write_rollouts

    def spying_write(judged, **kw):
        spies.append(_Spy(judged, kw["total"]))
        return real_write(spies[-1], **kw)

    monkeypatch.setattr(imagine, "write_rollouts", spying_write)
    cfg = parse_config(
        {
            "name": "soak",
            "run_dir": str(tmp_path),
            "env": {"name": "clevr"},
            "ground": {"n_bins": 64},
            "imagine": {
                "backend": "hf",
                "levels": ["easy"],
                "rollouts_per_level": N_REQUESTS,
                "max_steps": 2,
                "batch_size": 32,
                "min_actors": 2,
                "max_actors": 2,
                "start_states": "data",
            },
        }
    )
    t0 = time.perf_counter()
    m = imagine.run_imagine(cfg, str(tmp_path))
    wall = time.perf_counter() - t0

    # ---- no lost or duplicated rows ----------------------------------------------------------
    (spy,) = spies
    assert len(spy.ids) == N_REQUESTS and len(set(spy.ids)) == N_REQUESTS
    report = json.loads((tmp_path / "data/imagined/filter_report.json").read_text())
    assert report["requested"] == N_REQUESTS == m.counts["requested"]
    assert sum(report["reasons"].values()) + report["accepted"] == N_REQUESTS

    # ---- steady memory after warm-up -------------------------------------------------------
    warm = next(s for s in spy.samples if s["rows"] >= WARMUP_FRACTION * N_REQUESTS)
    after = [s for s in spy.samples if s["rows"] >= warm["rows"] and s["actors"]]
    end = after[-1]  # last sample with the actors alive
    actors = sorted(set(warm["actors"]) & set(end["actors"]))
    assert len(actors) == 2, (warm, end)  # the same two actors served the whole run
    # Growth = the highest RSS seen after warm-up, not just the last (an actor may free
    # memory as the dataset ends).
    peak = {p: max(s["actors"].get(p, 0) for s in after) for p in actors}
    growth = {p: peak[p] / warm["actors"][p] - 1 for p in actors}
    driver_growth = max(s["driver"] for s in after) / warm["driver"] - 1
    first = spy.samples[0]
    mib = 2**20
    summary = {
        "requests": N_REQUESTS,
        "wall_s": round(wall, 1),
        "first_batch_s": first["t"],
        "rollouts_per_s": round(report["throughput"]["rollouts_per_s"], 1),
        "steady_rollouts_per_s": round(
            (end["rows"] - first["rows"]) / max(end["t"] - first["t"], 1e-9), 1
        ),
        "accepted": report["accepted"],
        "warmup_rows": warm["rows"],
        "end_rows": end["rows"],
        "actor_rss_mib_warm": [round(warm["actors"][p] / mib) for p in actors],
        "actor_rss_mib_end": [round(end["actors"][p] / mib) for p in actors],
        "actor_rss_mib_peak_after_warmup": [round(peak[p] / mib) for p in actors],
        "actor_growth_pct": [round(100 * growth[p], 1) for p in actors],
        "driver_rss_mib_warm": round(warm["driver"] / mib),
        "driver_rss_mib_end": round(end["driver"] / mib),
        "driver_rss_mib_peak_after_warmup": round(max(s["driver"] for s in after) / mib),
        "driver_growth_pct": round(100 * driver_growth, 1),
        "samples": [
            {"rows": s["rows"], "t": s["t"], "driver_mib": round(s["driver"] / mib),
             "actors_mib": sorted(round(v / mib) for v in s["actors"].values())}
            for s in spy.samples
        ],
    }  # fmt: skip
    print("SOAK " + json.dumps(summary))
    out = os.environ.get("KALM_SOAK_OUT")
    if out:
        Path(out).write_text(json.dumps(summary, indent=1))
    assert max(growth.values()) < MAX_GROWTH, summary
    assert driver_growth < MAX_GROWTH, summary
