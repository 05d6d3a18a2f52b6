"""``write_report`` from files alone: every section with its inputs, and each one without."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from test_eval_support import ToySuite

from kalm_ray.artifacts import RunDir
from kalm_ray.config import parse_config
from kalm_ray.data.schema import Episode, episodes_to_table, transition_schema
from kalm_ray.eval.episodes import EpisodeResult, build_episode_specs
from kalm_ray.eval.report import write_report
from kalm_ray.eval.results import PolicyId, build_results, headline_markdown
from kalm_ray.llm.imagine.filter import FilterTally


def _results(run: RunDir, policies: list[PolicyId]) -> dict:
    specs = build_episode_specs(parse_config({"name": "toy"}), ToySuite())
    rng = np.random.default_rng(0)
    outcomes = {
        p.name: [
            EpisodeResult(s.index, bool(rng.random() < 0.5), int(rng.integers(1, 12)), 0.0)
            for s in specs
        ]
        for p in policies
    }
    res = build_results(specs, outcomes, policies, meta={"env": "clevr", "n_specs": len(specs)})
    run.write_json(res, "eval", "results.json")
    return res


def _episodes(task: str, source: str, n: int, rng: np.random.Generator) -> list[Episode]:
    out = []
    for k in range(n):
        states = np.cumsum(rng.normal(0, 0.05, (6, 10)), axis=0).astype(np.float32)
        out.append(
            Episode(
                episode_id=f"{source}-{task}-{k}",
                env="clevr",
                task=task,
                level="train",
                instruction=f"do {task}",
                states=states,
                actions=np.zeros(5, np.int64),
                rewards=np.zeros(5, np.float32),
                successes=np.zeros(5, bool),
                terminated=False,
                truncated=True,
                source=source,
            )
        )
    return out


def _write_data(run: RunDir) -> None:
    rng = np.random.default_rng(1)
    schema = transition_schema(10, gym.spaces.Discrete(40))
    for source, folder in (("real", "data/real"), ("imagined", "data/imagined")):
        eps = _episodes("left:red:blue", source, 4, rng) + _episodes(
            "behind:green:cyan", source, 2, rng
        )
        run.makedirs(folder, "part")
        pq.write_table(episodes_to_table(eps, schema), run.path(folder, "part", "0.parquet"))
    tally = FilterTally()
    for i in range(10):
        ok = i % 3 == 0
        tally.add(
            level="rephrase" if i < 5 else "hard",
            task="left:red:blue",
            accepted=ok,
            reason=None if ok else ("unparseable" if i % 2 else "out_of_bounds"),
            repairs=0,
            success=False,
            kept=ok,
            tokens=10,
        )
    run.write_json(tally.report(), "data", "imagined", "filter_report.json")


def test_full_report_has_every_section_and_plot(tmp_path) -> None:
    run = RunDir(str(tmp_path))
    policies = [
        PolicyId(f"dcql-{d}-seed{k}", "dcql", d, k)
        for d in ("real", "real+imagined")
        for k in (0, 1)
    ]
    _results(run, policies)
    for p in policies:
        # As kalm_ray.rl writes it: quick_success only every few iterations, a text column.
        curve = "iteration,updates,train_s,total_loss,quick_success,note\n"
        curve += "".join(
            f"{i},{50 * i},1.5,{2 / i},{'0.3' if i % 2 == 0 else ''},x\n" for i in range(1, 7)
        )
        run.write_text(curve, "policy", p.name, "curve.csv")
        run.write_text("a,b\n1,2\n", "policy", p.name, "other.csv")
    _write_data(run)
    written = write_report(run)
    assert set(written) == {
        "report.md",
        "success_by_level.png",
        "learning_curves.png",
        "filter_rejections.png",
        "rollouts_topdown.png",
    }
    for f in written[1:]:
        assert run.read_bytes("eval", f)[:4] == b"\x89PNG"
    md = run.read_bytes("eval", "report.md").decode()
    assert "| rejected: unparseable |" in md and "| **requested** | 5 | 5 |" in md
    assert "real episodes first" in md and "No imagined data" not in md
    assert "| dcql | train |" in md
    # Two training seeds per mix: the table says it is not a result; three make one.
    assert "**Not a result:** 2 training seed(s) per mix" in md
    three = [PolicyId(f"dcql-{d}-seed{k}", "dcql", d, k) for d in ("real", "real+imagined")
             for k in (0, 1, 2)]
    assert "Not a result" not in headline_markdown(_results(run, three))


def test_report_without_optional_inputs_says_so(tmp_path) -> None:
    run = RunDir(str(tmp_path))
    res = _results(run, [PolicyId("bc-real-seed0", "bc", "real", 0)])
    assert write_report(run) == ["report.md", "success_by_level.png"]
    md = run.read_bytes("eval", "report.md").decode()
    assert "No learning-curve CSV" in md
    assert "`data/imagined/filter_report.json` is absent" in md
    assert "No imagined data: `data/imagined/` holds no Parquet files." in md
    # One mix only: no paired column to fill, but the table still renders.
    head = headline_markdown(res)
    assert "| bc | hard | " in head and head.count("—") == 2 * 4


def test_metaworld_run_skips_topdown(tmp_path) -> None:
    run = RunDir(str(tmp_path))
    res = _results(run, [PolicyId("iql-real-seed0", "iql", "real", 0)])
    run.write_json({**res, "env": "metaworld"}, "eval", "results.json")
    write_report(run)
    assert "CLEVR-Robot only" in run.read_bytes("eval", "report.md").decode()


def test_report_keeps_parquet_reader_happy_with_unrelated_files(tmp_path) -> None:
    run = RunDir(str(tmp_path))
    _results(run, [PolicyId("bc-real-seed0", "bc", "real", 0)])
    _write_data(run)
    run.write_json({"stage": "x"}, "data", "real", "manifest.json")
    run.write_bytes(pa.BufferOutputStream().getvalue().to_pybytes(), "data", "real", "notes.txt")
    assert "rollouts_topdown.png" in write_report(run)
