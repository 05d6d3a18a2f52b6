"""Grounding prompts: loss only on targets, tokens survive the tokenizer, split by episode."""

from __future__ import annotations

import numpy as np
import pytest

from kalm_ray.llm.codec import Codec
from kalm_ray.llm.ground.train_fn import batch_collator
from kalm_ray.llm.prompts import (
    IGNORE,
    EpisodeArrays,
    episode_examples,
    episodes_from_table,
    is_heldout,
    labels_for,
    rollout_prompt,
    tokenize_example,
)


@pytest.fixture(scope="module")
def suite():
    from kalm_ray.envs import get_suite

    return get_suite("clevr")


@pytest.fixture(scope="module")
def codec(suite) -> Codec:
    return Codec.for_suite(suite, 256)


@pytest.fixture(scope="module")
def tokenizer(codec):
    from kalm_ray.llm.model import build_tiny_tokenizer

    tok, _ = build_tiny_tokenizer(codec, ["push the red ball behind the blue ball"])
    return tok


def _episode(codec: Codec, t: int, seed: int = 0, eid: str = "ep0") -> EpisodeArrays:
    rng = np.random.default_rng(seed)
    states = rng.uniform(codec.low, codec.high, size=(t + 1, codec.state_dim)).astype(np.float32)
    return EpisodeArrays(
        episode_id=eid,
        task="left:red:blue",
        instruction="Push the red ball left of the blue ball.",
        states=states,
        actions=rng.integers(0, 40, size=t),
    )


def test_labels_mask_prompt_and_padding(codec, tokenizer):
    ep = _episode(codec, 3)
    ids, plen = tokenize_example(
        tokenizer,
        rollout_prompt(codec, ep.instruction, ep.states[0]),
        codec.encode_trajectory(ep.states, ep.actions),
    )
    labels = labels_for(ids, plen)
    assert np.all(labels[:plen] == IGNORE) and np.array_equal(labels[plen:], ids[plen:])
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) - plen == 3 * 11 + 2  # three steps, end token, eos: one id per codec token
    batch = batch_collator(tokenizer)(
        [(np.asarray(ids), plen), (np.asarray(ids[: plen + 2]), plen)]
    )
    batch = {k: v.numpy() for k, v in batch.items()}
    assert np.all(batch["input_ids"][1, plen + 2 :] == tokenizer.pad_token_id)
    assert (
        np.all(batch["labels"][1, plen + 2 :] == IGNORE)
        and batch["attention_mask"][1].sum() == plen + 2
    )
    assert np.array_equal(batch["labels"][0], labels)


def test_target_text_survives_tokenizer(codec, tokenizer):
    ep = _episode(codec, 4)
    ids, plen = tokenize_example(
        tokenizer,
        rollout_prompt(codec, ep.instruction, ep.states[0]),
        codec.encode_trajectory(ep.states, ep.actions),
    )
    text = tokenizer.decode(ids[plen:-1], skip_special_tokens=False)  # what a backend decodes
    states, actions = codec.decode_rollout(ep.states[0], text, max_steps=4)
    assert np.array_equal(actions, ep.actions)
    assert np.all(
        np.abs(states - ep.states) <= (codec.high - codec.low) / (2 * codec.n_bins) + 1e-6
    )


def test_episode_examples_all_tasks_and_shortening(codec, tokenizer):
    ep = _episode(codec, 6)
    rows, dropped = episode_examples(codec, tokenizer, ep, max_seq_len=512)
    assert sorted({r["task"] for r in rows}) == [
        "consequence",
        "dynamics",
        "explain",
        "policy",
        "rollout",
    ]
    assert sum(r["task"] == "dynamics" for r in rows) == 6 and dropped == 0
    # policy: the rollout prompt from every state, its action as the only target.
    pol = [r for r in rows if r["task"] == "policy"]
    acts = tokenizer.convert_tokens_to_ids([codec.encode_action(a)[0] for a in ep.actions])
    assert [r["input_ids"][r["prompt_len"]] for r in pol] == acts
    assert all(len(r["input_ids"]) == r["prompt_len"] + 2 for r in pol)  # action, eos
    every, _ = episode_examples(codec, tokenizer, ep, max_seq_len=512, rollout_starts="every")
    assert sum(r["task"] == "rollout" for r in every) == 6  # one from each of the 6 states
    short, _ = episode_examples(codec, tokenizer, ep, max_seq_len=60)
    roll = next(r for r in short if r["task"] == "rollout")
    assert len(roll["input_ids"]) <= 60 and roll["input_ids"][
        -2
    ] == tokenizer.convert_tokens_to_ids(codec.end_token)


