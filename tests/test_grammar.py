"""Grammar-constrained decoding, the LLM as a policy, and the replay diagnostic (issues 10, 11).

Real models throughout: an untrained embedded ``tiny`` model with the CLEVR codec (delta
coding, as the pipeline runs). An untrained model is the hard case for the grammar: left
alone it writes anything, so every well-formed rollout below is the mask's doing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kalm_ray.envs import LEVELS, get_suite
from kalm_ray.llm.codec import Codec
from kalm_ray.llm.grammar import (
    ACT,
    ACT_OR_END,
    END,
    STATE_BIN,
    RowGrammar,
    kind_tokens,
    slot_kind,
    step_template,
)

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def clevr_model(tmp_path_factory) -> Path:
    """An untrained tiny model folder with the CLEVR delta codec, as ``ground`` saves one."""
    from kalm_ray.llm.model import build_tiny, set_generation_stops

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, n_bins=64, state_coding="delta")
    texts = [w for lv in LEVELS for t in suite.tasks(lv) for w in suite.instructions(lv, t)]
    model, tok = build_tiny(codec, texts, init_from_encoder=False, overrides=SMALL)
    d = tmp_path_factory.mktemp("grammar") / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    codec.save(d)
    set_generation_stops(d, tok, codec)
    return d


# ---- the grammar as a pure function ------------------------------------------------------------


def test_slot_kinds_follow_the_step_layout():
    codec = Codec.for_suite(get_suite("clevr"), n_bins=64, state_coding="delta")
    t = step_template(codec, np.zeros(10, np.float32))
    assert t.tolist() == [ACT] + [STATE_BIN] * 10
    kinds = [slot_kind(t, p, max_steps=2) for p in range(23)]
    assert kinds[0] == ACT and kinds[1:11] == [STATE_BIN] * 10
    assert kinds[11] == ACT_OR_END and kinds[22] == END
    toks = kind_tokens(codec)
    assert codec.end_token not in toks[ACT] and codec.end_token in toks[ACT_OR_END]
    assert len(toks[STATE_BIN]) == 63  # delta: 2c + 1 usable bins, never the unused top one
    assert RowGrammar.for_request(codec, np.zeros(10), 3).max_tokens() == 34


def test_entity_slots_follow_the_start_state():
    suite = get_suite("metaworld")
    codec = Codec.for_suite(suite, n_bins=32, state_coding="delta")
    start = np.zeros(suite.layout.dim, np.float32)
    name, a, b = codec.entities[0]
    start[a] = 0.3
    t = step_template(codec, start)
    # delta coding: compact steps (the gripper's 4 moving dims, no entity name token)
    assert len(t) == 1 + codec.n_actions + (b - a)
    assert len(step_template(codec, np.zeros_like(start))) == len(t) - (b - a)
    # absolute coding: every dimension of each present entity, led by its name
    absolute = Codec.for_suite(suite, n_bins=32, state_coding="absolute")
    t = step_template(absolute, start)
    assert len(t) == 1 + absolute.n_actions + len(absolute._free) + 1 + (b - a)
    assert len(step_template(absolute, np.zeros_like(start))) == len(t) - 1 - (b - a)


# ---- the hf backend under the grammar -----------------------------------------------------------


def _requests(levels: list[str], n: int) -> pa.Table:
    from functools import partial

    from kalm_ray.llm.imagine.requests import ResetStarts, build_requests
    from kalm_ray.llm.prompts import rollout_prompt

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, n_bins=64, state_coding="delta")
    return build_requests(
        suite,
        levels=levels,
        rollouts_per_level=n,
        max_tasks_per_level=None,
        seed=0,
        starts=ResetStarts(suite),
        prompt_fn=partial(rollout_prompt, codec),
    )


def _generation_spec(model_dir: Path, codec: Codec, *, max_steps: int, **kw):
    """The imagine stage's spec for the fixture model: grammar on, easy = one push."""
    from kalm_ray.llm.imagine.backends import GenerationSpec

    return GenerationSpec(
        model_dir=str(model_dir),
        max_new_tokens=codec.max_step_tokens() * 6 + 1,
        end_token=codec.end_token,
        codec_tokens=tuple(codec.all_tokens),
        max_steps=max_steps,
        level_max_steps=(("easy", 1),),
        **kw,
    )


