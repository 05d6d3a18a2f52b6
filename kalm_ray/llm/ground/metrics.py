"""Grounding metrics on the held-out episodes (split by episode, never seen in training).

- dynamics: greedy next-state prediction; mean absolute error in env units over the state
  dimensions, against the copy-the-state baseline ``|s - s'|`` on the same transitions, and
  the share of these one-step predictions the imagine stage's validity filter rejects
  (:func:`dynamics_metrics`);
- explanation: exact match of the generated instruction (token ids) and teacher-forced
  token accuracy on the instruction tokens;
- generation: rollouts generated from (instruction, start state) under the codec's grammar
  (as the imagine stage generates them): the fraction that decode
  (``Codec.decode_rollout``), the decode-failure reasons, and the fraction whose goal holds
  at the final state by the suite's success rule (:func:`kalm_ray.envs.success.goal_reached`:
  composite tasks need their stages in order); the real episodes' own success rate is
  given for reference;
- action (a smooth measure of the same): on every held-out transition, the demonstrator's
  action's negative log-likelihood under the policy prompt, over the codec's action tokens,
  and how often it is the model's most likely one (:func:`action_metrics`). Closed-loop
  success over 64 episodes moves by +-12 points between two draws of the same model; this
  moves by hundredths, so it ranks two groundings that the episodes cannot tell apart
  (measured on `configs/cpu.yaml`: 1.80-2.04 where the LLM acts at 98-100%, 2.39-2.43 at
  39-52%, ~2.95 at the quick budget's 17-28%; uniform 3.69);
- policy (the measure of whether grounding made a policy): the grounded LLM run closed loop
  in the simulator (:class:`kalm_ray.llm.policy.LLMPolicy`) from held-out episodes' real
  starts with their instructions, next to the uniform-random policy on the same starts; and
  the same from training episodes' starts, and with a rephrased wording of the same goals
  (:func:`policy_metrics`). Where the env cannot be placed at a given state (no
  ``set_state``) it is skipped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from kalm_ray.envs.success import goal_reached
from kalm_ray.llm.codec import Codec, CodecError
from kalm_ray.llm.imagine.filter import FilterLimits, physical_rejection
from kalm_ray.llm.model import codec_token_ids
from kalm_ray.llm.prompts import (
    EpisodeArrays,
    dynamics_prompt,
    episodes_from_table,
    explain_prompt,
    rollout_prompt,
)


def read_episodes(path: str) -> list[EpisodeArrays]:
    """Episodes of a folder (or file) of transition Parquet; empty when there is none."""
    import pyarrow.dataset as pads

    from kalm_ray.localcopy import filesystem_of

    try:
        fs, where = filesystem_of(path) if "://" in path else (None, path)
        table = pads.dataset(where, format="parquet", filesystem=fs).to_table()
    except (FileNotFoundError, OSError):
        return []
    return episodes_from_table(table) if table.num_rows else []


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: str,
    stop_ids: list[int],
    grammar: tuple[Codec, list[Any]] | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, cut after the first stop id), batched with KV cache.

    ``grammar``: the codec and one :class:`~kalm_ray.llm.grammar.RowGrammar` per prompt, to
    decode under the codec's grammar as the imagine stage does.
    """
    from kalm_ray.llm.imagine.backends.hf import GrammarMask, decode

    out: list[list[int]] = []
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
        procs = []
        if grammar is not None:
            rows = grammar[1][i : i + batch_size]
            procs.append(GrammarMask(tokenizer, grammar[0], rows, n_positions=max_new_tokens))
        gen = decode(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            pad_id=pad,
            processors=procs,
            stop_ids=stop_ids,
        )
        for row in gen.tolist():
            cut = next((j for j, t in enumerate(row) if t in stop_ids), None)
            out.append(row if cut is None else row[: cut + 1])
    return out


def _strip(ids: list[int], drop: set[int]) -> list[int]:
    return [t for t in ids if t not in drop]


