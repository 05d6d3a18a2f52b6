"""The imagine stage's plumbing: requests, the hf backend through Ray Data, sampling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import END, WORDS, save_tiny_model

from kalm_ray.config import ImagineConfig
from kalm_ray.llm.imagine.backends import GenerationSpec
from kalm_ray.llm.imagine.backends.hf import cut_at_stop, gumbel_scores
from kalm_ray.llm.imagine.requests import (
    REQUEST_COLUMNS,
    DataStarts,
    build_requests,
    pick_tasks,
    requests_dataset,
    state_matrix,
    wording_shortfall,
)


class ToySuite:
    """Two levels, a few tasks, two wordings each; 3-d states."""

    name = "toy"

    class layout:
        dim = 3
        entities: dict = {}

    def tasks(self, level):
        return {"easy": ["a", "b", "c"], "hard": ["h1", "h2", "h3", "h4", "h5"]}[level]

    def instructions(self, level, task):
        return [f"do {task} please", f"{task} now"]


def fixed_starts(level, task, seeds):
    return np.stack([np.full(3, s % 1000, np.float32) for s in seeds])


def make_requests(seed=0, **kw):
    args = dict(
        levels=["easy", "hard"],
        rollouts_per_level=7,
        max_tasks_per_level=None,
        seed=seed,
        starts=fixed_starts,
        prompt_fn=lambda ins, s: f"{ins} | {s[0]:.0f}",
    )
    args.update(kw)
    return build_requests(ToySuite(), **args)


# ---- requests ------------------------------------------------------------------------------


def test_requests_round_robin_wordings_and_determinism():
    t = make_requests()
    assert t.column_names == list(REQUEST_COLUMNS) and t.num_rows == 14
    rows = t.to_pylist()
    easy = [r for r in rows if r["level"] == "easy"]
    assert [r["task"] for r in easy] == ["a", "b", "c", "a", "b", "c", "a"]
    # The k-th request of a task takes wording (offset + k) mod n, with a seeded offset per
    # task (issue 11: cycling from wording 0 for every task used only the first few).
    wordings = ToySuite().instructions
    for task in "abc":
        mine = [r["instruction"] for r in easy if r["task"] == task]
        assert all(w in wordings("easy", task) for w in mine)
        assert all(x != y for x, y in zip(mine, mine[1:], strict=False))  # consecutive differ
    assert len({r["request_id"] for r in rows}) == 14 and len({r["seed"] for r in rows}) == 14
    assert all(r["prompt"] == f"{r['instruction']} | {r['start_state'][0]:.0f}" for r in rows)
    assert make_requests().equals(t)
    assert not make_requests(seed=1).equals(t)


def test_requests_use_every_wording_of_a_level_and_only_valid_starts():
    """Issue 11: with fewer requests per task than wordings, the level still uses them all;
    a start where the task's goal already holds (or has no room) is never requested."""
    from functools import partial

    from kalm_ray.envs import get_suite
    from kalm_ray.envs.clevr.tasks import valid_start
    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.imagine.requests import ResetStarts
    from kalm_ray.llm.prompts import rollout_prompt

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, n_bins=16)
    rng = np.random.default_rng(0)
    pool = np.stack([rng.uniform(-0.45, 0.45, 10).astype(np.float32) for _ in range(200)])
    starts = DataStarts({"left:red:blue": pool}, fallback=ResetStarts(suite), valid=valid_start)
    t = build_requests(
        suite,
        levels=["easy"],
        rollouts_per_level=80,  # 4 per easy task, 11 wordings each
        max_tasks_per_level=None,
        seed=0,
        starts=starts,
        prompt_fn=partial(rollout_prompt, codec),
    ).to_pylist()
    assert len({r["instruction"] for r in t}) == 80  # no wording requested twice
    templates = {suite.instructions("easy", r["task"]).index(r["instruction"]) for r in t}
    assert len(templates) == 11, templates  # each of the level's 11 templates is used
    assert all(valid_start(r["task"], np.asarray(r["start_state"], np.float32)) for r in t)
    # Whatever the seed: 40 requests are 2 per task, and still every template, each 3-4 times
    # (independent offsets per task left one out on 3 seeds of 8).
    for seed in range(8):
        rows = build_requests(
            suite, levels=["easy"], rollouts_per_level=40, max_tasks_per_level=None,
            seed=seed, starts=starts, prompt_fn=partial(rollout_prompt, codec),
        ).to_pylist()
        used = Counter(suite.instructions("easy", r["task"]).index(r["instruction"]) for r in rows)
        assert len(used) == 11 and set(used.values()) <= {3, 4}, (seed, used)
    # 40 requests use 40 of the 220 easy wordings; 220 would use each (11 per task).
    short = build_requests(
        suite, levels=["easy", "hard"], rollouts_per_level=1000, max_tasks_per_level=None,
        seed=0, starts=starts, prompt_fn=partial(rollout_prompt, codec),
    )
    assert wording_shortfall(short, suite, max_tasks_per_level=None, seed=0) == {}
    table = pa.Table.from_pylist(rows)
    assert wording_shortfall(table, suite, max_tasks_per_level=None, seed=7) == {
        "easy": (40, 220, 220)
    }
    # Fewer requests than tasks: the tasks never requested count too (80 x 12 rephrase).
    few = build_requests(
        suite, levels=["rephrase"], rollouts_per_level=40, max_tasks_per_level=None,
        seed=0, starts=starts, prompt_fn=partial(rollout_prompt, codec),
    )
    assert wording_shortfall(few, suite, max_tasks_per_level=None, seed=0) == {
        "rephrase": (40, 960, 960)
    }


