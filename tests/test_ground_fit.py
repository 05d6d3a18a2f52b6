"""Grounding that fits a GPU and trains what it must (issue 16 points 4, 5, 8): the codec's
output rows on untied models, gradient checkpointing, and each worker's own CPU threads."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import loop_config

CHANGED = 1e-6


def _untied_copy(prepared, dst):
    """The prepared (tied) tiny base with ``lm_head`` made a matrix of its own, like Llama-2."""
    import torch
    from transformers import AutoModelForCausalLM

    src = prepared["root"] / "base"
    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(dst)
    assert json.loads((dst / "config.json").read_text())["tie_word_embeddings"] is False
    return dst


def test_lora_trains_codec_output_rows_of_untied_models(prepared, tmp_path):
    """Point 5: PEFT's trainable tokens on ``embed_tokens`` reach ``lm_head`` only when tied;
    the added codec tokens' output rows must train too."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kalm_ray.llm.ground.train_fn import train_loop
    from kalm_ray.llm.model import codec_token_ids

    base = _untied_copy(prepared, tmp_path / "untied")
    cfg = loop_config(
        prepared,
        base=str(base),
        method="lora",
        lr=5e-2,
        max_steps=3,
        checkpoint_dir=str(tmp_path / "ckpt"),
        output_dir=str(tmp_path / "out"),
        info={"method": "lora", "base": "base", "adapter_servable": False},
    )
    train_loop(cfg)
    ids = torch.tensor(codec_token_ids(AutoTokenizer.from_pretrained(base), prepared["codec"]))
    before = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert not after.config.tie_word_embeddings
    other = torch.ones(before.lm_head.weight.shape[0], dtype=torch.bool)
    other[ids] = False
    moved = (after.lm_head.weight - before.lm_head.weight).abs()
    assert moved[ids].max() > CHANGED  # the codec's output rows learned
    assert moved[other].max() <= CHANGED  # and nothing else of the output layer did
    emb_moved = (after.get_input_embeddings().weight - before.get_input_embeddings().weight).abs()
    assert emb_moved[ids].max() > CHANGED


def test_codec_row_targets_tied_and_untied(prepared, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from kalm_ray.llm.ground.train_fn import codec_row_targets

    tied = AutoModelForCausalLM.from_pretrained(prepared["root"] / "base", dtype=torch.float32)
    assert codec_row_targets(tied, [3, 4]) == {"embed_tokens": [3, 4]}  # PEFT ties lm_head
    untied = AutoModelForCausalLM.from_pretrained(
        _untied_copy(prepared, tmp_path / "u"), dtype=torch.float32
    )
    assert codec_row_targets(untied, [3, 4]) == {"embed_tokens": [3, 4], "lm_head": [3, 4]}


def test_gradient_checkpointing_is_applied(prepared, tmp_path, monkeypatch):
    """Point 4: on by config (and by default on GPU); training still runs and resumes."""
    from transformers import PreTrainedModel

    from kalm_ray.llm.ground.train_fn import train_loop

    calls = []
    name = next(
        n
        for n in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
        if hasattr(PreTrainedModel, n)
    )
    real = getattr(PreTrainedModel, name)

    def spy(self, *a, **kw):
        calls.append(next(iter(kw.values())))
        return real(self, *a, **kw)

    monkeypatch.setattr(PreTrainedModel, name, spy)
    for method in ("lora", "full"):
        out = train_loop(
            loop_config(
                prepared,
                method=method,
                max_steps=2,
                gradient_checkpointing=True,
                checkpoint_dir=str(tmp_path / method),
                info={"method": method, "base": "base", "adapter_servable": False},
            )
        )
        assert out["step"] == 2 and out["loss"] > 0
    assert calls == [{"use_reentrant": False}] * 2
    train_loop(loop_config(prepared, max_steps=1, checkpoint_dir=str(tmp_path / "off")))
    assert len(calls) == 2  # off on CPU unless asked for


def test_worker_threads_come_from_the_workers_own_cpus(ray_local):
    """Point 8: a Ray worker sets its torch threads from the CPUs Ray gave it."""
    import os

    from kalm_ray.llm.ground.train_fn import worker_threads

    @ray_local.remote(num_cpus=3)
    def in_worker() -> int:
        return worker_threads({"cpu_threads": None}, in_ray=True, world=4)

    assert ray_local.get(in_worker.remote()) == 3
    assert worker_threads({"cpu_threads": 5}, in_ray=True, world=4) == 5
    assert worker_threads({}, in_ray=False, world=1) == max(1, os.cpu_count() or 1)


@pytest.mark.parametrize("n", [None, 2])
def test_ground_config_sizes_workers(n):
    from kalm_ray.config import GroundConfig

    g = GroundConfig(num_cpus_per_worker=n)
    assert g.num_cpus_per_worker == n and g.gpu_memory_gib == 40.0
    assert "num_cpus_per_worker" not in g.hashed_dump()  # sizing never changes the output


def test_acting_note_only_when_the_llm_is_not_ahead_of_random():
    from kalm_ray.llm.ground.fit import acting_note

    assert acting_note({"policy_llm_success": 0.88, "policy_random_success": 0.44}) is None
    assert acting_note({}) is None  # no LLM-as-policy metrics (e.g. Meta-World): nothing to say
    for llm in (0.28, 0.44):  # behind random, and level with it
        note = acting_note({"policy_llm_success": llm, "policy_random_success": 0.44})
        assert f"({llm:.2f})" in note and "(0.44)" in note
        assert "memorised" not in note and "no better" not in note  # no seen NLL: no diagnosis
    # With the action NLL on states it trained on: memorised (quick, seed 0), or fits them no
    # better than unseen ones (quick's recipe without plans, 16 relabelled copies).
    base = {"policy_llm_success": 0.28, "policy_random_success": 0.44}
    memo = acting_note({**base, "policy_action_nll": 3.35, "seen_policy_action_nll": 2.35})
    assert "memorised the actions of the states it trained on (NLL 2.35 there, 3.35" in memo
    none = acting_note({**base, "policy_action_nll": 2.94, "seen_policy_action_nll": 2.85})
    assert "fits the actions of the states it trained on no better than held-out ones" in none
    assert "(NLL 2.85 there, 2.94 held out)" in none