def dynamics_metrics(
    model: Any,
    tokenizer: Any,
    codec: Codec,
    transitions: list[tuple],
    *,
    batch_size: int,
    device: str,
    limits: FilterLimits | None = None,
) -> dict[str, float]:
    """Next-state error vs copy-the-state on ``(state, action, next_state)`` triples.

    Errors are means over the dimensions a step can change (``codec.moving_dims``: CLEVR all
    10; Meta-World the gripper and the task's moving entity axes), never over absent slots
    or a fixed goal, whose zero error would make any model look as good as copying.

    With ``limits`` (the validity filter's), ``dynamics_rejected`` is the share of these
    one-step predictions, each from a real state, that the filter rejects (an undecodable one
    counts; ``no_progress`` does not: it judges whole rollouts), and ``dynamics_rejected_real``
    the share of the real next states it rejects (about 0). Why: an imagined rollout must get
    every step past the filter, so ``(1 - dynamics_rejected) ** k`` roughly bounds how many
    ``k``-step rollouts survive (CLEVR ``cpu``: most rejections are a pushed ball written into
    another, ``overlap``)."""
    if not transitions:
        return {"dynamics_n": 0}
    prompts = [dynamics_prompt(codec, s, a) for s, a, _ in transitions]
    longest = max(len(codec.encode_state(n)) for _, _, n in transitions)
    eos = tokenizer.eos_token_id
    gens = generate_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=longest + 2,
        batch_size=batch_size,
        device=device,
        stop_ids=[eos],
    )
    errs, copy, ok, rejected, rejected_real = [], [], 0, 0, 0
    for (s, a, n), ids in zip(transitions, gens, strict=False):
        text = tokenizer.decode(_strip(ids, {eos}), skip_special_tokens=False)
        dims = codec.moving_dims(s)
        copy_err = float(np.mean(np.abs(np.asarray(s)[dims] - np.asarray(n)[dims])))
        copy.append(copy_err)
        try:
            pred = codec.decode_state(text, prev=s)
            ok += 1
            errs.append(float(np.mean(np.abs(pred[dims] - np.asarray(n)[dims]))))
        except CodecError:
            errs.append(copy_err)  # an undecodable prediction counts as copying the state
            pred = None
        if limits is not None:
            rejected += pred is None or physical_rejection([s, pred], [a], limits) is not None
            rejected_real += physical_rejection([s, n], [a], limits) is not None
    out = {
        "dynamics_n": len(transitions),
        "dynamics_decoded": ok / len(transitions),
        "dynamics_mae": float(np.mean(errs)),
        "copy_baseline_mae": float(np.mean(copy)),
        "dynamics_beats_copy": bool(np.mean(errs) < np.mean(copy)),
    }
    if limits is not None:
        out["dynamics_rejected"] = rejected / len(transitions)
        out["dynamics_rejected_real"] = rejected_real / len(transitions)
    return out