def test_step_limits_per_level_and_per_part():
    """Each level's imagined rollouts are ``max_steps`` long at most (CLEVR easy: one push);
    with ``imagine.compose`` every part of a goal gets ``max_steps`` (hard: up to 3 parts)."""
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.imagine.store import level_step_limits

    clevr, levels = get_suite("clevr"), ["rephrase", "easy", "hard"]
    assert level_step_limits(clevr, levels, 8) == {"rephrase": 8, "easy": 1, "hard": 8}
    assert level_step_limits(clevr, levels, 8, compose=True) == {
        "rephrase": 8, "easy": 1, "hard": 24
    }
    assert level_step_limits(clevr, ["hard"], 20, compose=True) == {"hard": 50}  # episode cap


def test_max_tasks_is_a_stable_sample():
    t = make_requests(max_tasks_per_level=2)
    hard = sorted({r["task"] for r in t.to_pylist() if r["level"] == "hard"})
    assert len(hard) == 2 and hard == sorted(hard, key=["h1", "h2", "h3", "h4", "h5"].index)
    assert make_requests(max_tasks_per_level=2).equals(t)
    rng = np.random.default_rng(0)
    assert pick_tasks(["x", "y"], None, rng) == ["x", "y"] and pick_tasks(["x"], 5, rng) == ["x"]


def test_data_starts_prefer_the_task_and_fall_back():
    by_task = {"a": np.ones((3, 3), np.float32), "b": 2 * np.ones((2, 3), np.float32)}
    calls = []

    def reset(level, task, seeds):
        calls.append(task)
        return np.full((len(seeds), 3), -1.0, np.float32)

    seeds = np.arange(5)
    pooled = DataStarts(by_task, fallback=reset, task_dependent=False)
    assert (pooled("easy", "a", seeds) == 1).all()
    assert set(pooled("easy", "zzz", seeds)[:, 0]) <= {1.0, 2.0} and not calls
    per_task = DataStarts(by_task, fallback=reset, task_dependent=True)
    assert (per_task("easy", "zzz", seeds) == -1).all() and calls == ["zzz"]
    np.testing.assert_array_equal(pooled("easy", "zzz", seeds), pooled("easy", "zzz", seeds))


def test_state_matrix_accepts_any_list_column():
    fixed = pa.array([[1, 2], [3, 4]], pa.list_(pa.float32(), 2))
    var = pa.array([[1, 2], [3, 4]], pa.list_(pa.float64()))
    for col in (fixed, var, pa.chunked_array([fixed]), [np.array([1, 2]), np.array([3, 4])]):
        np.testing.assert_array_equal(state_matrix(col), [[1, 2], [3, 4]])


# ---- hf backend ----------------------------------------------------------------------------


