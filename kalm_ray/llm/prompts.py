"""The four grounding tasks as prompt -> target pairs, and their token-id examples.

Prompts (our own wording; codec tokens are written back to back, see :mod:`codec`)::

    rollout      instruction: <text>\\nstart: <state>\\nplan:            -> <steps><end>
    explain      start: <state>\\nsteps: <steps><end>\\ninstruction:      -> " <text>"
    dynamics     state: <state>\\naction: <action>\\nnext state:         -> <step state>
    consequence  instruction: <text>\\nstart: <state>\\nfinal state:     -> <state>
    policy       instruction: <text>\\nstart: <state_t>\\nplan:          -> <action_t>

An example is ``input_ids = tokenizer(prompt) + tokenizer(target, no specials) + [eos]`` and
``prompt_len``; the loss is on the target tokens only (labels ``-100`` on the prompt, see
:func:`labels_for`). The prompt is tokenized on its own, exactly as a backend tokenizes it
at generation time, so training and generation see the same ids.

Episodes longer than ``max_seq_len`` are shortened from the front: the start moves to a
later state of the same episode (the instruction still holds, the end is kept).

``<state>`` is an absolute state; ``<step state>`` is a step's STATE as the codec writes it
inside a trajectory (under ``state_coding: delta``, the change from the state before).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kalm_ray.llm.codec import Codec

TASKS: tuple[str, ...] = ("rollout", "explain", "dynamics", "consequence", "policy")
"""The four grounding tasks of KALM, and ``policy``: the rollout prompt from any state of an
episode with only the plan's first action as the target (the first step of task 1, cheap
enough to train on every state; it is what the LLM-as-policy and each imagined step use)."""
IGNORE = -100
"""Label of a position that carries no loss (the prompt, padding)."""


@dataclass
class EpisodeArrays:
    """One real episode, enough for every grounding task.

    Attributes:
        states: ``(T+1, D)`` float32; actions: ``(T,)`` int64 or ``(T, k)`` float32.
    """

    episode_id: str
    task: str
    instruction: str
    states: np.ndarray
    actions: np.ndarray
    lookahead: np.ndarray | None = None
    """``(T, n_actions, D)``: every action's next state from each state (NaN rows: unknown);
    None when the data has no ``lookahead`` column."""


# ---- prompt text (the imagine stage relies on rollout_prompt) --------------------------------


def rollout_prompt(codec: Codec, instruction: str, start_state: np.ndarray) -> str:
    """Prompt of task 1; the model's continuation is a trajectory text (``decode_rollout``)."""
    state = codec.join(codec.encode_state(start_state))
    return f"instruction: {instruction.strip()}\nstart: {state}\nplan:"


def explain_prompt(codec: Codec, states: np.ndarray, actions: np.ndarray) -> str:
    """Prompt of task 2 (trajectory -> instruction); the target is ``" " + instruction``."""
    return (
        f"start: {codec.join(codec.encode_state(states[0]))}\n"
        f"steps: {codec.encode_trajectory(states, actions)}\ninstruction:"
    )


def dynamics_prompt(codec: Codec, state: np.ndarray, action: Any) -> str:
    """Prompt of task 3 (state, action -> next state tokens)."""
    return (
        f"state: {codec.join(codec.encode_state(state))}\n"
        f"action: {codec.join(codec.encode_action(action))}\nnext state:"
    )


def consequence_prompt(codec: Codec, instruction: str, start_state: np.ndarray) -> str:
    """Prompt of task 4 (start state, instruction -> final state tokens)."""
    return (
        f"instruction: {instruction.strip()}\n"
        f"start: {codec.join(codec.encode_state(start_state))}\n"
        "final state:"
    )


def task_pairs(
    codec: Codec, ep: EpisodeArrays, *, start: int = 0
) -> Iterator[tuple[str, str, str]]:
    """``(task, prompt, target)`` of the episode-level tasks, on the episode from ``start`` on."""
    s, a = ep.states[start:], ep.actions[start:]
    yield "rollout", rollout_prompt(codec, ep.instruction, s[0]), codec.encode_trajectory(s, a)
    yield "explain", explain_prompt(codec, s, a), " " + ep.instruction.strip()
    yield (
        "consequence",
        consequence_prompt(codec, ep.instruction, s[0]),
        codec.join(codec.encode_state(s[-1])),
    )


# ---- token ids ------------------------------------------------------------------------------


def tokenize_example(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], int]:
    """``(input_ids, prompt_len)``: prompt as a backend would tokenize it, target, then eos."""
    p = tokenizer(prompt)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    return [*p, *t, tokenizer.eos_token_id], len(p)


def labels_for(input_ids: list[int] | np.ndarray, prompt_len: int) -> np.ndarray:
    """Labels of one example, ``(L,)`` int64: ``-100`` on the prompt, the ids on the target."""
    labels = np.asarray(input_ids, dtype=np.int64).copy()
    labels[:prompt_len] = IGNORE
    return labels


