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

``imagine.candidates: N`` imagines N rollouts per request (candidate 0 from the request's own
seed, so N = 1 is the plain loop) and returns the one that meets its goal in the fewest
imagined steps (else the first the validity filter would accept, else the first). The choice
reads only the LLM's own states, the task's success rule and the filter's limits (the
environment's facts), the information the labels and the filter use anyway: a search in the
LLM's world model for the shortest plan, never a judgement by the simulator. Why: sampled
actions make most successful rollouts random walks that end at the goal by chance, and BC
imitates every step of them; the shortest of N keeps the fewest detours. The catch, measured
(docs/results.md): the search also finds the LLM's dynamics errors that make a goal look
near, so it pays only with a world model that is right often enough.

``imagine.state_retries: R`` (``state_retries`` here, needs ``limits``): a next state the
validity filter would reject (balls pushed into each other, out of bounds, an impossible move) is
drawn again from the world model, sampled at ``imagine.state_temperature`` from the same
dynamics prompt, up to R times; the action stays. The filter's limits are the environment's
facts (ball size, walls, how far one push can move a ball), so this decodes the world model's
own distribution under those facts, as the grammar decodes it under the codec's layout. Why:
greedy decoding writes the likeliest value of each coordinate alone, and where the model is
unsure whether a struck ball moves it writes "no change" and leaves the pushed ball inside the
struck one. Measured on the 279 held-out real pushes of seed 1's ``cpu`` grounding: greedy
next states are rejected for 22.2% of them; greedy with up to 8 draws at 0.7 for those,
7.5%, and the mean ball error against the real next states drops from 0.0241 to 0.0236 (on
the redrawn pushes 0.0410 to 0.0386). A step still rejected after R draws ends the rollout as
before.

``imagine.action_retries: A`` (``action_retries`` here, needs ``limits``): a step the filter
still rejects after the next-state draws is imagined again with another action, sampled from
the same policy prompt (at ``imagine.temperature``, 1.0 where that is 0; from a stream of its
own) with its greedy next state, up to A times. Where ``state_retries`` asks the world model
again about the push it got wrong, this asks the policy for a push the world model can
predict: the rejections mark the pushes that strike another ball, which the tiny world model
predicts worst.

``imagine.consistency_draws: M`` (``consistency_draws`` / ``consistency_min`` here): before a
candidate's success is taken, its actions are imagined again M times from its start with every
next state *sampled* (temperature 1) from the dynamics prompt; the success holds up when at
least ``consistency_min`` of those draws reach the goal too (:meth:`StepwiseImaginer.hold_up`).
It asks the world model how sure it is of the success it wrote: greedy decoding writes each
coordinate's likeliest bin, which hides a push the model thinks may or may not strike a ball.
Measured on seed 1's ``cpu`` imagination with ``action_retries: 2`` (300 kept successes per
level, 4 draws): of the rephrase successes with none or one of the four draws at the goal, the
replay confirmed 28%; of those with all four, 83% (hard: 18% against 82%).