def test_cut_at_stop():
    assert cut_at_stop(np.array([5, 6, 4, 0, 0]), [4, 2]) == 3
    assert cut_at_stop(np.array([5, 6, 7]), [4]) == 3
    assert cut_at_stop(np.array([2, 4]), [4, 2]) == 1


def test_gumbel_scores_sample_the_softmax_within_top_p():
    import torch

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    picks = gumbel_scores(
        logits, torch.rand(logits.shape, generator=gen), temperature=1.0, top_p=1.0
    ).argmax(-1)
    freq = torch.bincount(picks, minlength=3).float() / len(picks)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.02)
    nucleus = gumbel_scores(
        logits, torch.rand(logits.shape, generator=gen), temperature=1.0, top_p=0.5
    ).argmax(-1)
    assert (nucleus == 0).all()  # 0.6 alone covers the nucleus


def _requests_table(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    prompts = ["go " + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) for _ in range(n)]
    return pa.table(
        {
            "request_id": [f"easy-{i:06d}" for i in range(n)],
            "level": ["easy"] * n,
            "task": ["a"] * n,
            "instruction": ["i"] * n,
            "start_state": pa.array([[0.0, 1.0]] * n, pa.list_(pa.float32(), 2)),
            "seed": pa.array(np.arange(n) * 7 + 1, pa.int64()),
            "prompt": prompts,
        }
    )