def _judged_well_formed(out: pa.Table, codec: Codec, *, max_steps: int) -> list[dict]:
    """The judged rows of ``out``, asserting that no rollout is malformed (issue 11)."""
    from kalm_ray.llm.imagine.filter import FilterLimits
    from kalm_ray.llm.imagine.labels import judge_batch

    judged = judge_batch(
        out,
        decoder=codec,
        env="clevr",
        limits=FilterLimits.for_suite(get_suite("clevr"), n_bins=64),
        max_steps=max_steps,
        level_max_steps={"easy": 1},
    ).to_pylist()
    reasons = {r["reason"] for r in judged if not r["accepted"]}
    assert not {"unparseable", "wrong_step_shape", "no_end", "too_long", "empty"} & reasons
    return judged


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_rollout_is_well_formed_and_easy_ones_are_one_step(clevr_model, temperature):
    """Issue 11: 0 unparseable, 0 wrong_step_shape; an easy rollout is one push (issue 10)."""
    from kalm_ray.llm.imagine.backends.hf import HFGenerator

    codec = Codec.load(clevr_model)
    spec = _generation_spec(clevr_model, codec, max_steps=5, temperature=temperature)
    out = HFGenerator(spec, device="cpu", num_threads=1)(_requests(["easy", "hard"], 24))
    judged = _judged_well_formed(out, codec, max_steps=5)
    for r, text in zip(judged, out.column("generated_text").to_pylist(), strict=True):
        states, _ = codec.decode_rollout(r["start_state"], text, max_steps=5)
        assert len(states) - 1 <= (1 if r["level"] == "easy" else 5)
        if r["level"] == "easy":
            assert len(states) == 2


