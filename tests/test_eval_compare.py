"""``kalm compare``: the paired effect over independent runs, from their files alone."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_eval_support import ToySuite

from kalm_ray.artifacts import RunDir
from kalm_ray.cli import main
from kalm_ray.config import parse_config
from kalm_ray.errors import InputError
from kalm_ray.eval.compare import (
    compare_markdown,
    config_defaults,
    config_differences,
    load_run,
)
from kalm_ray.eval.episodes import EpisodeResult, build_episode_specs
from kalm_ray.eval.results import PolicyId, build_results
from kalm_ray.eval.stats import replicate_interval

POLICIES = [
    PolicyId(f"{a}-{d}-seed{k}", a, d, k)
    for a in ("bc", "dcql")
    for d in ("real", "real+imagined")
    for k in (0, 1, 2)
] + [
    PolicyId("random-none-seed0", "random", "none", 0),
    PolicyId("llm-real-seed0", "llm", "real", 0),
]


def _run(tmp_path, name: str, seed: int, *, lift: float, env: str = "clevr", **cfg) -> str:
    """A run dir with ``eval/results.json`` (real+imagined succeeds ``lift`` more often) and
    ``eval/config.yaml``, as ``kalm evaluate`` writes them."""
    run = RunDir(str(tmp_path / name))
    config = parse_config(
        {"name": "toy", "seed": seed, "evaluate": {"episodes_per_task": 40}, **cfg}
    )
    specs = build_episode_specs(config, ToySuite())
    rng = np.random.default_rng(seed)
    outcomes = {
        p.name: [
            EpisodeResult(
                s.index,
                bool(rng.random() < 0.4 + (lift if p.data == "real+imagined" else 0)),
                5,
                0.0,
            )
            for s in specs
        ]
        for p in POLICIES
    }
    meta = {"env": env, "n_specs": len(specs), "seed": seed, "specs_digest": f"d{seed}"}
    run.write_json(build_results(specs, outcomes, POLICIES, meta=meta), "eval", "results.json")
    run.write_text(yaml.safe_dump(config.model_dump(mode="json")), "eval", "config.yaml")
    run.claim("toy", seed=seed)  # run.json, as the first stage writes it
    return run.uri


def _row(md: str, algo: str, level: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {algo} | {level} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_pools_each_runs_paired_difference(tmp_path) -> None:
    uris = [_run(tmp_path, f"r{s}", s, lift=0.3) for s in (0, 1, 2)]
    runs = [load_run(u) for u in uris]
    md = compare_markdown(runs)
    levels = runs[0].results["levels"]
    for algo in ("bc", "dcql"):
        for lv in levels:
            diffs = [r.results["paired"][algo][lv]["diff"] for r in runs]
            mean, lo, hi = replicate_interval(np.array(diffs))
            row = _row(md, algo, lv)
            assert row[3] == " / ".join(
                f"{100 * d:+.1f}" + ("*" if r.results["paired"][algo][lv]["ci95"][0] > 0 else "")
                for d, r in zip(diffs, runs, strict=True)
            )
            assert row[4] == f"{100 * mean:+.1f}"
            assert row[5] == f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
            above = sum(r.results["paired"][algo][lv]["ci95"][0] > 0 for r in runs)
            assert row[6] == f"{above} / 0"
            assert all(-100 <= float(c) <= 100 for c in row[5][1:-1].split(","))
    assert "The grounded LLM as a policy" in md
    assert "differ beyond the seed" not in md and "share seed" not in md
    assert "| run | LLM as policy" not in md  # no grounding metrics, no filter report
    # A 30 pp lift in every run: every run's own interval is above 0 on the 40-spec levels.
    assert _row(md, "bc", "train")[6] == _row(md, "bc", "hard")[6] == "3 / 0"


def test_compare_shows_what_each_runs_imagination_rests_on(tmp_path) -> None:
    from kalm_ray.llm.imagine.filter import FilterTally
    from kalm_ray.llm.imagine.replay import ReplayTally

    a, b = (_run(tmp_path, n, s, lift=0.1) for n, s in (("a", 0), ("b", 1)))
    RunDir(a).write_json(
        {
            "policy_llm_success": 0.98,
            "policy_llm_rephrase_success": 0.47,
            "policy_random_success": 0.44,
        },
        "model",
        "grounding_metrics.json",
    )
    tally, replay = FilterTally(), ReplayTally()
    for i in range(4):
        tally.add(
            level="easy",
            task="t",
            accepted=i < 3,
            reason=None if i < 3 else "unparseable",
            repairs=0,
            success=i < 2,
            kept=i < 2,
            tokens=5,
        )
        if i < 3:
            z = np.zeros((2, 10), np.float32)
            replay.add(
                level="easy",
                task="t",
                instruction="x",
                imagined=z,
                replayed=z,
                imagined_success=i < 2,
                replayed_success=i < 1,
            )
    RunDir(a).write_json(
        {**tally.report(), "replay": replay.report()}, "data", "imagined", "filter_report.json"
    )
    md = compare_markdown([load_run(a), load_run(b)])
    assert "| 1 | 98% (47%) vs 44% | easy 75% | easy 2 | easy 50% |" in md
    assert "| 2 | — | — | — | — |" in md


def test_compare_names_config_differences_and_shared_seeds(tmp_path) -> None:
    a = _run(tmp_path, "a", 0, lift=0.0)
    b = _run(tmp_path, "b", 0, lift=0.0, train={"iterations": 7})
    md = compare_markdown([load_run(a), load_run(b)])
    assert "`train.iterations`" in md and "Runs [1, 2] share seed 0" in md
    assert config_differences([{"seed": 1, "x": {"y": 1}}, {"seed": 2, "x": {"y": 1}}]) == []
    assert config_differences([{"x": {"y": 1}}, {"x": {"y": 2}}, None]) == ["x.y"]
    # A key an older run's config lacks is its default, which that run ran.
    old, new = {"x": {}}, {"x": {"y": 0.0}}
    assert config_differences([old, new]) == ["x.y"]
    assert config_differences([old, new], {"x.y": 0.0}) == []
    assert config_differences([old, {"x": {"y": 0.1}}], {"x.y": 0.0}) == ["x.y"]
    defaults = config_defaults({"env": {"name": "clevr"}, "train": {"algos": ["bc"]}})
    assert defaults["ground.relabel_copies"] == 0 and defaults["train.algos"] == ["bc"]
    assert config_defaults({"env": {"name": "atari"}}) == {}


def test_compare_refuses_what_it_cannot_compare(tmp_path, capsys) -> None:
    a = _run(tmp_path, "a", 0, lift=0.1)
    with pytest.raises(InputError, match="two runs"):
        compare_markdown([load_run(a)])
    with pytest.raises(InputError, match="nothing: no such run directory"):
        load_run(str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="not a kalm run directory"):
        load_run(str(tmp_path))  # the folder above the runs
    (tmp_path / "a" / "eval" / "results.json").unlink()
    with pytest.raises(InputError, match=r"results.json not found; run `kalm evaluate CONFIG"):
        load_run(a)
    a = _run(tmp_path, "a", 0, lift=0.1)
    mw = _run(tmp_path, "mw", 1, lift=0.1, env="metaworld")
    with pytest.raises(InputError, match="different envs"):
        compare_markdown([load_run(a), load_run(mw)])
    assert main(["compare", a, a]) == 2
    assert "named twice" in capsys.readouterr().err
    assert main(["compare", a, a + "/"]) == 2  # one run spelt two ways is still one run
    assert "named twice" in capsys.readouterr().err


def test_compare_cli_writes_the_table(tmp_path, capsys) -> None:
    uris = [_run(tmp_path, f"r{s}", s, lift=0.2) for s in (3, 4)]
    out = tmp_path / "cmp.md"
    assert main(["compare", *uris, "--out", str(out)]) == 0
    assert out.read_text().startswith("# KALM effect over 2 runs of `clevr`")
    assert main(["compare", *uris]) == 0
    assert capsys.readouterr().out.count("| bc | train |") == 1
    assert main(["compare", *uris, "--out", str(tmp_path)]) == 2  # a folder: one line
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kalm: error: --out {tmp_path}: cannot write it (Is a directory)")