def _earliest_fitting(
    at: Callable[[int], dict[str, Any] | None], n: int
) -> dict[str, Any] | None:
    """``at(start)`` for the earliest ``start`` in ``[0, n)`` whose example fits, or None.

    An example from a later start is never longer (fewer steps, the same prompt shape), so
    a binary search finds the same start a scan would in O(log n) encodings (a scan is
    quadratic in the episode's length: Meta-World's 60-150-step episodes took minutes).
    """
    first = at(0)
    if first is not None or n <= 1:
        return first
    lo, hi, best = 1, n - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        row = at(mid)
        if row is None:
            lo = mid + 1
        else:
            best, hi = row, mid - 1
    return best


def episode_examples(
    codec: Codec,
    tokenizer: Any,
    ep: EpisodeArrays,
    *,
    max_seq_len: int,
    rollout_starts: str = "first",
    lookahead_pushes: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Token-id examples of every task from one episode, and how many were dropped as too long.

    One rollout/explain/consequence example per episode (shortened from the front until it
    fits) and one dynamics and one policy example per transition. With
    ``rollout_starts="every"`` the episode also gives a rollout example from each later
    state (the same instruction, the rest of the episode as the plan). With
    ``lookahead_pushes=k`` (and ``ep.lookahead``) each state also gives ``k`` dynamics
    examples of other actions, drawn without replacement by a generator seeded with the
    episode id and step.
    """
    if rollout_starts not in ("first", "every"):
        raise ValueError(f"rollout_starts {rollout_starts!r}: expected 'first' or 'every'")

    def example(task: str, prompt: str, target: str) -> dict[str, Any] | None:
        """The example's row, or None when it is longer than ``max_seq_len``."""
        ids, plen = tokenize_example(tokenizer, prompt, target)
        if len(ids) > max_seq_len:
            return None
        return {"episode_id": ep.episode_id, "task": task, "input_ids": ids, "prompt_len": plen}

    rows: list[dict[str, Any]] = []
    dropped = 0
    n = len(ep.actions)
    if rollout_starts == "every":
        for start in range(1, n):
            s, a = ep.states[start:], ep.actions[start:]
            row = example(
                "rollout",
                rollout_prompt(codec, ep.instruction, s[0]),
                codec.encode_trajectory(s, a),
            )
            if row is not None:
                rows.append(row)
    for task in ("rollout", "explain", "consequence"):

        def at(start: int, task: str = task) -> dict[str, Any] | None:
            pair = next((p, t) for k, p, t in task_pairs(codec, ep, start=start) if k == task)
            return example(task, *pair)

        row = _earliest_fitting(at, n)
        if row is not None:
            rows.append(row)
        else:
            dropped += 1
    for t in range(n):  # policy: every state's action, under the rollout prompt
        row = example(
            "policy",
            rollout_prompt(codec, ep.instruction, ep.states[t]),
            codec.join(codec.encode_action(ep.actions[t])),
        )
        if row is not None:
            rows.append(row)
    for t in range(n):
        row = example(
            "dynamics",
            dynamics_prompt(codec, ep.states[t], ep.actions[t]),
            codec.join(codec.encode_next_state(ep.states[t], ep.states[t + 1])),
        )
        if row is not None:
            rows.append(row)
        else:
            dropped += 1
    for t, a in lookahead_pairs(ep, lookahead_pushes):
        row = example(
            "dynamics",
            dynamics_prompt(codec, ep.states[t], a),
            codec.join(codec.encode_next_state(ep.states[t], ep.lookahead[t, a])),
        )
        if row is not None:
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


def lookahead_pairs(ep: EpisodeArrays, k: int) -> list[tuple[int, int]]:
    """``(step, action)`` of the ``k`` lookahead transitions taken from each state of ``ep``:
    actions other than the one taken, with a known next state, a seeded sample."""
    if k <= 0 or ep.lookahead is None:
        return []
    out = []
    for t in range(len(ep.actions)):
        known = np.isfinite(ep.lookahead[t]).all(axis=1)
        known[int(ep.actions[t])] = False  # the episode's own transition is already there
        choices = np.flatnonzero(known)
        rng = np.random.default_rng([zlib.crc32(ep.episode_id.encode()), t])
        picked = rng.choice(choices, size=min(k, len(choices)), replace=False)
        out += [(t, int(a)) for a in sorted(picked)]
    return out


RELABELLED = "~r"
"""Separator of a relabelled copy's episode id: ``<source id>~r<k>``."""


def source_episode(episode_id: str) -> str:
    """The collected episode a (possibly relabelled) example comes from."""
    return episode_id.split(RELABELLED)[0]


def relabelled_copies(ep: EpisodeArrays, n: int, seed: int) -> list[EpisodeArrays]:
    """``n`` copies of a CLEVR training episode under drawn symmetries (colours renamed, table
    mirrored; :mod:`kalm_ray.envs.clevr.symmetry`), seeded by ``(seed, episode id, copy)``.
    Copy ``k``'s id is ``<id>~r<k>``. The draws are independent (with replacement, the
    identity included: of 16, about 0.5 per episode repeat one), so copy ``k`` is the same
    whatever ``n`` is."""
    if n <= 0:
        return []
    from kalm_ray.envs.clevr.symmetry import random_relabel, relabel_episode

    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, zlib.crc32(ep.episode_id.encode()), k])
        task, text, states, actions, look = relabel_episode(
            random_relabel(rng), ep.task, ep.instruction, ep.states, ep.actions, ep.lookahead
        )
        copy_id = f"{ep.episode_id}{RELABELLED}{k}"
        out.append(EpisodeArrays(copy_id, task, text, states, actions, look))
    return out