def action_metrics(
    model: Any,
    tokenizer: Any,
    codec: Codec,
    episodes: list[EpisodeArrays],
    *,
    batch_size: int,
    device: str,
    factors: tuple[tuple[str, int], ...] = (),
) -> dict[str, float]:
    """The demonstrator's actions under the policy prompt, teacher-forced (discrete codecs).

    ``policy_action_nll``: mean ``-log p(a_t | instruction, s_t)`` with the softmax over the
    action tokens only (the grammar allows nothing else there), next to ``log(n_actions)``,
    a uniform policy's; ``policy_action_match``: how often ``a_t`` is the argmax. The
    demonstrator is one of several good pushers, so a perfect policy's match is well below 1.

    With ``factors`` (the suite's ``action_factors``, sizes multiplying to the number of
    actions) the NLL is also split by the chain rule into one term per part, each given the
    parts before it: ``policy_action_nll_<part>`` (they sum to ``policy_action_nll``), beside
    ``policy_action_uniform_nll_<part>``.
    Why: CLEVR groundings learn which ball to push long before which way (quick budget: ball
    0.93 of a uniform 1.61, direction given the ball 2.04 of 2.08), and the total hides it.
    """
    import torch

    if not codec.discrete or not episodes:
        return {}
    act_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(codec.action_tokens)]
    rows = [
        (e.instruction, e.states[t], int(e.actions[t]))
        for e in episodes
        for t in range(len(e.actions))
    ]
    sizes = [n for _, n in factors]
    if factors and int(np.prod(sizes)) != len(act_ids):
        raise ValueError(f"action factors {factors} do not multiply to {len(act_ids)} actions")
    tokenizer.padding_side = "left"
    nll, match, parts = [], [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            enc = tokenizer(
                [rollout_prompt(codec, text, s) for text, s, _ in chunk],
                return_tensors="pt",
                padding=True,
            ).to(device)
            logits = model(**enc).logits[:, -1, act_ids].float()
            logp = torch.log_softmax(logits, dim=-1).cpu().numpy()
            a = np.asarray([r[2] for r in chunk])
            nll.extend(-logp[np.arange(len(a)), a])
            match.extend(logp.argmax(axis=1) == a)
            if factors:
                parts.append(factor_nll(logp, a, sizes))
    out = {
        "policy_action_n": len(rows),
        "policy_action_nll": float(np.mean(nll)),
        "policy_action_uniform_nll": float(np.log(len(act_ids))),
        "policy_action_match": float(np.mean(match)),
    }
    if parts:
        per_part = np.concatenate(parts).mean(axis=0)
        for (name, size), v in zip(factors, per_part, strict=True):
            out[f"policy_action_nll_{name}"] = float(v)
            out[f"policy_action_uniform_nll_{name}"] = float(np.log(size))
    return out


def factor_nll(logp: np.ndarray, actions: np.ndarray, sizes: list[int]) -> np.ndarray:
    """``(B, len(sizes))``: ``-log p(part_i | parts before it)`` of each action, from
    ``logp`` ``(B, prod(sizes))`` over actions numbered as mixed-radix numbers (most
    significant part first). Each row sums to the action's own ``-log p``."""
    b = len(actions)
    digits = np.stack(np.unravel_index(actions, sizes), axis=1)  # (B, k)
    joint = logp.reshape(b, *sizes)
    out, prev = np.empty((b, len(sizes))), np.zeros(b)
    for i in range(len(sizes)):
        # log p(part_1..part_i): sum out the parts after i (none after the last)
        lead = np.logaddexp.reduce(joint, axis=tuple(range(i + 2, len(sizes) + 1)))
        cur = lead[(np.arange(b), *digits[:, : i + 1].T)]
        out[:, i] = prev - cur
        prev = cur
    return out


def explain_metrics(
    model: Any,
    tokenizer: Any,
    codec: Codec,
    episodes: list[EpisodeArrays],
    *,
    batch_size: int,
    device: str,
) -> dict[str, float]:
    """Exact match (generated) and token accuracy (teacher-forced) of the instruction."""
    import torch

    if not episodes:
        return {"explain_n": 0}
    eos = tokenizer.eos_token_id
    prompts = [explain_prompt(codec, e.states, e.actions) for e in episodes]
    targets = [
        tokenizer(" " + e.instruction.strip(), add_special_tokens=False)["input_ids"] + [eos]
        for e in episodes
    ]
    gens = generate_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max(map(len, targets)) + 4,
        batch_size=batch_size,
        device=device,
        stop_ids=[eos],
    )
    exact = float(np.mean([g == t for g, t in zip(gens, targets, strict=False)]))
    right, total = 0, 0
    for i in range(0, len(prompts), batch_size):
        rows = [
            (tokenizer(p)["input_ids"], t)
            for p, t in zip(prompts[i : i + batch_size], targets[i : i + batch_size], strict=False)
        ]
        n = max(len(p) + len(t) for p, t in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for j, (p, t) in enumerate(rows):
            ids[j, : len(p) + len(t)] = torch.tensor(p + t)
            mask[j, : len(p) + len(t)] = 1
        logits = (
            model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
        )
        for j, (p, t) in enumerate(rows):
            pred = logits[j, len(p) - 1 : len(p) + len(t) - 1].tolist()
            right += sum(int(a == b) for a, b in zip(pred, t, strict=False))
            total += len(t)
    return {
        "explain_n": len(episodes),
        "explain_exact_match": exact,
        "explain_token_accuracy": right / total,
    }


def generation_metrics(
    model: Any,
    tokenizer: Any,
    codec: Codec,
    suite: Any,
    episodes: list[EpisodeArrays],
    *,
    max_steps: int,
    batch_size: int,
    device: str,
) -> dict[str, Any]:
    """Rollouts from held-out (instruction, start state): decode rate, reasons, predicate rate."""
    if not episodes:
        return {"rollout_n": 0}
    eos = tokenizer.eos_token_id
    end_id = codec_token_ids(tokenizer, codec)[-1]
    from kalm_ray.llm.grammar import RowGrammar

    prompts = [rollout_prompt(codec, e.instruction, e.states[0]) for e in episodes]
    rows = [RowGrammar.for_request(codec, e.states[0], max_steps) for e in episodes]
    gens = generate_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max(r.max_tokens() for r in rows),  # the grammar ends every row there
        batch_size=batch_size,
        device=device,
        stop_ids=[end_id, eos],
        grammar=(codec, rows),
    )
    reasons: Counter[str] = Counter()
    decoded, success, lengths = 0, 0, []
    for e, ids in zip(episodes, gens, strict=False):
        text = tokenizer.decode(_strip(ids, {eos}), skip_special_tokens=False)
        try:
            states, _ = codec.decode_rollout(e.states[0], text, max_steps=max_steps)
        except CodecError as err:
            reasons[err.reason] += 1
            continue
        decoded += 1
        lengths.append(len(states) - 1)
        success += goal_reached(suite, e.task, states)
    real = float(np.mean([goal_reached(suite, e.task, e.states) for e in episodes]))
    return {
        "rollout_n": len(episodes),
        "rollout_decoded": decoded / len(episodes),
        "rollout_success": success / len(episodes),
        "rollout_reasons": dict(reasons),
        "rollout_mean_steps": float(np.mean(lengths)) if lengths else 0.0,
        "real_success": real,
        "rollout_max_steps": max_steps,
    }


