"""The imagine stage's plumbing: requests, the hf backend through Ray Data, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kalm_ray.config import ImagineConfig
from kalm_ray.llm.backends import GenerationSpec
from kalm_ray.llm.backends.hf import cut_at_stop, gumbel_scores
from kalm_ray.llm.requests import (
    REQUEST_COLUMNS,
    DataStarts,
    build_requests,
    pick_tasks,
    requests_dataset,
    state_matrix,
)

END = "<eot>"
WORDS = [f"w{i}" for i in range(40)]


def save_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama and a word-level tokenizer, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", END, "go", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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
    args = dict(levels=["easy", "hard"], rollouts_per_level=7, max_tasks_per_level=None, seed=seed,
                starts=fixed_starts, prompt_fn=lambda ins, s: f"{ins} | {s[0]:.0f}")
    args.update(kw)
    return build_requests(ToySuite(), **args)


# ---- requests ------------------------------------------------------------------------------


def test_requests_round_robin_wordings_and_determinism():
    t = make_requests()
    assert t.column_names == list(REQUEST_COLUMNS) and t.num_rows == 14
    rows = t.to_pylist()
    easy = [r for r in rows if r["level"] == "easy"]
    assert [r["task"] for r in easy] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [r["instruction"] for r in easy[:4]] == ["do a please", "do b please", "do c please", "a now"]
    assert len({r["request_id"] for r in rows}) == 14 and len({r["seed"] for r in rows}) == 14
    assert all(r["prompt"] == f"{r['instruction']} | {r['start_state'][0]:.0f}" for r in rows)
    assert make_requests().equals(t)
    assert not make_requests(seed=1).equals(t)


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
    picks = gumbel_scores(logits, torch.rand(logits.shape, generator=gen), temperature=1.0,
                          top_p=1.0).argmax(-1)
    freq = torch.bincount(picks, minlength=3).float() / len(picks)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.02)
    nucleus = gumbel_scores(logits, torch.rand(logits.shape, generator=gen), temperature=1.0,
                            top_p=0.5).argmax(-1)
    assert (nucleus == 0).all()  # 0.6 alone covers the nucleus


def _requests_table(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    prompts = ["go " + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) for _ in range(n)]
    return pa.table({
        "request_id": [f"easy-{i:06d}" for i in range(n)],
        "level": ["easy"] * n, "task": ["a"] * n, "instruction": ["i"] * n,
        "start_state": pa.array([[0.0, 1.0]] * n, pa.list_(pa.float32(), 2)),
        "seed": pa.array(np.arange(n) * 7 + 1, pa.int64()),
        "prompt": prompts,
    })


def _spec(model_dir: Path, temperature: float = 0.0) -> GenerationSpec:
    return GenerationSpec(model_dir=str(model_dir), max_new_tokens=12, end_token=END,
                          temperature=temperature, top_p=0.95,
                          loader="kalm_ray.llm.backends.hf:load_hf_dir")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_hf_generator_in_process(tiny_model):
    from kalm_ray.llm.backends.hf import HFGenerator

    table = _requests_table(6)
    gen = HFGenerator(_spec(tiny_model), device="cpu", num_threads=1)
    out = gen(table)
    assert out.column_names == [*table.column_names, "generated_text", "num_generated_tokens",
                                "num_input_tokens"]
    counts = out.column("num_generated_tokens").to_pylist()
    assert all(0 < c <= 12 for c in counts)
    texts = out.column("generated_text").to_pylist()
    assert all(len(t.split()) == c for t, c in zip(texts, counts))
    # Left padding + KV cache: a request's greedy output does not depend on its batch mates.
    alone = gen(table.slice(2, 1)).column("generated_text").to_pylist()[0]
    assert alone == texts[2]


def test_seeded_sampling_depends_on_the_request_seed_only(tiny_model):
    from kalm_ray.llm.backends.hf import HFGenerator

    table = _requests_table(6)
    gen = HFGenerator(_spec(tiny_model, temperature=1.0), device="cpu", num_threads=1)
    full = gen(table).column("generated_text").to_pylist()
    part = gen(table.slice(3, 3)).column("generated_text").to_pylist()
    assert full[3:] == part
    assert gen(table).column("generated_text").to_pylist() == full


def test_hf_backend_one_actor_equals_two_actors(ray_local, tiny_model):
    from kalm_ray.llm.backends.hf import generate_hf

    table = _requests_table(24)

    def run(n_actors: int) -> list[dict]:
        icfg = ImagineConfig(backend="hf", batch_size=4, min_actors=n_actors, max_actors=n_actors,
                             num_cpus_per_actor=1)
        ds = generate_hf(requests_dataset(table, rows_per_block=4), spec=_spec(tiny_model), icfg=icfg)
        rows = ds.take_all()
        return sorted(({k: r[k] for k in ("request_id", "generated_text", "num_generated_tokens")}
                       for r in rows), key=lambda r: r["request_id"])

    one, two = run(1), run(2)
    assert len(one) == 24 and one == two
