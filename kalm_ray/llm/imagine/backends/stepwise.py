"""Stepwise imagination: the grounded LLM as both the policy and the world model.

``imagine.mode: stepwise`` (hf backend). Each imagined step is two prompts the model was
grounded on (:mod:`kalm_ray.llm.prompts`):

1. ``policy``: instruction + the current *imagined* state -> one action (sampled at
   ``imagine.temperature`` from one seeded stream per request, under the grammar);
2. ``dynamics``: that state + that action -> the next state (greedy, under the grammar).

Why not only the rollout continuation (``mode: rollout``): there the model writes every state
while reading the instruction, and with a novel wording its states drift (measured on the
quick preset: 37.5% of imagined rephrase successes confirmed by replay, against 72.7% on
easy). The dynamics prompt holds no instruction, so the world model meets a novel instruction
only through the actions it is asked about.

A request stops at its level's step limit, or as soon as its imagined state meets its goal
(the task's own success rule on the LLM's states: the labels cut every rollout there anyway,
so stopping only saves the steps the labels would drop). No simulator is involved. The
output is the same trajectory text a rollout continuation would be (action, step state, ...,
end token), so decoding, the validity filter and the labels are shared by both modes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from kalm_ray.llm.grammar import NextStateGrammar, RowGrammar, action_length


class StepwiseImaginer:
    """One batch of requests -> trajectory texts, stepping policy and dynamics prompts.

    Args:
        model, tok, codec: the grounded model (``tok`` pads on the left).
        suite: the env suite (the goal rule for early stopping; labels use the same rule).
        temperature, top_p: action sampling (0 = greedy).
    """

    def __init__(
        self, model: Any, tok: Any, codec: Any, *, suite: Any, temperature: float, top_p: float
    ):
        self.model, self.tok, self.codec, self.suite = model, tok, codec, suite
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, batch: pa.Table, steps_for: Any) -> tuple[list[str], list[int], list[int]]:
        """``(texts, generated tokens, prompt tokens read)`` per request of ``batch``
        (columns ``instruction``, ``task``, ``start_state``, ``seed``, optional ``level``)."""
        import torch

        from kalm_ray.llm.imagine.backends.hf import SeededSampling, constrained_tokens
        from kalm_ray.llm.imagine.labels import goal_reached
        from kalm_ray.llm.imagine.requests import state_matrix
        from kalm_ray.llm.policy import decode_actions
        from kalm_ray.llm.prompts import dynamics_prompt, rollout_prompt

        codec, n = self.codec, batch.num_rows
        starts = state_matrix(batch.column("start_state"), codec.state_dim)
        words = batch.column("instruction").to_pylist()
        tasks = batch.column("task").to_pylist()
        levels = (
            batch.column("level").to_pylist() if "level" in batch.column_names else [None] * n
        )
        limits = [steps_for(lv) for lv in levels]
        gens = [torch.Generator().manual_seed(int(s)) for s in batch.column("seed").to_pylist()]
        act_rows = [RowGrammar.for_request(codec, s, 1) for s in starts]
        state_rows = [NextStateGrammar.for_request(codec, s) for s in starts]
        states = [[s] for s in starts]
        tokens: list[list[str]] = [[] for _ in range(n)]
        n_in = [0] * n
        active = list(range(n))
        alen = action_length(codec)
        while active:
            cur = [states[i][-1] for i in active]
            sampling = (
                SeededSampling(
                    generators=[gens[i] for i in active],
                    temperature=self.temperature,
                    top_p=self.top_p,
                )
                if self.temperature > 0
                else None
            )
            prompts = [rollout_prompt(codec, words[i], s) for i, s in zip(active, cur, strict=True)]
            act_toks, read_a = constrained_tokens(
                self.model, self.tok, codec, prompts, [act_rows[i] for i in active], alen,
                sampling=sampling,
            )
            actions = decode_actions(codec, act_toks)
            prompts = [dynamics_prompt(codec, s, a) for s, a in zip(cur, actions, strict=True)]
            # One generate per next-state width (Meta-World: a task's entities set it).
            st_toks: list[list[str]] = [[] for _ in active]
            read_s = [0] * len(active)
            for width in sorted({len(state_rows[i]) for i in active}):
                group = [k for k, i in enumerate(active) if len(state_rows[i]) == width]
                got, read = constrained_tokens(
                    self.model, self.tok, codec, [prompts[k] for k in group],
                    [state_rows[active[k]] for k in group], width,
                )
                for k, t, r in zip(group, got, read, strict=True):
                    st_toks[k], read_s[k] = t, r
            still = []
            for k, i in enumerate(active):
                tokens[i] += act_toks[k] + st_toks[k]
                n_in[i] += read_a[k] + read_s[k]
                nxt = codec.decode_state(codec.join(st_toks[k]), prev=cur[k])
                states[i].append(nxt)
                done = goal_reached(self.suite, tasks[i], np.stack(states[i]))
                if not done and len(states[i]) - 1 < limits[i]:
                    still.append(i)
            active = still
        texts = [codec.join([*t, codec.end_token]) for t in tokens]
        return texts, [len(t) + 1 for t in tokens], n_in