def _transition_table(suite, eps: list[EpisodeArrays]):
    """The collected-data table (``kalm_ray.data.schema``) of train-level episodes."""
    from kalm_ray.data.schema import Episode, episodes_to_table, transition_schema

    rows = [
        Episode(
            episode_id=e.episode_id,
            env="clevr",
            task=e.task,
            level="train",
            instruction=e.instruction,
            states=e.states,
            actions=e.actions,
            rewards=np.zeros(len(e.actions), np.float32),
            successes=np.zeros(len(e.actions), bool),
            terminated=False,
            truncated=True,
        )
        for e in eps
    ]
    return episodes_to_table(rows, transition_schema(10, suite.action_space))


def test_split_is_by_episode(codec, suite):
    eps = [_episode(codec, 3, seed=i, eid=f"e{i}") for i in range(40)]
    table = _transition_table(suite, eps)
    shuffled = episodes_from_table(table.take(np.random.default_rng(0).permutation(len(table))))
    # Episodes come sorted by id, whatever the row order (callers sample them by position).
    assert [e.episode_id for e in shuffled] == sorted(e.episode_id for e in eps)
    back = {e.episode_id: e for e in shuffled}
    assert np.allclose(back["e7"].states, eps[7].states) and np.array_equal(
        back["e7"].actions, eps[7].actions
    )
    held = [is_heldout(e.episode_id, 0.25, 0) for e in eps]
    assert 3 <= sum(held) <= 18 and held == [is_heldout(e.episode_id, 0.25, 0) for e in eps]


def test_lookahead_pushes_add_dynamics_examples_of_other_actions(codec, tokenizer):
    """``ground.lookahead_pushes: k``: k more dynamics examples per state, each the real next
    state of an action the episode did not take, never one whose lookahead is unknown (NaN),
    the same sample every time."""
    from kalm_ray.llm.prompts import dynamics_prompt, lookahead_pairs

    ep = _episode(codec, 4)
    rng = np.random.default_rng(1)
    look = rng.uniform(codec.low, codec.high, size=(4, 40, codec.state_dim)).astype(np.float32)
    look[2] = np.nan  # an epsilon push: the pusher simulated nothing there
    look[0, :35] = np.nan
    ep = EpisodeArrays(**{**ep.__dict__, "lookahead": look})
    pairs = lookahead_pairs(ep, 8)
    assert pairs == lookahead_pairs(ep, 8)
    per_step = {t: [a for s, a in pairs if s == t] for t in range(4)}
    assert [len(v) for v in per_step.values()] == [5 - (int(ep.actions[0]) >= 35), 8, 0, 8]
    assert all(int(ep.actions[t]) not in v for t, v in per_step.items())
    assert all(np.isfinite(look[t, a]).all() for t, a in pairs)
    base, _ = episode_examples(codec, tokenizer, ep, max_seq_len=4096)
    more, _ = episode_examples(codec, tokenizer, ep, max_seq_len=4096, lookahead_pushes=8)
    extra = more[len(base) :]
    assert len(extra) == len(pairs) and {r["task"] for r in extra} == {"dynamics"}
    t, a = pairs[0]
    ids, plen = tokenize_example(
        tokenizer,
        dynamics_prompt(codec, ep.states[t], a),
        codec.join(codec.encode_next_state(ep.states[t], look[t, a])),
    )
    assert extra[0]["input_ids"] == ids and extra[0]["prompt_len"] == plen
    plain = EpisodeArrays(**{**ep.__dict__, "lookahead": None})
    assert lookahead_pairs(plain, 8) == []