``imagine.compose`` (``part_steps`` here) imagines a goal made of several training goals (the
suite's ``parts``: CLEVR ``hard``'s two- and three-relation goals) part by part: each step's
policy prompt holds a training wording of the first part that does not hold in the current
imagined state. The model was grounded on single relations and never saw a conjunction
(measured: 0.8% and 5% success as a policy on ``hard`` with the request's own wording); the
parts are goals it acts on. Only the prompt's wording changes: the states are the LLM's, the
request's own wording labels the rollout, and the goal check is the whole task's (every part at
once). The split comes from the task's structure, the same goal spec the labels read; a model
that reads conjunctions would not need it.
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
        candidates: rollouts imagined per request; the shortest that meets its goal is kept.
        part_steps: compose goals from their parts (``imagine.compose``), each part with this
            many steps; None: every request is prompted with its own wording.
        limits: the validity filter's limits (:class:`~kalm_ray.llm.imagine.filter.FilterLimits`);
            when given, a rollout stops at its first step the filter would reject (out of
            bounds, impossible move, overlap) and is never the chosen candidate. None: no check.
        state_retries, state_temperature: a next state the filter would reject is sampled
            again from the dynamics prompt at ``state_temperature``, up to ``state_retries``
            times, before the rollout stops (needs ``limits``).
        action_retries: a step still rejected is imagined again with a newly sampled action
            and its greedy next state, up to this many times (needs ``limits``).
        consistency_draws, consistency_min: a success is taken only where at least
            ``consistency_min`` of ``consistency_draws`` sampled re-imaginings of its actions
            reach the goal too (:meth:`hold_up`; 0 draws: every success is taken).
    """

    def __init__(
        self,
        model: Any,
        tok: Any,
        codec: Any,
        *,
        suite: Any,
        temperature: float,
        top_p: float,
        candidates: int = 1,
        part_steps: int | None = None,
        limits: Any = None,
        state_retries: int = 0,
        state_temperature: float = 0.7,
        action_retries: int = 0,
        consistency_draws: int = 0,
        consistency_min: float = 0.5,
    ):
        if (state_retries or action_retries) and limits is None:
            raise ValueError("state_retries and action_retries need the filter's limits")
        self.model, self.tok, self.codec, self.suite = model, tok, codec, suite
        self.temperature, self.top_p, self.candidates = temperature, top_p, candidates
        self.part_steps, self.limits = part_steps, limits
        self.state_retries, self.state_temperature = state_retries, state_temperature
        self.action_retries = action_retries
        self.consistency_draws, self.consistency_min = consistency_draws, consistency_min

    def __call__(
        self, batch: pa.Table, steps_for: Any
    ) -> tuple[list[str], list[int], list[int], list[bool]]:
        """``(texts, generated tokens, prompt tokens read, doubtful)`` per request of ``batch``
        (columns ``instruction``, ``task``, ``start_state``, ``seed``, optional ``level``).
        Tokens are counted over every candidate and consistency draw: they are all generated.
        ``doubtful``: the text meets its goal, but no candidate's success held up under the
        consistency draws (``consistency_draws``; always False without them)."""
        from kalm_ray.llm.imagine.requests import state_matrix

        n, k = batch.num_rows, self.candidates
        starts = state_matrix(batch.column("start_state"), self.codec.state_dim)
        levels = batch.column("level").to_pylist() if "level" in batch.column_names else [None] * n
        seeds = [
            candidate_seed(int(s), j) for s in batch.column("seed").to_pylist() for j in range(k)
        ]
        tasks = [t for t in batch.column("task").to_pylist() for _ in range(k)]
        limits = [steps_for(lv) for lv in levels for _ in range(k)]
        parts = None
        if self.part_steps is not None:
            parts = [part_wordings(self.suite, t, s) for t, s in zip(tasks, seeds, strict=True)]
            limits = [
                min(lim, self.part_steps * max(1, len(p)))
                for lim, p in zip(limits, parts, strict=True)
            ]
        texts, counts, n_in, steps, valid, paths = self.imagine(
            np.repeat(starts, k, axis=0),
            [w for w in batch.column("instruction").to_pylist() for _ in range(k)],
            tasks,
            limits,
            seeds,
            parts=parts,
        )
        held = steps
        if self.consistency_draws:
            held = self.hold_up(steps, paths, tasks, seeds, counts, n_in, k)
        pick, doubtful = [], []
        for i in range(n):
            mine = slice(i * k, (i + 1) * k)
            # No success that holds up, but some success: the shortest is returned, doubtful
            # (kept out of the data, and counted apart), rather than a failure in its place.
            doubt = any(s is not None for s in steps[mine]) and all(h is None for h in held[mine])
            pick.append(i * k + choose(steps[mine] if doubt else held[mine], valid[mine]))
            doubtful.append(doubt)
        return (
            [texts[r] for r in pick],
            [sum(counts[i * k : (i + 1) * k]) for i in range(n)],
            [sum(n_in[i * k : (i + 1) * k]) for i in range(n)],
            doubtful,
        )

    def hold_up(
        self,
        steps: list[int | None],
        paths: list[tuple[np.ndarray, np.ndarray]],
        tasks: list[str],
        seeds: list[int],
        counts: list[int],
        n_in: list[int],
        k: int,
    ) -> list[int | None]:
        """Each candidate's steps to its goal where its success holds up, else None.

        Each request's successful candidates are tried shortest first: its actions are imagined
        again ``consistency_draws`` times from the same start, every next state *sampled* from
        the dynamics prompt (temperature 1: the world model's own distribution, one seeded
        stream per draw), and the success holds up when at least ``consistency_min`` of the
        draws also end at the goal. The first that holds up is the request's; the others'
        steps become None, so ``choose`` passes them over. A request with successes of which
        none holds up is ``doubtful``: its shortest success is returned, and the stage keeps
        it out of the data. Why: a success the world model reaches only through its likeliest
        guess at every step is one where it is unsure (a ball struck or not), and the replay
        check confirms those far less often (measured in docs/results.md). Draws count in
        ``counts`` and ``n_in`` (candidate rows, updated in place).
        """
        n = len(steps) // k
        order = [
            sorted((steps[r], r) for r in range(i * k, (i + 1) * k) if steps[r] is not None)
            for i in range(n)
        ]
        held: list[int | None] = [None] * len(steps)
        open_ = [i for i in range(n) if order[i]]
        while open_:
            rows = [order[i].pop(0)[1] for i in open_]
            share = self.draws_reaching(
                [paths[r] for r in rows], [tasks[r] for r in rows], [seeds[r] for r in rows]
            )
            for r, (frac, made, read) in zip(rows, share, strict=True):
                counts[r] += made
                n_in[r] += read
                if frac >= self.consistency_min:
                    held[r] = steps[r]
            open_ = [i for i, r in zip(open_, rows, strict=True) if held[r] is None and order[i]]
        return held

    def draws_reaching(
        self,
        paths: list[tuple[np.ndarray, np.ndarray]],
        tasks: list[str],
        seeds: list[int],
    ) -> list[tuple[float, int, int]]:
        """Per ``(states, actions)`` path: the share of ``consistency_draws`` sampled
        re-imaginings of its actions that end at its task's goal (their last state), and the
        tokens the draws generated and read."""
        import torch

        from kalm_ray.llm.imagine.labels import goal_reached
        from kalm_ray.llm.prompts import dynamics_prompt

        m = self.consistency_draws
        rows = [(p, d) for p in range(len(paths)) for d in range(m)]
        gens = [torch.Generator().manual_seed(retry_seed(seeds[p], 3 + d)) for p, d in rows]
        grammar = [NextStateGrammar.for_request(self.codec, paths[p][0][0]) for p, _ in rows]
        drawn = [[paths[p][0][0]] for p, _ in rows]
        made, read = [0] * len(paths), [0] * len(paths)
        for t in range(max(len(a) for _, a in paths)):
            live = [j for j, (p, _) in enumerate(rows) if t < len(paths[p][1])]
            prompts = [
                dynamics_prompt(self.codec, drawn[j][-1], paths[rows[j][0]][1][t]) for j in live
            ]
            toks, n_read = self.next_state_tokens(
                prompts, [grammar[j] for j in live], [gens[j] for j in live], temperature=1.0
            )
            for j, tk, r in zip(live, toks, n_read, strict=True):
                p = rows[j][0]
                drawn[j].append(self.codec.decode_state(self.codec.join(tk), prev=drawn[j][-1]))
                made[p] += len(tk)
                read[p] += r
        hits = np.zeros(len(paths))
        for j, (p, _) in enumerate(rows):
            hits[p] += goal_reached(self.suite, tasks[p], np.stack(drawn[j]))
        return [(hits[p] / m, made[p], read[p]) for p in range(len(paths))]

    def imagine(
        self,
        starts: np.ndarray,
        words: list[str],
        tasks: list[str],
        limits: list[int],
        seeds: list[int],
        parts: list[list[tuple[str, str]]] | None = None,
    ) -> tuple[
        list[str],
        list[int],
        list[int],
        list[int | None],
        list[bool],
        list[tuple[np.ndarray, np.ndarray]],
    ]:
        """One rollout per row: ``(texts, generated tokens, prompt tokens read, steps to the
        goal or None, no step the filter rejects, (states, actions))``. ``parts``: per row,
        ``(part task, its wording)`` pairs; a row with more than one is prompted with the
        wording of its first part that does not hold in the current state
        (:func:`part_wordings`)."""
        import torch

        from kalm_ray.llm.imagine.backends.hf import SeededSampling, constrained_tokens
        from kalm_ray.llm.imagine.labels import goal_reached
        from kalm_ray.llm.policy import decode_actions
        from kalm_ray.llm.prompts import dynamics_prompt, rollout_prompt

        codec, n = self.codec, len(words)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        # Redrawn next states and actions come from their own streams: a row whose states pass
        # at once draws the same actions with or without retries.
        state_gens = [torch.Generator().manual_seed(retry_seed(s)) for s in seeds]
        act_gens = [torch.Generator().manual_seed(retry_seed(s, 2)) for s in seeds]
        spent = [0] * n  # tokens of redrawn steps (generated, not in the text)
        reached: list[int | None] = [None] * n
        valid = [True] * n
        act_rows = [RowGrammar.for_request(codec, s, 1) for s in starts]
        state_rows = [NextStateGrammar.for_request(codec, s) for s in starts]
        states = [[s] for s in starts]
        acts: list[list[Any]] = [[] for _ in range(n)]
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
            policy = [
                rollout_prompt(codec, self.wording(words[i], parts and parts[i], starts[i], s), s)
                for i, s in zip(active, cur, strict=True)
            ]
            act_toks, read_a = constrained_tokens(
                self.model,
                self.tok,
                codec,
                policy,
                [act_rows[i] for i in active],
                alen,
                sampling=sampling,
            )
            actions = decode_actions(codec, act_toks)
            prompts = [dynamics_prompt(codec, s, a) for s, a in zip(cur, actions, strict=True)]
            st_toks, read_s = self.next_state_tokens(prompts, [state_rows[i] for i in active])
            judged = [
                self.judge(states[i], acts[i], a, t)
                for i, a, t in zip(active, actions, st_toks, strict=True)
            ]
            for _ in range(self.state_retries):
                redo = [k for k, (_, good) in enumerate(judged) if not good]
                if not redo:
                    break
                got, read = self.next_state_tokens(
                    [prompts[k] for k in redo],
                    [state_rows[active[k]] for k in redo],
                    [state_gens[active[k]] for k in redo],
                )
                for k, t, r in zip(redo, got, read, strict=True):
                    i = active[k]
                    spent[i] += len(st_toks[k])
                    n_in[i] += read_s[k]
                    st_toks[k], read_s[k] = t, r
                    judged[k] = self.judge(states[i], acts[i], actions[k], t)
            for _ in range(self.action_retries):
                redo = [k for k, (_, good) in enumerate(judged) if not good]
                if not redo:
                    break
                new_toks, new_read = constrained_tokens(
                    self.model,
                    self.tok,
                    codec,
                    [policy[k] for k in redo],
                    [act_rows[active[k]] for k in redo],
                    alen,
                    sampling=SeededSampling(
                        generators=[act_gens[active[k]] for k in redo],
                        temperature=self.temperature or 1.0,
                        top_p=self.top_p,
                    ),
                )
                new_actions = decode_actions(codec, new_toks)
                got, read = self.next_state_tokens(
                    [
                        dynamics_prompt(codec, cur[k], a)
                        for k, a in zip(redo, new_actions, strict=True)
                    ],
                    [state_rows[active[k]] for k in redo],
                )
                for j, k in enumerate(redo):
                    i = active[k]
                    spent[i] += len(act_toks[k]) + len(st_toks[k])
                    n_in[i] += read_a[k] + read_s[k]
                    act_toks[k], read_a[k] = new_toks[j], new_read[j]
                    st_toks[k], read_s[k] = got[j], read[j]
                    actions[k] = new_actions[j]
                    judged[k] = self.judge(states[i], acts[i], actions[k], st_toks[k])
            nxt, ok = [x for x, _ in judged], [good for _, good in judged]
            still = []
            for k, i in enumerate(active):
                tokens[i] += act_toks[k] + st_toks[k]
                n_in[i] += read_a[k] + read_s[k]
                states[i].append(nxt[k])
                acts[i].append(actions[k])
                so_far = np.stack(states[i])
                if not ok[k]:
                    valid[i] = False
                    continue  # the filter rejects it whatever follows
                if goal_reached(self.suite, tasks[i], so_far):
                    reached[i] = len(states[i]) - 1
                elif len(states[i]) - 1 < limits[i]:
                    still.append(i)
            active = still
        texts = [codec.join([*t, codec.end_token]) for t in tokens]
        counts = [len(t) + 1 + x for t, x in zip(tokens, spent, strict=True)]
        paths = [(np.stack(s), np.asarray(a)) for s, a in zip(states, acts, strict=True)]
        return texts, counts, n_in, reached, valid, paths

    def next_state_tokens(
        self,
        prompts: list[str],
        rows: list[Any],
        gens: list[Any] | None = None,
        temperature: float | None = None,
    ) -> tuple[list[list[str]], list[int]]:
        """The next-state tokens of each dynamics prompt under its grammar row, and the prompt
        tokens read: greedy, or sampled from ``gens`` (one generator per prompt) at
        ``temperature`` (default ``state_temperature``). One generate per next-state width
        (Meta-World: a task's entities set it)."""
        from kalm_ray.llm.imagine.backends.hf import SeededSampling, constrained_tokens

        toks: list[list[str]] = [[] for _ in prompts]
        read = [0] * len(prompts)
        for width in sorted({len(r) for r in rows}):
            group = [k for k, r in enumerate(rows) if len(r) == width]
            sampling = None
            if gens is not None:  # the group's own streams, in the group's row order
                sampling = SeededSampling(
                    generators=[gens[k] for k in group],
                    temperature=temperature or self.state_temperature,
                    top_p=1.0,
                )
            got, n_read = constrained_tokens(
                self.model,
                self.tok,
                self.codec,
                [prompts[k] for k in group],
                [rows[k] for k in group],
                width,
                sampling=sampling,
            )
            for k, t, r in zip(group, got, n_read, strict=True):
                toks[k], read[k] = t, r
        return toks, read

    def judge(
        self, states: list[np.ndarray], acts: list[Any], action: Any, toks: list[str]
    ) -> tuple[np.ndarray, bool]:
        """The next state ``toks`` write after ``states[-1]`` and ``action``, and whether the
        validity filter accepts the rollout with it (:meth:`plausible`)."""
        nxt = self.codec.decode_state(self.codec.join(toks), prev=states[-1])
        return nxt, self.plausible(np.stack([*states, nxt]), np.asarray([*acts, action]))

    def wording(
        self, own: str, parts: list[tuple[str, str]] | None, start: np.ndarray, state: np.ndarray
    ) -> str:
        """The wording of the policy prompt at ``state``: that of the first part that does not
        hold there, when the goal has several parts; else the request's own."""
        if not parts or len(parts) < 2:
            return own
        for task, text in parts:
            if not self.suite.success(task, start, state):
                return text
        return parts[-1][1]  # every part holds: the goal check has already stopped the row

    def plausible(self, states: np.ndarray, actions: np.ndarray) -> bool:
        """Whether the validity filter accepts the rollout so far (``no_progress`` aside: a
        later step may still move something)."""
        from kalm_ray.llm.imagine.filter import physical_rejection

        return self.limits is None or physical_rejection(states, actions, self.limits) is None


def part_wordings(suite: Any, task: str, seed: int) -> list[tuple[str, str]]:
    """``(part, wording)`` for each part of ``task`` (the suite's ``parts``): one of the part's
    ``train`` wordings, drawn from ``seed``. A task of one part keeps the request's wording
    (an empty list)."""
    parts = suite.parts(task)
    if len(parts) < 2:
        return []
    rng = np.random.default_rng([seed, len(parts)])
    out = []
    for part in parts:
        texts = suite.instructions("train", part)
        out.append((part, texts[int(rng.integers(len(texts)))]))
    return out


def candidate_seed(seed: int, j: int) -> int:
    """The sampling seed of candidate ``j`` of a request: its own seed for candidate 0 (so one
    candidate is the plain loop), an independent stream for the others."""
    if j == 0:
        return seed
    return int(np.random.SeedSequence([seed, j]).generate_state(1, np.uint64)[0] >> 1)


def retry_seed(seed: int, what: int = 1) -> int:
    """The seed of a rollout's stream for redrawn next states (``what`` 1: ``state_retries``)
    or actions (2: ``action_retries``): independent of each other and of its action stream
    (:func:`candidate_seed`)."""
    return int(np.random.SeedSequence([seed, 0, what]).generate_state(1, np.uint64)[0] >> 1)


def choose(steps: list[int | None], valid: list[bool]) -> int:
    """Index of the candidate that met its goal in the fewest steps (the first on ties); when
    none did, the first with no step the filter rejects (a failure, labelled as such); else 0.
    """
    done = [(s, j) for j, s in enumerate(steps) if s is not None]
    if done:
        return min(done)[1]
    return next((j for j, ok in enumerate(valid) if ok), 0)