def _spec(model_dir: Path, temperature: float = 0.0) -> GenerationSpec:
    return GenerationSpec(
        model_dir=str(model_dir),
        max_new_tokens=12,
        end_token=END,
        temperature=temperature,
        top_p=0.95,
        loader="kalm_ray.llm.imagine.backends.hf:load_hf_dir",
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_hf_generator_in_process(tiny_model):
    from kalm_ray.llm.imagine.backends.hf import HFGenerator

    table = _requests_table(6)
    gen = HFGenerator(_spec(tiny_model), device="cpu", num_threads=1)
    out = gen(table)
    assert out.column_names == [
        *table.column_names,
        "generated_text",
        "num_generated_tokens",
        "num_input_tokens",
    ]
    counts = out.column("num_generated_tokens").to_pylist()
    assert all(0 < c <= 12 for c in counts)
    texts = out.column("generated_text").to_pylist()
    assert all(len(t.split()) == c for t, c in zip(texts, counts, strict=True))
    # Left padding + KV cache: a request's greedy output does not depend on its batch mates.
    alone = gen(table.slice(2, 1)).column("generated_text").to_pylist()[0]
    assert alone == texts[2]


def test_foreign_token_stops_a_request_early(tiny_model):
    """With codec tokens given, a request ends at its first token outside them."""
    from dataclasses import replace

    from kalm_ray.llm.imagine.backends.hf import HFGenerator

    table = _requests_table(6)
    free = HFGenerator(_spec(tiny_model), device="cpu", num_threads=1)(table)
    allowed = tuple(WORDS[::2])
    spec = replace(_spec(tiny_model), codec_tokens=allowed)
    cut = HFGenerator(spec, device="cpu", num_threads=1)(table)
    for a, b, n in zip(
        free.column("generated_text").to_pylist(),
        cut.column("generated_text").to_pylist(),
        cut.column("num_generated_tokens").to_pylist(),
        strict=True,
    ):
        words = a.split()
        k = next((i for i, w in enumerate(words) if w not in allowed), len(words) - 1)
        assert b.split() == words[: k + 1] and n == k + 1


def test_seeded_sampling_depends_on_the_request_seed_only(tiny_model):
    from kalm_ray.llm.imagine.backends.hf import HFGenerator

    table = _requests_table(6)
    gen = HFGenerator(_spec(tiny_model, temperature=1.0), device="cpu", num_threads=1)
    full = gen(table).column("generated_text").to_pylist()
    part = gen(table.slice(3, 3)).column("generated_text").to_pylist()
    assert full[3:] == part
    assert gen(table).column("generated_text").to_pylist() == full


def test_hf_backend_one_actor_equals_two_actors(ray_local, tiny_model):
    from kalm_ray.llm.imagine.backends.hf import generate_hf

    table = _requests_table(24)

    def run(n_actors: int) -> list[dict]:
        icfg = ImagineConfig(
            backend="hf",
            batch_size=4,
            min_actors=n_actors,
            max_actors=n_actors,
            num_cpus_per_actor=1,
        )
        ds = generate_hf(
            requests_dataset(table, rows_per_block=4), spec=_spec(tiny_model), icfg=icfg
        )
        rows = ds.take_all()
        return sorted(
            (
                {k: r[k] for k in ("request_id", "generated_text", "num_generated_tokens")}
                for r in rows
            ),
            key=lambda r: r["request_id"],
        )

    one, two = run(1), run(2)
    assert len(one) == 24 and one == two


# ---- the stage end to end (generation replaced by a scripted stand-in) -----------------------


def scripted_generate(ds, *, backend, spec, icfg):
    """Stand-in backend: red pushed right 0.25 per step for 3 steps (one on the one-push easy
    level); texts 1, 5, 9, ... are junk."""
    import json as _json

    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.imagine.requests import state_matrix as _sm

    codec = Codec.from_dict(_json.loads(spec.model_dir))  # the test passes the codec here

    def gen(batch: pa.Table) -> pa.Table:
        texts = []
        for i, s in enumerate(_sm(batch.column("start_state"), 10)):
            if int(batch.column("request_id")[i].as_py()[-6:]) % 4 == 1:
                texts.append("oops")
                continue
            n = 1 if batch.column("level")[i].as_py() == "easy" else 3
            states = np.repeat(s[None], n + 1, axis=0)
            states[:, 0] = np.minimum(s[0] + 0.25 * np.arange(n + 1), 0.47)
            texts.append(codec.encode_trajectory(states, np.zeros(n, np.int64)))
        return (
            batch.append_column("generated_text", pa.array(texts))
            .append_column(
                "num_generated_tokens", pa.array([len(t) // 9 for t in texts], pa.int64())
            )
            .append_column("num_input_tokens", pa.array([1] * len(texts), pa.int64()))
        )

    return ds.map_batches(gen, batch_format="pyarrow", batch_size=None)


def fake_upstream(run_dir: Path, codec) -> None:
    """data/real with a few CLEVR first states, model/codec.json, both with manifests."""
    from kalm_ray.artifacts import Manifest, RunDir, write_manifest
    from kalm_ray.data.schema import Episode, episodes_to_table, transition_schema
    from kalm_ray.envs import get_suite

    suite = get_suite("clevr")
    run = RunDir(str(run_dir))
    run.claim("t")
    rng = np.random.default_rng(0)
    eps = []
    for k in range(6):
        s = rng.uniform([-0.4, 0.2] * 5, [0.0, 0.5] * 5).astype(np.float32)
        s[1] = -0.1  # red's lane: pushed right (scripted_generate), it meets no other ball
        eps.append(
            Episode(
                episode_id=f"r{k}",
                env="clevr",
                task="behind:red:blue",
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
    table = episodes_to_table(eps, transition_schema(10, suite.action_space))
    run.makedirs("data", "real")
    import pyarrow.parquet as pq

    pq.write_table(table, run.path("data", "real", "part-0.parquet"))
    write_manifest(run, "data/real", Manifest.new("collect", "c", {}))
    run.write_json(codec.to_dict(), "model", "codec.json")
    write_manifest(run, "model", Manifest.new("ground", "g", {}))


def test_run_imagine_end_to_end(ray_local, tmp_path, monkeypatch):
    import json
    import sys

    import cloudpickle
    import pyarrow.parquet as pq

    from kalm_ray.config import parse_config
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.codec import Codec
    from kalm_ray.stages import imagine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests
    codec = Codec.for_suite(get_suite("clevr"), n_bins=64)
    fake_upstream(tmp_path, codec)
    monkeypatch.setattr(imagine, "generate", scripted_generate)
    monkeypatch.setattr(
        imagine,
        "GenerationSpec",
        lambda **kw: GenerationSpec(**{**kw, "model_dir": json.dumps(codec.to_dict())}),
    )
    cfg = parse_config(
        {
            "name": "t",
            "run_dir": str(tmp_path),
            "env": {"name": "clevr"},
            "imagine": {
                "backend": "hf",
                "levels": ["easy", "hard"],
                "rollouts_per_level": 12,
                "max_steps": 5,
                "batch_size": 4,
            },
        }
    )
    m = imagine.run_imagine(cfg, str(tmp_path))

    report = json.loads((tmp_path / "data/imagined/filter_report.json").read_text())
    assert report["requested"] == 24 and report["reasons"]["unparseable"] == 6
    assert report["accepted"] == 18 and m.counts["accepted"] == 18
    assert set(report["per_level"]) == {"easy", "hard"} and report["examples"]["unparseable"]
    assert report["throughput"]["rollouts_per_s"] > 0
    table = pq.read_table(tmp_path / "data/imagined/part-00000.parquet")
    assert table.column("source").unique().to_pylist() == ["imagined"]
    gens = {json.loads(g)["backend"] for g in table.column("generator").unique().to_pylist()}
    assert gens == {"hf"}
    rows = table.to_pylist()
    # move:red:right succeeds after the first push; it is cut there and terminated.
    right = [r for r in rows if r["task"] == "move:red:right"]
    assert right and all(r["t"] == 0 and r["terminated"] and not r["truncated"] for r in right)
    ends = [r for r in rows if r["terminated"] or r["truncated"]]
    assert len(ends) == m.counts["episodes"] == 18  # keep_failures: every accepted rollout
    assert all(not (r["terminated"] and r["truncated"]) for r in rows)
    assert (tmp_path / "data/imagined/config.yaml").exists()
    # Up to date: the second call does nothing and returns the same manifest.
    assert imagine.run_imagine(cfg, str(tmp_path)).output_id == m.output_id


def test_interrupted_imagine_resumes_its_judged_batches(ray_local, tmp_path, monkeypatch, capsys):
    """Issue 19: Ctrl-C after two judged batches are saved; the rerun generates only the
    other requests and writes the same rollouts and report as an uninterrupted run."""
    import json
    import sys

    import cloudpickle
    import pyarrow.parquet as pq

    from kalm_ray.config import parse_config
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.codec import Codec
    from kalm_ray.stages import imagine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    codec = Codec.for_suite(get_suite("clevr"), n_bins=64)
    monkeypatch.setattr(
        imagine,
        "GenerationSpec",
        lambda **kw: GenerationSpec(**{**kw, "model_dir": json.dumps(codec.to_dict())}),
    )
    generated: list[int] = []

    def counting_generate(ds, **kw):  # rows generated, counted as the driver receives them
        return _counted(scripted_generate(ds, **kw), generated)

    monkeypatch.setattr(imagine, "generate", counting_generate)

    def config(root):
        return parse_config({
            "name": "t", "run_dir": str(root), "env": {"name": "clevr"},
            "imagine": {"backend": "hf", "levels": ["easy", "hard"], "rollouts_per_level": 12,
                        "max_steps": 5, "batch_size": 4, "min_actors": 1, "max_actors": 1},
        })

    def content(root):
        import pyarrow as pa

        parts = sorted((root / "data/imagined").glob("part-*.parquet"))
        rows = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by(
            [("episode_id", "ascending"), ("t", "ascending")]
        )
        report = json.loads((root / "data/imagined/filter_report.json").read_text())
        report.pop("throughput")
        return rows.drop_columns(["generator"]).to_pylist(), report

    ref, run = tmp_path / "ref", tmp_path / "run"
    for root in (ref, run):
        fake_upstream(root, codec)
    imagine.run_imagine(config(ref), str(ref))
    assert sum(generated) == 24
    generated.clear()

    all_, seen = imagine.JudgedStore.all, []

    def interrupted(self, resumed, fresh):
        for b in all_(self, resumed, fresh):
            seen.append(b.num_rows)
            if len(seen) == 2:
                raise KeyboardInterrupt  # what Ctrl-C raises in the driver
            yield b

    monkeypatch.setattr(imagine.JudgedStore, "all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        imagine.run_imagine(config(run), str(run))
    monkeypatch.setattr(imagine.JudgedStore, "all", all_)
    staging = list((run / "data").glob("imagined.partial-*"))
    assert len(staging) == 1 and not (run / "data/imagined").exists()
    n_saved = sum(seen)
    # `auto` resolving to the other backend (another machine) does not resume the hf batches:
    # one output comes from one backend. Stopped again at once; the hf staging stays.
    with monkeypatch.context() as mp:
        mp.setattr(imagine, "resolve_backend", lambda *a, **k: "vllm")
        mp.setattr(imagine.JudgedStore, "all", interrupted)
        seen.clear()
        capsys.readouterr()
        with pytest.raises(KeyboardInterrupt):
            imagine.run_imagine(config(run), str(run))
        assert "resuming" not in capsys.readouterr().out
    assert len(list((run / "data").glob("imagined.partial-*"))) == 2
    generated.clear()
    capsys.readouterr()
    m = imagine.run_imagine(config(run), str(run))
    assert f"imagine: resuming; {n_saved} of 24 requests" in capsys.readouterr().out
    assert m.counts["resumed_rollouts"] == n_saved and sum(generated) == 24 - n_saved
    assert content(run) == content(ref)
    assert not list((run / "data/imagined").glob("judged-*"))
    assert len(list((run / "data").glob("imagined.partial-*"))) == 1  # the vllm one, stopped


def _counted(ds, sink: list[int]):
    """``ds`` with the rows that pass through it counted into ``sink`` (driver side)."""

    class Counted:
        def __init__(self, inner):
            self.inner = inner

        def map_batches(self, *a, **kw):
            return Counted(self.inner.map_batches(*a, **kw))

        def iter_batches(self, **kw):
            for b in self.inner.iter_batches(**kw):
                sink.append(b.num_rows)
                yield b

    return Counted(ds)


@pytest.mark.slow
@pytest.mark.parametrize("compose", [False, True])
def test_run_imagine_with_untrained_tiny_model(ray_local, tmp_path, compose):
    """The real hf backend on the embedded tiny model (untrained: nearly all rejected);
    ``compose``: stepwise hard goals, each part with ``max_steps`` (3 parts at most)."""
    import json

    from kalm_ray.config import parse_config
    from kalm_ray.envs import LEVELS, get_suite
    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.model import build_tiny, set_generation_stops
    from kalm_ray.stages.imagine import run_imagine

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, n_bins=64)
    fake_upstream(tmp_path, codec)
    texts = [w for lv in LEVELS for t in suite.tasks(lv) for w in suite.instructions(lv, t)]
    model, tok = build_tiny(codec, texts, init_from_encoder=False)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    set_generation_stops(tmp_path / "model", tok, codec)
    cfg = parse_config(
        {
            "name": "t",
            "run_dir": str(tmp_path),
            "env": {"name": "clevr"},
            "imagine": {
                "backend": "hf",
                "levels": ["hard"] if compose else ["easy"],
                "rollouts_per_level": 8,
                "max_steps": 3,
                "batch_size": 4,
                "min_actors": 1,
                "max_actors": 2,
                **({"mode": "stepwise", "compose": True} if compose else {}),
            },
        }
    )
    m = run_imagine(cfg, str(tmp_path))
    report = json.loads((tmp_path / "data/imagined/filter_report.json").read_text())
    assert report["requested"] == 8 == m.counts["requested"]
    assert sum(report["reasons"].values()) + report["accepted"] == 8
    assert report["generated_tokens"] > 0 and report["throughput"]["tokens_per_s"] > 0
    longest = 3 * 3 if compose else 1  # hard: 3 parts x max_steps; easy: one push
    assert report["max_new_tokens"] == codec.max_step_tokens() * (longest + 1) + 1


@pytest.mark.gpu
def test_hf_generator_on_gpu(tiny_model):
    """The actor class on CUDA: fp32 matches the CPU greedy outputs, bf16 runs and stops."""
    import torch

    from kalm_ray.llm.imagine.backends.hf import HFGenerator

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    table = _requests_table(8)
    cpu = HFGenerator(_spec(tiny_model), device="cpu")(table).column("generated_text").to_pylist()
    gpu32 = HFGenerator(_spec(tiny_model), device="cuda", dtype="float32")(table)
    same = sum(a == b for a, b in zip(cpu, gpu32.column("generated_text").to_pylist(), strict=True))
    assert same >= 6  # a random model has near-ties that rounding may flip; most rows agree
    bf16 = HFGenerator(_spec(tiny_model), device="auto")
    assert bf16.device == "cuda" and next(bf16.model.parameters()).dtype == torch.bfloat16
    out = bf16(table)
    assert all(0 < c <= 12 for c in out.column("num_generated_tokens").to_pylist())