def test_relabelled_copies_are_seeded_training_wordings_of_renamed_goals(codec, tokenizer):
    """``ground.relabel_copies``: each copy is the episode under a drawn symmetry, in the same
    template's wording of the renamed goal, the same copies every time."""
    from kalm_ray.envs.clevr.wordings import instructions
    from kalm_ray.llm.prompts import relabelled_copies

    text = instructions("train", "left:red:blue")[4]
    ep = EpisodeArrays(**{**_episode(codec, 3).__dict__, "instruction": text})
    copies = relabelled_copies(ep, 4, seed=0)
    assert [c.episode_id for c in copies] == [f"ep0~r{k}" for k in range(4)]
    assert [c.instruction for c in copies] == [c.instruction for c in relabelled_copies(ep, 4, 0)]
    assert [c.instruction for c in copies] != [c.instruction for c in relabelled_copies(ep, 4, 1)]
    for c in copies:
        assert c.instruction == instructions("train", c.task)[4]
        assert c.states.shape == ep.states.shape and len(c.actions) == len(ep.actions)
        rows, _ = episode_examples(codec, tokenizer, c, max_seq_len=4096)
        assert {r["episode_id"] for r in rows} == {c.episode_id}
    assert relabelled_copies(ep, 0, seed=0) == []


def test_example_builder_relabels_training_episodes_only(codec, tokenizer, suite, tmp_path):
    from kalm_ray.llm.prompts import ExampleBuilder

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    codec_path = str(codec.save(tmp_path))
    eps = [
        EpisodeArrays(
            **{
                **_episode(codec, 2, seed=i, eid=f"e{i}").__dict__,
                "task": task,
                "instruction": suite.instructions("train", task)[i],
            }
        )
        for i, task in enumerate(suite.tasks("train")[:12])
    ]
    table = _transition_table(suite, eps)
    kw = {"heldout_fraction": 0.3, "seed": 0, "max_seq_len": 4096}
    plain = ExampleBuilder(codec_path, str(tmp_path / "tok"), **kw)(table).to_pylist()
    more = ExampleBuilder(codec_path, str(tmp_path / "tok"), relabel_copies=2, **kw)(table)
    more = more.to_pylist()
    held = {r["episode_id"] for r in plain if r["split"] == "heldout"}
    train = {r["episode_id"] for r in plain if r["split"] == "train"}
    assert held and train
    ids = {r["episode_id"] for r in more}
    assert ids == held | train | {f"{e}~r{k}" for e in train for k in range(2)}
    assert all(r["split"] == "train" for r in more if "~r" in r["episode_id"])
    assert len(more) == len(plain) + 2 * sum(r["split"] == "train" for r in plain)


def test_the_tiny_vocabulary_of_all_levels_or_of_the_train_level(suite, codec):
    """``ground.tiny_vocabulary``: the novel levels' words keep a token of their own (as in a
    pretrained LLM's vocabulary), or reach the model in pieces when only the train level's
    wordings choose the tokens; no training wording is tokenized differently."""
    from kalm_ray.llm.model import build_tiny_tokenizer, vocabulary_texts

    every, train = vocabulary_texts(suite), vocabulary_texts(suite, "train")
    assert set(train) < set(every) and all(
        w in every for t in suite.tasks("rephrase") for w in suite.instructions("rephrase", t)
    )
    big, _ = build_tiny_tokenizer(codec, every)
    small, _ = build_tiny_tokenizer(codec, train)
    assert len(big) - len(small) == 26  # word pieces only the novel levels use (CLEVR)
    assert big.tokenize("a marble") == ["a", "marble"]
    assert len(small.tokenize("a marble")) > 2
    assert all(big.tokenize(w) == small.tokenize(w) for w in train[::50])