def test_stepwise_rollouts_are_well_formed_stop_at_the_goal_and_ignore_batching(clevr_model):
    """Issue 11, item 3: ``imagine.mode: stepwise`` (policy prompt -> action, dynamics prompt
    -> next state). Every text parses; a rollout ends at its level's limit or at the first
    imagined state meeting its goal, never later; a request's text depends on its seed, not
    on the batch it is generated in."""
    from kalm_ray.llm.imagine.backends.hf import HFGenerator
    from kalm_ray.llm.imagine.labels import goal_reached

    codec = Codec.load(clevr_model)
    suite = get_suite("clevr")
    spec = _generation_spec(
        clevr_model, codec, max_steps=4, temperature=1.0, mode="stepwise", env="clevr"
    )
    gen = HFGenerator(spec, device="cpu", num_threads=1)
    req = _requests(["easy", "rephrase", "hard"], 12)
    out = gen(req)
    texts = out.column("generated_text").to_pylist()
    judged = _judged_well_formed(out, codec, max_steps=4)
    for r, text in zip(judged, texts, strict=True):
        states, _ = codec.decode_rollout(r["start_state"], text, max_steps=4)
        limit = 1 if r["level"] == "easy" else 4
        assert 1 <= len(states) - 1 <= limit
        reached = [goal_reached(suite, r["task"], states[: t + 1]) for t in range(1, len(states))]
        assert not any(reached[:-1])  # stopped at the first imagined success
        assert reached[-1] or len(states) - 1 == limit
    assert sum(out.column("num_generated_tokens").to_pylist()) == sum(
        len(codec._lex(t)[0]) + 1 for t in texts
    )
    # Batching does not change a request's text: the second half alone, in reverse order.
    half = req.slice(req.num_rows // 2).take(list(range(req.num_rows - req.num_rows // 2))[::-1])
    again = gen(half).column("generated_text").to_pylist()
    assert again == texts[req.num_rows // 2 :][::-1]


def test_stepwise_candidates_keep_the_shortest_imagined_success(clevr_model):
    """``imagine.candidates: 4``: each request's text is the candidate (imagined alone from its
    candidate seed) that met its goal in the fewest steps without a step the validity filter
    rejects, the first on ties; when none did, the first valid one, else candidate 0; every
    candidate's tokens count. A rollout the filter would reject stops at its first bad step
    (and stays rejected)."""
    from kalm_ray.llm.imagine.backends.hf import HFGenerator
    from kalm_ray.llm.imagine.backends.stepwise import candidate_seed
    from kalm_ray.llm.imagine.filter import FilterLimits, check_text
    from kalm_ray.llm.imagine.labels import goal_reached

    codec, suite, k = Codec.load(clevr_model), get_suite("clevr"), 4
    limits = FilterLimits.for_suite(suite, n_bins=64)
    spec = _generation_spec(
        clevr_model,
        codec,
        max_steps=4,
        temperature=1.0,
        mode="stepwise",
        env="clevr",
        limits=limits,
    )
    one = HFGenerator(spec, device="cpu", num_threads=1)
    many = HFGenerator(dataclasses.replace(spec, candidates=k), device="cpu", num_threads=1)
    req = _requests(["easy", "rephrase"], 16)  # easy: one push, ~10% of them meet the goal
    got = many(req)
    seeds = req.column("seed").to_pylist()
    alone = [
        one(
            req.set_column(
                req.schema.get_field_index("seed"),
                "seed",
                pa.array([candidate_seed(s, j) for s in seeds], pa.int64()),
            )
        )
        for j in range(k)
    ]
    assert alone[0].column("generated_text").equals(one(req).column("generated_text"))
    for i, r in enumerate(req.to_pylist()):
        texts = [a.column("generated_text")[i].as_py() for a in alone]
        limit = 1 if r["level"] == "easy" else 4
        steps, valid = [], []
        for t in texts:
            states, _ = codec.decode_rollout(r["start_state"], t, max_steps=4)
            ok = check_text(codec, r["start_state"], t, limits=limits, max_steps=4)
            if not ok.accepted and ok.reason != "no_progress":
                # stopped at its first rejected step: every step before it passes
                toks = codec._lex(t)[0]
                if len(states) > 2:
                    before = codec.join([*toks[:-11], codec.end_token])  # 11 tokens a step
                    v = check_text(codec, r["start_state"], before, limits=limits, max_steps=4)
                    assert v.accepted or v.reason == "no_progress"
            elif not goal_reached(suite, r["task"], states):
                assert len(states) - 1 == limit  # a valid rollout runs to its goal or its limit
            good = ok.accepted and goal_reached(suite, r["task"], states)
            steps.append(len(states) - 1 if good else None)
            valid.append(ok.accepted or ok.reason == "no_progress")
        done = [(n, j) for j, n in enumerate(steps) if n is not None]
        best = min(done)[1] if done else next((j for j, v in enumerate(valid) if v), 0)
        assert got.column("generated_text")[i].as_py() == texts[best]
        assert got.column("num_generated_tokens")[i].as_py() == sum(
            a.column("num_generated_tokens")[i].as_py() for a in alone
        )


def _open_limits(suite):
    """The filter's limits with the bounds and step checks opened: the untrained model writes
    random next states, which those reject at once whatever is drawn; with them opened, balls
    pushed into each other (``overlap``) end every plain rollout within four steps."""
    from kalm_ray.llm.imagine.filter import FilterLimits

    return dataclasses.replace(
        FilterLimits.for_suite(suite, n_bins=64, bounds_tolerance=10.0, step_tolerance=10.0),
        max_step_total=None,
        reach_low=None,
        reach_high=None,
    )


def _side_by_side(req: pa.Table, *outs: pa.Table):
    """``(request row, each output's text)`` per request."""
    for i, r in enumerate(req.to_pylist()):
        yield r, *(o.column("generated_text")[i].as_py() for o in outs)


def test_state_retries_redraw_only_the_rejected_next_states(clevr_model):
    """``imagine.state_retries``: a next state the validity filter would reject is drawn again
    from the dynamics prompt (sampled) before the rollout stops. A rollout whose greedy states
    all pass is the same text as without retries (its actions come from their own stream); one
    that was rejected keeps every step before the rejected one and that step's action, and then
    goes on from a state the filter accepts, or stops as before. Redrawn tokens count as
    generated."""
    from kalm_ray.llm.imagine.backends.hf import HFGenerator
    from kalm_ray.llm.imagine.filter import check_text

    codec, suite = Codec.load(clevr_model), get_suite("clevr")
    limits = _open_limits(suite)  # some redraws pass
    spec = _generation_spec(
        clevr_model, codec, max_steps=4, temperature=1.0, mode="stepwise", env="clevr",
        limits=limits,
    )
    req = _requests(["easy", "rephrase", "hard"], 12)  # easy: one push, which passes
    plain = HFGenerator(spec, device="cpu", num_threads=1)(req)
    retried = HFGenerator(
        dataclasses.replace(spec, state_retries=4, state_temperature=1.0), device="cpu",
        num_threads=1,
    )(req)
    step = codec.max_step_tokens()
    same = rescued = 0
    for i, (r, a, b) in enumerate(_side_by_side(req, plain, retried)):
        va = check_text(codec, r["start_state"], a, limits=limits, max_steps=4)
        vb = check_text(codec, r["start_state"], b, limits=limits, max_steps=4)
        ta, tb = codec._lex(a)[0][:-1], codec._lex(b)[0][:-1]  # without the end token
        if va.accepted or va.reason == "no_progress":
            assert b == a
            same += 1
            continue
        kept = len(ta) - step  # every step before the rejected one (the last), and its action
        assert tb[: kept + 1] == ta[: kept + 1]
        rescued += len(tb) > len(ta) or vb.accepted or vb.reason == "no_progress"
        assert retried.column("num_generated_tokens")[i].as_py() > len(tb) + 1  # redraws count
    assert same > 0 and rescued > 0


def test_action_retries_imagine_a_rejected_step_again_with_another_action(clevr_model):
    """``imagine.action_retries``: a step the validity filter would reject is imagined again
    from the same state with a newly sampled action (its own stream) and its greedy next state.
    A rollout whose steps all pass is the same text as without retries; one that was rejected
    keeps every step before the rejected one, then goes on with an action the filter accepts or
    stops as before. The dropped steps' tokens count as generated.

    The untrained model's greedy next states hardly depend on the action, so the filter here
    also rejects every even action (the real one still judges the states): then a new action
    can pass where the old one did not."""
    from kalm_ray.llm.imagine.backends.hf import HFGenerator
    from kalm_ray.llm.imagine.filter import check_text

    codec, suite = Codec.load(clevr_model), get_suite("clevr")
    limits = _open_limits(suite)
    spec = _generation_spec(
        clevr_model, codec, max_steps=4, temperature=1.0, mode="stepwise", env="clevr",
        limits=limits,
    )

    def odd_actions_only(gen):
        judge = gen.stepwise.judge

        def strict(states, acts, action, toks):
            nxt, ok = judge(states, acts, action, toks)
            return nxt, ok and int(action) % 2 == 1

        gen.stepwise.judge = strict
        return gen

    def odd(text):
        acts = codec.decode_rollout(np.zeros(codec.state_dim), text, max_steps=4)[1]
        return all(int(a) % 2 == 1 for a in acts)

    req = _requests(["easy", "rephrase", "hard"], 12)
    plain = odd_actions_only(HFGenerator(spec, device="cpu", num_threads=1))(req)
    retried = odd_actions_only(
        HFGenerator(dataclasses.replace(spec, action_retries=4), device="cpu", num_threads=1)
    )(req)
    step = codec.max_step_tokens()
    same = rescued = 0
    for i, (r, a, b) in enumerate(_side_by_side(req, plain, retried)):
        va = check_text(codec, r["start_state"], a, limits=limits, max_steps=4)
        ta, tb = codec._lex(a)[0], codec._lex(b)[0]  # the steps' tokens (no end token)
        if (va.accepted or va.reason == "no_progress") and odd(a):
            assert b == a
            same += 1
            continue
        kept = len(ta) - step  # every step before the rejected one (the last)
        assert tb[:kept] == ta[:kept]
        vb = check_text(codec, r["start_state"], b, limits=limits, max_steps=4)
        if (vb.accepted or vb.reason == "no_progress") and odd(b):
            rescued += 1
            assert tb[kept] != ta[kept]  # another action at the rejected step
        assert retried.column("num_generated_tokens")[i].as_py() > len(tb) + 1
    assert same > 0 and rescued > 0


def test_hold_up_takes_each_requests_shortest_success_that_holds_up(monkeypatch):
    """``imagine.consistency_draws``: a request's successful candidates are tried shortest
    first, and the first whose draws reach the goal often enough is its success; where none
    does, every success is passed over. The draws' tokens are added to the candidates'."""
    from kalm_ray.llm.imagine.backends.stepwise import StepwiseImaginer, choose

    imaginer = StepwiseImaginer(
        None, None, None, suite=None, temperature=1.0, top_p=1.0, consistency_draws=4,
        consistency_min=0.5,
    )
    share = {0: 0.25, 1: 0.75, 2: 1.0, 4: 0.0, 5: 0.25, 7: 1.0}  # candidate row -> draws at goal
    asked: list[list[int]] = []

    def draws_reaching(paths, tasks, seeds):
        asked.append([p[0] for p in paths])
        return [(share[p[0]], 10, 1) for p in paths]  # 10 tokens generated, 1 read

    monkeypatch.setattr(imaginer, "draws_reaching", draws_reaching)
    # two requests of four candidates: steps to the goal (None: no success)
    steps = [3, 2, 1, None, 1, 2, None, 5]
    counts, n_in = [0] * 8, [0] * 8
    paths = [(r, None) for r in range(8)]
    held = imaginer.hold_up(steps, paths, ["t"] * 8, list(range(8)), counts, n_in, 4)
    # request 0: 2 (1 step) holds up at once; request 1: 4 (1 step) fails, 5 (2) fails, 7 holds
    assert asked == [[2, 4], [5], [7]]
    assert held == [None, None, 1, None, None, None, None, 5]
    assert [choose(held[:4], [True] * 4), choose(held[4:], [True] * 4)] == [2, 3]
    assert counts == [0, 0, 10, 0, 10, 10, 0, 10] and n_in == [0, 0, 1, 0, 1, 1, 0, 1]
    share[7] = 0.25  # request 1 then has no success that holds up
    held = imaginer.hold_up(steps, paths, ["t"] * 8, list(range(8)), [0] * 8, [0] * 8, 4)
    assert held[4:] == [None] * 4


def test_consistency_draws_mark_doubtful_successes_and_keep_them_out(clevr_model, tmp_path):
    """With ``consistency_draws``, a request whose returned text meets its goal without
    holding up is ``doubtful``; the stage then counts it apart and keeps it out of the data.
    The draws are seeded (the same requests give the same texts and flags), and their tokens
    count as generated."""
    from kalm_ray.llm.imagine.backends.hf import HFGenerator
    from kalm_ray.llm.imagine.labels import goal_reached

    codec, suite = Codec.load(clevr_model), get_suite("clevr")
    spec = _generation_spec(
        clevr_model, codec, max_steps=4, temperature=1.0, mode="stepwise", env="clevr",
        candidates=4,
    )
    req = _requests(["easy"], 48)  # one push each: ~10% of the untrained model's meet the goal
    plain = HFGenerator(spec, device="cpu", num_threads=1)(req)
    checked_spec = dataclasses.replace(spec, consistency_draws=4, consistency_min=1.0)
    checked = HFGenerator(checked_spec, device="cpu", num_threads=1)(req)
    again = HFGenerator(checked_spec, device="cpu", num_threads=1)(req)
    assert checked.equals(again)
    assert not any(plain.column("doubtful").to_pylist())
    met = []
    for i, r in enumerate(req.to_pylist()):
        text = checked.column("generated_text")[i].as_py()
        states, _ = codec.decode_rollout(r["start_state"], text, max_steps=1)
        met.append(goal_reached(suite, r["task"], states))
        if checked.column("doubtful")[i].as_py():
            assert met[-1]
        assert (
            checked.column("num_generated_tokens")[i].as_py()
            >= plain.column("num_generated_tokens")[i].as_py()
        )
    assert any(met) and any(checked.column("doubtful").to_pylist())

    # The stage's accounting: doubtful rows are accepted, neither successful nor kept, and
    # the replay check counts them apart (the untrained model's states need open limits).
    from kalm_ray.artifacts import RunDir
    from kalm_ray.data.schema import transition_schema
    from kalm_ray.llm.imagine.filter import FilterTally
    from kalm_ray.llm.imagine.labels import judge_batch
    from kalm_ray.llm.imagine.replay import Replayer, ReplayTally
    from kalm_ray.llm.imagine.store import write_rollouts

    judged = judge_batch(
        checked, decoder=codec, env="clevr", limits=_open_limits(suite),
        max_steps=4, level_max_steps={"easy": 1},
    )
    rows = judged.to_pylist()
    doubtful = sum(r["accepted"] and r["doubtful"] for r in rows)
    taken = sum(r["accepted"] and r["success"] and not r["doubtful"] for r in rows)
    assert doubtful > 0
    run = RunDir(str(tmp_path))
    (tmp_path / "out").mkdir()
    tally, replay, replayer = FilterTally(), ReplayTally(), Replayer(suite)
    stats = write_rollouts(
        [judged], run=run, folder="out", tally=tally, total=judged.num_rows,
        schema=transition_schema(suite.layout.dim, suite.action_space), env="clevr",
        generator={}, keep_failures=False, replayer=replayer, replay=replay,
    )
    replayer.close()
    easy = tally.report()["per_level"]["easy"]
    assert easy["doubtful"] == doubtful and easy["successful"] == easy["kept"] == taken
    assert stats["episodes_written"] == taken
    seen = replay.report()["per_level"]["easy"]
    assert seen["doubtful"]["imagined_successes"] == doubtful
    assert seen["rollouts"] == sum(r["accepted"] for r in rows) - doubtful
    from kalm_ray.eval.report import _replay_section

    (tmp_path / "data" / "imagined").mkdir(parents=True)
    run.write_json({"replay": replay.report()}, "data", "imagined", "filter_report.json")
    table = _replay_section(run)
    text = table if isinstance(table, str) else table[0]
    assert f"easy: {doubtful} (" in text and "did not hold up" in text


def test_compose_prompts_each_step_with_the_first_part_that_does_not_hold(clevr_model):
    """``imagine.compose``: a hard multi-relation goal is imagined part by part. Each part gets
    ``max_steps`` (a request's limit is that times its parts), the rollout stops at the first
    imagined state where the whole goal holds, and the first action is the one the model
    writes when prompted with the wording of the first part that does not hold at the start
    (greedy: the plain loop under that wording gives the same action)."""
    from kalm_ray.llm.imagine.backends.hf import HFGenerator
    from kalm_ray.llm.imagine.backends.stepwise import part_wordings
    from kalm_ray.llm.imagine.labels import goal_reached

    codec, suite = Codec.load(clevr_model), get_suite("clevr")
    spec = dataclasses.replace(
        _generation_spec(clevr_model, codec, max_steps=2, mode="stepwise", env="clevr"),
        compose=True,
        level_max_steps=(("easy", 1), ("hard", 6)),
    )
    req = _requests(["hard"], 12)  # the first 12 hard goals: two relations each
    out = HFGenerator(spec, device="cpu", num_threads=1)(req)
    judged = _judged_well_formed(out, codec, max_steps=6)
    first_words = []
    for r, text in zip(judged, out.column("generated_text").to_pylist(), strict=True):
        parts = part_wordings(suite, r["task"], r["seed"])
        assert [p for p, _ in parts] == suite.parts(r["task"]) and len(parts) == 2
        assert all(w in suite.instructions("train", p) for p, w in parts)
        start = np.asarray(r["start_state"], np.float32)
        first_words.append(next(w for p, w in parts if not suite.success(p, start, start)))
        states, _ = codec.decode_rollout(start, text, max_steps=6)
        assert 1 <= len(states) - 1 <= 2 * len(parts)
        reached = [goal_reached(suite, r["task"], states[: t + 1]) for t in range(1, len(states))]
        assert not any(reached[:-1]) and (reached[-1] or len(states) - 1 == 4)
    plain = dataclasses.replace(spec, compose=False, level_max_steps=(("hard", 1),))
    reworded = req.set_column(
        req.schema.get_field_index("instruction"), "instruction", pa.array(first_words)
    )
    again = HFGenerator(plain, device="cpu", num_threads=1)(reworded)
    for r, a, b in zip(
        judged,
        out.column("generated_text").to_pylist(),
        again.column("generated_text").to_pylist(),
        strict=True,
    ):
        first = codec.decode_rollout(r["start_state"], a, max_steps=6)[1][0]
        assert first == codec.decode_rollout(r["start_state"], b, max_steps=1)[1][0]


def test_compose_wording_is_the_first_part_that_does_not_hold():
    """The rule the test above checks end to end, on hand-placed balls."""
    from kalm_ray.llm.imagine.backends.stepwise import StepwiseImaginer

    suite = get_suite("clevr")
    imaginer = StepwiseImaginer(None, None, None, suite=suite, temperature=0.0, top_p=1.0)
    parts = [("left:red:blue", "A"), ("behind:green:blue", "B")]
    blue = np.array([0.0, 0.2])
    state = np.zeros(10, np.float32)
    state[2:4] = blue
    state[0:2] = blue + [0.8, 0.0]  # red far right of blue: neither part holds
    state[4:6] = blue + [0.0, -0.3]  # green in front of blue
    state[6:8], state[8:10] = [-0.4, 0.5], [0.4, 0.5]
    assert imaginer.wording("own", parts, state, state) == "A"
    state[0:2] = blue + [-0.3, 0.0]  # red left of blue: the first part holds
    assert imaginer.wording("own", parts, state, state) == "B"
    assert imaginer.wording("own", [], state, state) == "own"  # one-part goals keep their own


def test_candidate_choice_is_the_shortest_success_first_on_ties():
    """The rule the test above checks end to end (an untrained model meets its goal at the
    same step in every candidate or in none, so the rule's order is pinned here)."""
    from kalm_ray.llm.imagine.backends.stepwise import candidate_seed, choose

    ok4 = [True] * 4
    assert choose([None, 3, 2, 2], ok4) == 2 and choose([4, 1], [True, True]) == 1
    assert choose([1, 1], [True, True]) == 0
    assert choose([None, None, None], [False, True, True]) == 1  # no success: first valid
    assert choose([None, None], [False, False]) == 0
    assert candidate_seed(7, 0) == 7
    assert len({candidate_seed(7, j) for j in range(1, 50)} | {7}) == 50
    assert all(0 <= candidate_seed(2**62, j) < 2**63 for j in range(5))


def test_grammar_off_leaves_an_untrained_model_unconstrained(clevr_model):
    """The premise of the test above: without the mask this model writes malformed text."""
    from kalm_ray.llm.imagine.backends import GenerationSpec
    from kalm_ray.llm.imagine.backends.hf import HFGenerator
    from kalm_ray.llm.imagine.filter import check_text

    codec = Codec.load(clevr_model)
    spec = GenerationSpec(
        model_dir=str(clevr_model),
        max_new_tokens=40,
        end_token=codec.end_token,
        grammar=False,
    )
    req = _requests(["hard"], 8)
    out = HFGenerator(spec, device="cpu", num_threads=1)(req)
    from kalm_ray.llm.imagine.filter import FilterLimits

    limits = FilterLimits.for_suite(get_suite("clevr"), n_bins=64)
    verdicts = [
        check_text(codec, s, t, limits=limits, max_steps=5)
        for s, t in zip(
            req.column("start_state").to_pylist(),
            out.column("generated_text").to_pylist(),
            strict=True,
        )
    ]
    assert not any(v.accepted for v in verdicts)


# ---- the LLM as a policy ------------------------------------------------------------------------


def test_llm_policy_emits_only_legal_actions_on_every_step(clevr_model):
    """Issue 10: closed loop on the real env, one legal action per step, every level."""
    from kalm_ray.eval.episodes import EpisodeSpec, run_episodes
    from kalm_ray.llm.policy import LLMPolicy

    suite = get_suite("clevr")
    policy = LLMPolicy(str(clevr_model), device="cpu")
    seen: list[np.ndarray] = []
    act = policy.act_instructed

    def recording(states, wordings):
        a = act(states, wordings)
        seen.append(np.asarray(a))
        return a

    policy.act_instructed = recording  # type: ignore[method-assign]
    specs = []
    for lv in LEVELS:
        for task in suite.tasks(lv)[:2]:
            specs.append(EpisodeSpec(len(specs), lv, task, suite.instructions(lv, task)[0], 7))
    envs: dict = {}

    def get_env(slot, spec):
        return envs.setdefault((slot, spec.level), suite.make_env(spec.level, max_episode_steps=6))

    res = run_episodes(
        policy, specs, get_env=get_env, embeddings={}, make_obs=None, n_envs=3, max_steps=6
    )
    assert len(res) == len(specs) and seen
    actions = np.concatenate(seen)
    assert actions.dtype == np.int64 and ((actions >= 0) & (actions < 40)).all()
    assert sum(r.length for r in res) == len(actions)
    assert all(r.length == 1 for r, s in zip(res, specs, strict=True) if s.level == "easy")


# ---- replay: imagined rollouts checked against the simulator -----------------------------------


def test_replay_of_a_real_episode_agrees_and_a_perturbed_one_does_not():
    """Issue 10: an "imagined" rollout copied from a real episode replays exactly."""
    from kalm_ray.envs.clevr import scripted
    from kalm_ray.llm.imagine.replay import Replayer, ReplayTally

    suite = get_suite("clevr")
    env = suite.make_env("train")
    task = suite.tasks("train")[5]
    expert = scripted.ScriptedPolicy(task)
    tally, perturbed = ReplayTally(), ReplayTally()
    replayer = Replayer(suite)
    assert replayer.placeable
    for ep in range(4):
        s, _ = env.reset(seed=ep, options={"task": task})
        states, actions, ok = [s], [], False
        for _ in range(6):
            a = int(expert.act(env))
            s, _, term, _, info = env.step(a)
            states.append(s)
            actions.append(a)
            ok |= bool(info["success"])
            if term:
                break
        states = np.stack(states)
        rep, rep_ok = replayer.replay(level="train", task=task, start=states[0], actions=actions)
        assert rep_ok == ok
        kw = dict(level="train", task=task, instruction="x", imagined_success=ok)
        tally.add(imagined=states, replayed=rep, replayed_success=rep_ok, **kw)
        bent = states.copy()
        bent[1:, 0] += 0.05
        perturbed.add(imagined=bent, replayed=rep, replayed_success=rep_ok, **kw)
    replayer.close()
    r = tally.report()["per_level"]["train"]
    assert r["imagined_success_rate"] > 0  # the expert reaches its goal: agreement is defined
    assert r["agreement"] == 1.0 and r["mean_state_error"] < 1e-5
    by_steps = r["agreement_by_steps"]
    assert sum(b["imagined_successes"] for b in by_steps.values()) == round(
        4 * r["imagined_success_rate"]
    )
    assert all(b["confirmed"] == b["imagined_successes"] for b in by_steps.values())
    assert perturbed.report()["per_level"]["train"]["mean_state_error"] > 0.005


def test_replay_agreement_by_imagined_length_in_the_report(tmp_path):
    """The tally splits agreement by the imagined success's length; the report shows it."""
    from kalm_ray.artifacts import RunDir
    from kalm_ray.eval.report import _replay_section
    from kalm_ray.llm.imagine.replay import ReplayTally

    tally = ReplayTally()
    for steps, im_ok, rep_ok in [
        (1, True, True),
        (1, True, True),
        (3, True, False),
        (3, True, True),
        (3, False, True),
        (5, True, False),
    ]:
        states = np.zeros((steps + 1, 10), np.float32)
        tally.add(
            level="rephrase",
            task="t",
            instruction="x",
            imagined=states,
            replayed=states,
            imagined_success=im_ok,
            replayed_success=rep_ok,
        )
    r = tally.report()
    assert r["per_level"]["rephrase"]["agreement_by_steps"] == {
        "1": {"imagined_successes": 2, "confirmed": 2},
        "3": {"imagined_successes": 2, "confirmed": 1},
        "5": {"imagined_successes": 1, "confirmed": 0},
    }
    run = RunDir(str(tmp_path))
    run.write_json({"replay": r}, "data", "imagined", "filter_report.json")
    table, _ = _replay_section(run)
    assert "rephrase: 1: 100% (2), 3: 50% (2), 5: 0% (1)" in table