def rephrased(suite: Any, episodes: list[EpisodeArrays], seed: int) -> list[EpisodeArrays]:
    """The episodes with a ``rephrase``-level wording of their own goal instead of theirs.

    Empty when a goal has no rephrase wordings. The k-th episode takes a wording drawn with
    ``(seed, k)``, so the same episodes always get the same wordings.
    """
    goals = set(suite.tasks("rephrase"))
    if not episodes or any(e.task not in goals for e in episodes):
        return []
    out = []
    for k, e in enumerate(episodes):
        wordings = suite.instructions("rephrase", e.task)
        pick = int(np.random.default_rng([seed, k]).integers(len(wordings)))
        out.append(dataclasses.replace(e, instruction=wordings[pick]))
    return out


def policy_metrics(
    model: Any,
    tokenizer: Any,
    codec: Codec,
    suite: Any,
    episodes: list[EpisodeArrays],
    *,
    seen: list[EpisodeArrays] | None = None,
    n_envs: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """LLM-as-policy vs the random policy, closed loop from real starts, in a 2 x 2.

    Each episode gives one spec: its task and instruction at the ``train`` level, started
    exactly at its first real state; every policy meets the same specs. Starts come from the
    held-out ``episodes`` (``policy_*``) and from ``seen``, episodes the model was trained on
    (``policy_seen_*``): a model that reaches its goals from the starts it saw and not from
    fresh ones has memorized its episodes instead of learning the geometry. Each set is run
    again with a ``rephrase``-level wording of the same goal (``*_llm_rephrase_success``, the
    LLM only: the random policy does not read the wording): a model that succeeds with the
    training wording and not with a rephrased one does not understand the rephrasing, and
    its imagined rollouts for the rephrase level cannot be better than that.
    """
    if not episodes:
        return {"policy_n": 0}
    from kalm_ray.eval.episodes import EpisodeSpec, run_episodes
    from kalm_ray.eval.evaluate import RandomPolicy
    from kalm_ray.llm.imagine.replay import can_place_start
    from kalm_ray.llm.policy import LLMPolicy

    if not can_place_start(suite):
        return {"policy_n": 0, "policy_skipped": "the env cannot be placed at a given state"}

    envs: dict[int, Any] = {}

    def get_env(slot: int, spec: EpisodeSpec) -> Any:
        if slot not in envs:
            envs[slot] = suite.make_env("train")
        return envs[slot]

    def success(policy: Any, eps: list[EpisodeArrays]) -> tuple[float, float]:
        res = run_episodes(
            policy,
            [EpisodeSpec(i, "train", e.task, e.instruction, i) for i, e in enumerate(eps)],
            get_env=get_env,
            embeddings={e.instruction: np.zeros(0, np.float32) for e in eps},
            make_obs=lambda s, e: s,
            n_envs=n_envs,
            max_steps=suite.max_episode_steps,
            start_states={i: e.states[0] for i, e in enumerate(eps)},
        )
        return float(np.mean([r.success for r in res])), float(np.mean([r.length for r in res]))

    llm, random = LLMPolicy.from_loaded(model, tokenizer, codec), RandomPolicy(suite.action_space)
    out: dict[str, Any] = {"policy_n": len(episodes), "policy_seen_n": len(seen or [])}
    for prefix, eps in (("policy", episodes), ("policy_seen", seen or [])):
        if not eps:
            continue
        for name, policy in (("llm", llm), ("random", random)):
            ok, length = success(policy, eps)
            out[f"{prefix}_{name}_success"] = ok
            out[f"{prefix}_{name}_mean_length"] = length
        reworded = rephrased(suite, eps, seed)
        if reworded:
            out[f"{prefix}_llm_rephrase_success"] = success(llm, reworded)[0]
    for e in envs.values():
        e.close()
    return out


def grounding_metrics(
    model: Any,
    tokenizer: Any,
    codec: Codec,
    suite: Any,
    episodes: list[EpisodeArrays],
    *,
    seen: list[EpisodeArrays] | None = None,
    seen_sample: list[EpisodeArrays] | None = None,
    device: str = "cpu",
    max_examples: int = 128,
    max_rollouts: int = 32,
    max_policy_episodes: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """All grounding metrics on held-out episodes (a seeded sample of them, sizes capped).

    Args:
        max_examples: transitions for dynamics and episodes for explanation.
        max_rollouts: episodes whose (instruction, start) prompt a rollout.
        seen: training episodes (their first state is enough) for the policy's seen starts.
        seen_sample: whole training episodes: the action metrics again on states the model
            trained on (``seen_policy_action_*``). Why: a model that does not act has either
            memorised its training states' actions (far lower NLL there than held out; the
            quick preset, seed 0: 2.21 against 3.35) or fits them no better than unseen ones
            (level; quick with relabelled copies), and the two call for different remedies.
        max_policy_episodes: episodes whose starts the LLM-as-policy and random play from,
            from ``episodes`` and from ``seen`` each.
    """
    rng = np.random.default_rng(seed)
    trans = [
        (e.states[t], e.actions[t], e.states[t + 1])
        for e in episodes
        for t in range(len(e.actions))
    ]
    pick = rng.permutation(len(trans))[:max_examples]
    ep_pick = [episodes[i] for i in rng.permutation(len(episodes))]
    longest = max((len(e.actions) for e in episodes), default=1)
    max_steps = int(min(suite.max_episode_steps, 2 * longest + 5))
    out: dict[str, Any] = {"heldout_episodes": len(episodes), "heldout_transitions": len(trans)}
    out.update(
        dynamics_metrics(
            model,
            tokenizer,
            codec,
            [trans[i] for i in pick],
            batch_size=batch_size,
            device=device,
            # The filter's default tolerances: the ground stage does not read the imagine
            # section (imagine.bounds_tolerance / step_tolerance), whose defaults these are.
            limits=FilterLimits.for_suite(suite, n_bins=codec.n_bins),
        )
    )
    out.update(
        explain_metrics(
            model, tokenizer, codec, ep_pick[:max_examples], batch_size=batch_size, device=device
        )
    )
    factors = tuple(getattr(suite, "action_factors", ()))
    for prefix, eps in (("", episodes), ("seen_", seen_sample or [])):
        m = action_metrics(
            model, tokenizer, codec, eps, batch_size=batch_size, device=device, factors=factors
        )
        out.update({prefix + k: v for k, v in m.items()})
    out.update(
        generation_metrics(
            model,
            tokenizer,
            codec,
            suite,
            ep_pick[:max_rollouts],
            max_steps=max_steps,
            batch_size=batch_size,
            device=device,
        )
    )
    seen_pick = [seen[i] for i in rng.permutation(len(seen or []))[:max_policy_episodes]]
    out.update(
        policy_metrics(
            model, tokenizer, codec, suite, ep_pick[:max_policy_episodes], seen=seen_pick, seed=seed
        )
    )
    return out