# ---- splitting and episodes from rows ---------------------------------------------------------


def is_heldout(episode_id: str, fraction: float, seed: int) -> bool:
    """Whether an episode is in the held-out split: a stable hash of (seed, id), not of rows."""
    h = hashlib.sha256(f"{seed}:{episode_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def episodes_from_table(table: Any) -> list[EpisodeArrays]:
    """Episodes of a transition table (``kalm_ray.data.schema``), rows in any order; the
    episodes come sorted by id."""
    from kalm_ray.data.schema import column_matrix

    ids = table.column("episode_id").to_pylist()
    t = np.asarray(table.column("t").to_numpy())
    state = column_matrix(table, "state")
    nxt = column_matrix(table, "next_state")
    act_col = table.column("action").combine_chunks()
    if hasattr(act_col.type, "list_size"):
        actions = column_matrix(table, "action")
    else:
        actions = np.asarray(act_col.to_numpy(zero_copy_only=False), np.int64)
    tasks = table.column("task").to_pylist()
    instr = table.column("instruction").to_pylist()
    look = None
    if "lookahead" in table.column_names:
        look = column_matrix(table, "lookahead").reshape(len(ids), -1, state.shape[1])
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(ids):
        groups.setdefault(e, []).append(i)
    out = []
    # Episodes sorted by id: Ray Data writes rows in task-completion order, and callers pick
    # episodes by position (seeded samples), which must not depend on that order.
    for e, rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: t[r])
        states = np.concatenate([state[rows], nxt[rows[-1:]]], axis=0)
        out.append(
            EpisodeArrays(
                episode_id=e,
                task=tasks[rows[0]],
                instruction=instr[rows[0]],
                states=states,
                actions=actions[rows],
                lookahead=None if look is None else look[rows],
            )
        )
    return out


class ExampleBuilder:
    """Ray Data ``map_groups`` callable: one episode's rows -> its examples (with a split column).

    Holds the codec and the tokenizer, loaded once per worker from the work folder;
    ``options`` are :func:`episode_examples`' keywords (``max_seq_len``, ...). A training
    episode also gives the examples of its ``relabel_copies`` (:func:`relabelled_copies`, ids
    ``<id>~r<k>``, split ``train``); a held-out one never does.
    """

    def __init__(
        self,
        codec_path: str,
        tokenizer_dir: str,
        *,
        heldout_fraction: float,
        seed: int,
        relabel_copies: int = 0,
        **options: Any,
    ):
        from transformers import AutoTokenizer

        from kalm_ray.localcopy import local_copy

        # Paths may be run-dir URIs: read from there (this actor may be on any node).
        self.codec = Codec.load(local_copy(codec_path))
        self.tokenizer = AutoTokenizer.from_pretrained(local_copy(tokenizer_dir))
        self.options = options
        self.fraction = heldout_fraction
        self.seed = seed
        self.relabel_copies = relabel_copies

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows: list[dict[str, Any]] = []
        for ep in episodes_from_table(batch):
            split = "heldout" if is_heldout(ep.episode_id, self.fraction, self.seed) else "train"
            exs, dropped = episode_examples(self.codec, self.tokenizer, ep, **self.options)
            if split == "train":
                for copy in relabelled_copies(ep, self.relabel_copies, self.seed):
                    more, gone = episode_examples(self.codec, self.tokenizer, copy, **self.options)
                    exs, dropped = exs + more, dropped + gone
            rows += [{**r, "split": split, "dropped": 0} for r in exs]
            if dropped:
                rows.append(
                    {
                        "episode_id": ep.episode_id,
                        "task": "dropped",
                        "input_ids": [],
                        "prompt_len": 0,
                        "split": split,
                        "dropped": dropped,
                    }
                )
        schema = pa.schema(
            [
                ("episode_id", pa.string()),
                ("task", pa.string()),
                ("input_ids", pa.list_(pa.int32())),
                ("prompt_len", pa.int32()),
                ("split", pa.string()),
                ("dropped", pa.int32()),
            ]
        )
        return pa.Table.from_pylist(rows, schema=schema)
