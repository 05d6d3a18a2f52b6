"""States and actions <-> tokens: the numbers the grounded LLM reads and writes.

Every state dimension is clipped to the environment's bounds (``suite.layout.low/high``,
from the env spec, never from data), normalised and quantised into ``n_bins`` equal bins;
each bin is one token, shared by all dimensions (the position in the step says which
dimension a token is). Decoding returns the bin centre, so encode -> decode is exact to
half a bin: ``|x - decode(encode(x))| <= (high - low) / (2 * n_bins)`` for ``x`` within
bounds. Discrete actions are tokens of their own; continuous actions are binned like
states, with the action space's bounds.

Text of one trajectory (``encode_trajectory``), tokens written back to back, no separator::

    step := ACTION STATE            one env step: the action, then the state it led to
    ACTION := <act_a>               discrete: one token per action (CLEVR: 40)
            | <act> b_1 .. b_k      continuous: the action marker, then k bin tokens
    STATE := b_1 .. b_f             the dimensions that belong to no entity (CLEVR: all 10)
             { <entity> b .. b }    then each *present* entity in layout order, led by
                                    its name token (an entity whose values are all zero is
                                    absent and decodes to zeros)
    trajectory := step* <end>       the start state is not repeated (it is in the prompt)

A step's STATE under ``delta`` coding (below) is *compact*: it writes only the dimensions a
step can change (``moving_dims``: not ``suite.layout.fixed``) of the free dims and of the
entities present in the state before it, with no entity name tokens. The entities of an
episode are those of its start state (objects do not appear or vanish), the start state is
in the prompt, and a goal, a wall or the axes a joint holds never change, so tokens spent on
them carry nothing. Meta-World: 5-15 state tokens per step instead of 17-33 (reach: gripper
4 + puck 7; button-press: gripper 4 + the button's slide axis 1); CLEVR is unchanged (no
entities, every dimension moves).

State coding (``state_coding``, recorded in ``codec.json``):

- ``absolute``: a step's STATE is the state itself, binned on the env bounds;
- ``delta`` (default for grounding): a step's STATE is its *change* from the previous step,
  binned on ``[-max_step_delta, +max_step_delta]`` (the env's physical limit per step) with
  an odd number of usable bins so that "no change" is exactly the middle bin. Deltas are
  taken from the previously *reconstructed* state (closed loop), so quantisation error never
  accumulates: every decoded state is within half a delta bin of the true one. Why: in one
  step most of a state does not move (CLEVR: four of five balls), so an absolute coding asks
  the model to copy ten numbers exactly every step, which a small model learns slowly and
  gets wrong in ways that look like teleporting balls; under ``delta`` copying is one
  repeated token and the model only has to learn what moves. A delta beyond the physical
  limit cannot be written at all. Start states in prompts and ``consequence`` targets
  (final states) stay absolute.

``codec.json`` (:meth:`Codec.save`) holds everything needed to decode: bounds, bins,
entity slices and the token strings. Token strings are taken from tokens the base
vocabulary already has and never uses (BERT ``[unusedN]``, Llama-3
``<|reserved_special_token_N|>``, ...) so a LoRA adapter stays servable as it is; only when
a vocabulary has too few are new tokens ``<|kalm_N|>`` named (``token_source == "added"``;
the model must then be saved with resized, merged weights).

Backends must decode generated ids with ``skip_special_tokens=False`` (reserved tokens
are "special" in some tokenizers); whitespace between tokens is ignored by the parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CODEC_FILE = "codec.json"
CODEC_VERSION = 1
STATE_CODINGS: tuple[str, ...] = ("absolute", "delta")

DECODE_REASONS: tuple[str, ...] = ("unparseable", "wrong_step_shape", "too_long", "no_end", "empty")
"""Why a text does not decode, in a fixed order:

- ``unparseable``: text that is not a codec token (words, broken tokens) before the end token;
- ``wrong_step_shape``: codec tokens in the wrong place (a bin where an action belongs, too few
  values for a state, entities repeated or out of order, a step cut in the middle);
- ``too_long``: more than ``max_steps`` steps;
- ``no_end``: the text stops without the end token (generation hit its token limit);
- ``empty``: the end token comes before any step.
"""

# Families of never-used tokens found in common vocabularies, tried in this order.
_RESERVED_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^\[unused(\d+)\]$"),  # BERT / MiniLM
    re.compile(r"^<\|reserved_special_token_(\d+)\|>$"),  # Llama 3
    re.compile(r"^<unused(\d+)>$"),  # Gemma
    re.compile(r"^<extra_id_(\d+)>$"),  # T5-style sentinels
)


class CodecError(ValueError):
    """A text that does not decode into a rollout.

    Attributes:
        reason: one of :data:`DECODE_REASONS`.
        detail: a short human-readable explanation (position, offending token).
    """

    def __init__(self, reason: str, detail: str = ""):
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def quantize(x: np.ndarray, low: np.ndarray, high: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value.

    Args:
        x: ``(..., D)`` values in env units; clipped to ``[low, high]`` first.
        low, high: ``(D,)`` bounds; a dimension with ``high == low`` always gets bin 0.
        n_bins: bins per dimension.

    Returns:
        ``(..., D)`` int64 in ``[0, n_bins)``; bin ``i`` covers
        ``[low + i*w, low + (i+1)*w)`` with ``w = (high - low) / n_bins``.
    """
    x = np.asarray(x, dtype=np.float64)
    low = np.asarray(low, dtype=np.float64)
    span = np.asarray(high, dtype=np.float64) - low
    safe = np.where(span > 0, span, 1.0)
    u = (np.clip(x, low, low + span) - low) / safe
    return np.clip(np.floor(u * n_bins), 0, n_bins - 1).astype(np.int64)


def dequantize(idx: np.ndarray, low: np.ndarray, high: np.ndarray, n_bins: int) -> np.ndarray:
    """Centre of each bin, ``(..., D)`` float32 in env units (inverse of :func:`quantize`)."""
    low = np.asarray(low, dtype=np.float64)
    span = np.asarray(high, dtype=np.float64) - low
    return (low + (np.asarray(idx, dtype=np.float64) + 0.5) / n_bins * span).astype(np.float32)


def quantize_delta(d: np.ndarray, bound: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each change, symmetric around zero.

    Args:
        d: ``(..., D)`` changes in env units; clipped to ``[-bound, bound]``.
        bound: ``(D,)`` largest change; a dimension with ``bound == 0`` always gets the middle bin.
        n_bins: tokens available; the first ``2c + 1`` are used, ``c = (n_bins - 1) // 2``, so
            that zero is exactly the middle bin ``c``.

    Returns:
        ``(..., D)`` int64 in ``[0, 2c]``; bin ``i`` decodes to ``(i - c) * bound / c``.
    """
    c = (n_bins - 1) // 2
    bound = np.asarray(bound, np.float64)
    w = np.where(bound > 0, bound / c, 1.0)
    idx = np.rint(np.clip(np.asarray(d, np.float64), -bound, bound) / w) + c
    return np.clip(idx, 0, 2 * c).astype(np.int64)


def dequantize_delta(idx: np.ndarray, bound: np.ndarray, n_bins: int) -> np.ndarray:
    """Change of each bin, ``(..., D)`` float64 (inverse of :func:`quantize_delta`)."""
    c = (n_bins - 1) // 2
    return (np.asarray(idx, np.float64) - c) * (np.asarray(bound, np.float64) / c)


def _fixed_mask(layout: Any) -> np.ndarray:
    """``layout.fixed`` as a ``(D,)`` bool mask (all False where the layout has none)."""
    fixed = getattr(layout, "fixed", None)
    return np.zeros(len(layout.low), bool) if fixed is None else np.asarray(fixed, bool)


def reserved_tokens(vocab: Iterable[str]) -> list[str]:
    """Never-used tokens of a vocabulary, one family (the first that has any), by number."""
    vocab = list(vocab)
    for pat in _RESERVED_PATTERNS:
        found = [(int(m.group(1)), t) for t in vocab if (m := pat.match(t))]
        if found:
            return [t for _, t in sorted(found)]
    return []


@dataclass
class Codec:
    """Numbers <-> token strings for one environment suite (see the module docstring).

    Build with :meth:`for_suite`; persist with :meth:`save` / :meth:`load`.
    """

    env: str
    low: np.ndarray
    """``(D,)`` float32 state lower bounds (env units)."""
    high: np.ndarray
    """``(D,)`` float32 state upper bounds."""
    n_bins: int
    entities: list[tuple[str, int, int]]
    """``(name, start, stop)`` per entity slot, in layout order; empty for flat states."""
    action_kind: str
    """``discrete`` or ``continuous``."""
    n_actions: int
    """Discrete: number of actions; continuous: action dimensions."""
    action_low: np.ndarray
    action_high: np.ndarray
    bin_tokens: list[str]
    action_tokens: list[str]
    """Discrete: one token per action; continuous: ``[<act>]``, the step marker."""
    entity_tokens: list[str]
    end_token: str
    """Marks the end of a trajectory; generation should stop at it."""
    token_source: str = "reserved"
    """``reserved`` (tokens the vocabulary has) or ``added`` (new tokens, resized model)."""
    names: list[str] = field(default_factory=list)
    """One name per state dimension (documentation only)."""
    state_coding: str = "absolute"
    """``absolute`` or ``delta`` (see the module docstring)."""
    delta_bound: np.ndarray | None = None
    """``(D,)`` largest change per step (``delta`` coding; the env's ``max_step_delta``)."""
    fixed_dims: list[int] | None = None
    """Dimensions no step changes (``suite.layout.fixed``); a ``delta`` step writes the
    others only, without entity name tokens (see the module docstring). None (codecs saved
    before compact steps) = every dimension of every present entity, led by its name."""

    def __post_init__(self) -> None:
        if self.state_coding not in STATE_CODINGS:
            raise ValueError(f"state_coding {self.state_coding!r}: expected one of {STATE_CODINGS}")
        if self.state_coding == "delta":
            if self.delta_bound is None:
                raise ValueError("delta state coding needs delta_bound (max change per step)")
            if self.n_bins < 3:
                raise ValueError("delta state coding needs n_bins >= 3")
        if self.delta_bound is not None:
            self.delta_bound = np.asarray(self.delta_bound, np.float32)
        self.low = np.asarray(self.low, np.float32)
        self.high = np.asarray(self.high, np.float32)
        self.action_low = np.asarray(self.action_low, np.float32)
        self.action_high = np.asarray(self.action_high, np.float32)
        d = len(self.low)
        covered = np.zeros(d, bool)
        for _, a, b in self.entities:
            covered[a:b] = True
        self._free = np.flatnonzero(~covered)
        self._compact = self.state_coding == "delta" and self.fixed_dims is not None
        moving = np.ones(d, bool)
        if self.fixed_dims:
            moving[np.asarray(self.fixed_dims, np.int64)] = False
        self._moving = moving
        self._moving_cache: dict[bytes, np.ndarray] = {}
        self._ent_member = np.zeros((d, len(self.entities)), np.float32)  # dim in entity k
        for k, (_, a, b) in enumerate(self.entities):
            self._ent_member[a:b, k] = 1.0
        self._bin_of = {t: i for i, t in enumerate(self.bin_tokens)}
        self._act_of = {t: i for i, t in enumerate(self.action_tokens)}
        self._ent_of = {t: i for i, t in enumerate(self.entity_tokens)}
        alt = "|".join(re.escape(t) for t in sorted(self.all_tokens, key=len, reverse=True))
        self._token_re = re.compile(alt)

    # ---- construction -------------------------------------------------------------------

    @staticmethod
    def tokens_needed(*, n_bins: int, n_action_tokens: int, n_entities: int) -> int:
        """Distinct token strings a codec uses: bins, actions, entities and the end token."""
        return n_bins + n_action_tokens + n_entities + 1

    @classmethod
    def for_suite(
        cls,
        suite: Any,
        n_bins: int = 256,
        *,
        vocab: Iterable[str] | None = None,
        state_coding: str = "absolute",
    ) -> Codec:
        """The codec of a suite (``suite.layout`` bounds/entities, ``suite.action_space``).

        Args:
            suite: an env suite (:class:`kalm_ray.envs.suite.Suite`).
            n_bins: bins per dimension (one token each).
            vocab: the base tokenizer's vocabulary (token strings). None = BERT's
                ``[unusedN]`` names (the embedded ``tiny`` model's tokenizer has them).
                Otherwise the vocabulary's never-used tokens when there are enough, else new
                ``<|kalm_N|>`` tokens (``token_source == "added"``).
            state_coding: ``absolute`` or ``delta`` (steps as changes bounded by the layout's
                ``max_step_delta``; see the module docstring).
        """
        layout = suite.layout
        space = suite.action_space
        if hasattr(space, "n"):  # gymnasium Discrete (duck-typed: no gymnasium import needed)
            kind, n_act, n_act_tok = "discrete", int(space.n), int(space.n)
            a_low, a_high = np.zeros(0, np.float32), np.zeros(0, np.float32)
        else:
            kind, n_act, n_act_tok = "continuous", int(np.prod(space.shape)), 1
            a_low = np.asarray(space.low, np.float32).reshape(-1)
            a_high = np.asarray(space.high, np.float32).reshape(-1)
        ents = [(name, int(s.start), int(s.stop)) for name, s in layout.entities.items()]
        ents.sort(key=lambda e: e[1])
        need = cls.tokens_needed(n_bins=n_bins, n_action_tokens=n_act_tok, n_entities=len(ents))
        if vocab is None:
            pool, source = [f"[unused{i}]" for i in range(need)], "reserved"
        else:
            pool, source = reserved_tokens(vocab), "reserved"
            if len(pool) < need:
                pool, source = [f"<|kalm_{i}|>" for i in range(need)], "added"
        it = iter(pool)
        bins = [next(it) for _ in range(n_bins)]
        acts = [next(it) for _ in range(n_act_tok)]
        ent_toks = [next(it) for _ in ents]
        end = next(it)
        return cls(
            env=suite.name,
            low=layout.low,
            high=layout.high,
            n_bins=n_bins,
            entities=ents,
            action_kind=kind,
            n_actions=n_act,
            action_low=a_low,
            action_high=a_high,
            bin_tokens=bins,
            action_tokens=acts,
            entity_tokens=ent_toks,
            end_token=end,
            token_source=source,
            names=list(layout.names),
            state_coding=state_coding,
            delta_bound=(
                None
                if getattr(layout, "max_step_delta", None) is None
                else np.asarray(layout.max_step_delta, np.float32)
            ),
            fixed_dims=(
                None
                if state_coding != "delta"
                else [int(i) for i in np.flatnonzero(_fixed_mask(layout))]
            ),
        )

    @property
    def state_dim(self) -> int:
        return len(self.low)

    @property
    def discrete(self) -> bool:
        return self.action_kind == "discrete"

    @property
    def compact_steps(self) -> bool:
        """A step's STATE holds the moving dims only, no entity names (``delta`` coding)."""
        return self._compact

    @property
    def all_tokens(self) -> list[str]:
        """Every token string the codec writes (bins, actions, entities, end)."""
        return [*self.bin_tokens, *self.action_tokens, *self.entity_tokens, self.end_token]

    def max_step_tokens(self) -> int:
        """Most tokens one step can take (every entity present)."""
        act = 1 if self.discrete else 1 + self.n_actions
        if self._compact:
            return act + int(self._moving.sum())
        return act + len(self._free) + sum(1 + b - a for _, a, b in self.entities)

    def _present(self, s: np.ndarray) -> bytes:
        """Which entities ``s`` holds (not all zeros), as a hashable key."""
        if not self.entities:
            return b""
        return ((s != 0).astype(np.float32) @ self._ent_member > 0).tobytes()

    def moving_dims(self, state: np.ndarray) -> np.ndarray:
        """Dimensions a compact step after ``state`` writes, in order: the free dims, then
        each entity present in ``state`` (layout order), fixed dims left out."""
        s = np.asarray(state, np.float32).reshape(-1)
        present = self._present(s)
        dims = self._moving_cache.get(present)
        if dims is None:  # one array per entity set (a task's), built once
            keep = np.zeros(self.state_dim, bool)
            keep[self._free] = True
            for (_, a, b), here in zip(self.entities, present, strict=True):
                keep[a:b] |= bool(here)
            dims = self._moving_cache[present] = np.flatnonzero(keep & self._moving)
        return dims

    # ---- encoding -----------------------------------------------------------------------

    def join(self, tokens: list[str]) -> str:
        """Token strings as text: back to back (the tokenizer splits them, whitespace is noise)."""
        return "".join(tokens)

    def encode_state(self, state: np.ndarray) -> list[str]:
        """Tokens of one absolute ``(D,)`` state: free dims, then each present entity."""
        s = np.asarray(state, np.float32).reshape(-1)
        return self._state_tokens(quantize(s, self.low, self.high, self.n_bins), s)

    def _state_tokens(self, idx: np.ndarray, state: np.ndarray) -> list[str]:
        """A STATE's tokens from per-dimension bin indices: free dims, then each entity
        present in ``state`` (not all zeros), led by its name token."""
        out = [self.bin_tokens[i] for i in idx[self._free]]
        for k, (_, a, b) in enumerate(self.entities):
            if np.any(state[a:b] != 0):
                out.append(self.entity_tokens[k])
                out += [self.bin_tokens[i] for i in idx[a:b]]
        return out

    def encode_next_state(self, prev: np.ndarray, state: np.ndarray) -> list[str]:
        """Tokens of a step's state given the state before it (what a STATE in a step is)."""
        return self._encode_step_state(np.asarray(prev, np.float32).reshape(-1), state)[0]

    def _encode_step_state(
        self, prev: np.ndarray, state: np.ndarray
    ) -> tuple[list[str], np.ndarray]:
        """A step's STATE tokens and the state a decoder reconstructs from them.

        ``prev`` is the *reconstructed* previous state (float32), so delta coding is closed
        loop; entity presence follows the true ``state`` (an all-zero entity is absent).
        Absolute coding never reads ``prev``, so it returns ``state`` itself without decoding.
        """
        s = np.asarray(state, np.float32).reshape(-1)
        if self.state_coding == "absolute":
            return self.encode_state(s), s
        assert self.delta_bound is not None
        d = s.astype(np.float64) - prev.astype(np.float64)
        idx = quantize_delta(d, self.delta_bound, self.n_bins)
        if self._compact:
            toks = [self.bin_tokens[i] for i in idx[self.moving_dims(prev)]]
        else:
            toks = self._state_tokens(idx, s)
        return toks, self._decode_state(toks, 0, prev)[0]

    def encode_action(self, action: Any) -> list[str]:
        """Tokens of one action: an int (discrete) or a ``(k,)`` vector (continuous)."""
        if self.discrete:
            a = int(np.asarray(action).reshape(-1)[0])
            if not 0 <= a < self.n_actions:
                raise ValueError(f"action {a} outside Discrete({self.n_actions})")
            return [self.action_tokens[a]]
        idx = quantize(
            np.asarray(action, np.float32).reshape(-1),
            self.action_low,
            self.action_high,
            self.n_bins,
        )
        return [self.action_tokens[0], *(self.bin_tokens[i] for i in idx)]

    def encode_steps(self, states: np.ndarray, actions: np.ndarray) -> list[str]:
        """Tokens of the steps of an episode (no start state, no end token).

        Args:
            states: ``(T+1, D)``, the start state then one per step.
            actions: ``(T,)`` ints or ``(T, k)`` floats.
        """
        out: list[str] = []
        recon = np.asarray(states[0], np.float32).reshape(-1)
        for t in range(len(actions)):
            out += self.encode_action(actions[t])
            toks, recon = self._encode_step_state(recon, states[t + 1])
            out += toks
        return out

    def encode_trajectory(self, states: np.ndarray, actions: np.ndarray) -> str:
        """Text of an episode's steps followed by :attr:`end_token` (see the module grammar).

        ``decode_rollout(states[0], encode_trajectory(states, actions), max_steps=T)`` gives the
        states and actions back to half a bin.
        """
        return self.join(self.encode_steps(states, actions) + [self.end_token])

    # ---- decoding -----------------------------------------------------------------------

    def _lex(self, text: str) -> tuple[list[str], bool]:
        """Codec tokens of ``text`` up to the end token, and whether the end token was seen."""
        toks: list[str] = []
        pos, n = 0, len(text)
        while True:
            while pos < n and text[pos].isspace():
                pos += 1
            if pos >= n:
                return toks, False
            m = self._token_re.match(text, pos)
            if m is None:
                raise CodecError(
                    "unparseable", f"non-codec text at char {pos}: {text[pos : pos + 20]!r}"
                )
            if m.group(0) == self.end_token:
                return toks, True
            toks.append(m.group(0))
            pos = m.end()

    def _bins(self, toks: list[str], i: int, count: int, what: str) -> tuple[np.ndarray, int]:
        if i + count > len(toks):
            raise CodecError("wrong_step_shape", f"{what}: step cut short at token {len(toks)}")
        out = np.empty(count, np.int64)
        for j in range(count):
            b = self._bin_of.get(toks[i + j])
            if b is None:
                raise CodecError(
                    "wrong_step_shape", f"{what}: expected a value, got {toks[i + j]!r}"
                )
            out[j] = b
        return out, i + count

    def _values(self, idx: np.ndarray, dims: Any, prev: np.ndarray | None) -> np.ndarray:
        """Decoded values of ``dims``: absolute, or ``prev`` + change (delta coding, a step)."""
        if self.state_coding == "absolute" or prev is None:
            return dequantize(idx, self.low[dims], self.high[dims], self.n_bins)
        assert self.delta_bound is not None
        change = dequantize_delta(idx, self.delta_bound[dims], self.n_bins)
        return (prev[dims].astype(np.float64) + change).astype(np.float32)

    def _decode_state(
        self, toks: list[str], i: int, prev: np.ndarray | None = None
    ) -> tuple[np.ndarray, int]:
        """A STATE from ``toks[i:]``: absolute without ``prev``, else a step after ``prev``."""
        if prev is not None and self._compact:
            dims = self.moving_dims(prev)
            idx, i = self._bins(toks, i, len(dims), "state")
            state = np.asarray(prev, np.float32).copy()
            state[dims] = self._values(idx, dims, prev)
            return state, i
        state = np.zeros(self.state_dim, np.float32)
        idx, i = self._bins(toks, i, len(self._free), "state")
        state[self._free] = self._values(idx, self._free, prev)
        last = -1
        while i < len(toks) and toks[i] in self._ent_of:
            k = self._ent_of[toks[i]]
            if k <= last:
                raise CodecError(
                    "wrong_step_shape", f"entity {self.entities[k][0]!r} repeated or out of order"
                )
            last = k
            _, a, b = self.entities[k]
            idx, i = self._bins(toks, i + 1, b - a, self.entities[k][0])
            state[a:b] = self._values(idx, slice(a, b), prev)
        return state, i

    def _decode_action(self, toks: list[str], i: int) -> tuple[Any, int]:
        a = self._act_of.get(toks[i])
        if a is None:
            raise CodecError(
                "wrong_step_shape", f"expected an action at token {i}, got {toks[i]!r}"
            )
        if self.discrete:
            return a, i + 1
        idx, i = self._bins(toks, i + 1, self.n_actions, "action")
        return dequantize(idx, self.action_low, self.action_high, self.n_bins), i

    def decode_state(self, text: str, prev: np.ndarray | None = None) -> np.ndarray:
        """One ``(D,)`` state from its tokens; raises CodecError.

        Without ``prev`` the text is an absolute state (a prompt's start, a final state); with
        ``prev`` it is a step's STATE (e.g. a dynamics prediction) after state ``prev``.
        """
        if not isinstance(text, str):
            raise CodecError("unparseable", f"expected text, got {type(text).__name__}")
        toks, _ = self._lex(text)
        if prev is not None:
            prev = np.asarray(prev, np.float32).reshape(-1)
        state, i = self._decode_state(toks, 0, prev)
        if i != len(toks):
            raise CodecError("wrong_step_shape", f"{len(toks) - i} tokens after the state")
        return state

    def decode_rollout(
        self, start_state: np.ndarray, text: str, *, max_steps: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """States and actions of a generated trajectory text.

        Args:
            start_state: ``(D,)``, the state the prompt gave (returned as row 0).
            text: the model's continuation; everything after :attr:`end_token` is ignored.
            max_steps: most steps accepted.

        Returns:
            ``states`` ``(T+1, D)`` float32 (bin centres; absent entities are zeros) and
            ``actions`` ``(T,)`` int64 or ``(T, k)`` float32, with ``1 <= T <= max_steps``.

        Raises:
            CodecError: with ``reason`` in :data:`DECODE_REASONS`; never another exception.
        """
        if not isinstance(text, str):
            raise CodecError("unparseable", f"expected text, got {type(text).__name__}")
        toks, ended = self._lex(text)
        states = [np.asarray(start_state, np.float32).reshape(self.state_dim)]
        actions: list[Any] = []
        i = 0
        while i < len(toks):
            if len(actions) >= max_steps:
                raise CodecError("too_long", f"more than {max_steps} steps")
            a, i = self._decode_action(toks, i)
            s, i = self._decode_state(toks, i, states[-1])
            actions.append(a)
            states.append(s)
        if not ended:
            raise CodecError("no_end", f"no end token after {len(actions)} steps")
        if not actions:
            raise CodecError("empty", "end token before any step")
        acts = (
            np.asarray(actions, np.int64) if self.discrete else np.stack(actions).astype(np.float32)
        )
        return np.stack(states), acts

    # ---- persistence --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CODEC_VERSION,
            "env": self.env,
            "n_bins": self.n_bins,
            "low": self.low.tolist(),
            "high": self.high.tolist(),
            "names": self.names,
            "entities": [list(e) for e in self.entities],
            "action_kind": self.action_kind,
            "n_actions": self.n_actions,
            "action_low": self.action_low.tolist(),
            "action_high": self.action_high.tolist(),
            "bin_tokens": self.bin_tokens,
            "action_tokens": self.action_tokens,
            "entity_tokens": self.entity_tokens,
            "end_token": self.end_token,
            "token_source": self.token_source,
            "state_coding": self.state_coding,
            "delta_bound": None if self.delta_bound is None else self.delta_bound.tolist(),
            "fixed_dims": self.fixed_dims,
            "grammar": "step := ACTION STATE; trajectory := step* END (see kalm_ray.llm.codec)",
            "decode_with_skip_special_tokens": False,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Codec:
        if d.get("version") != CODEC_VERSION:
            raise ValueError(f"codec version {d.get('version')!r}, expected {CODEC_VERSION}")
        return cls(
            env=d["env"],
            low=d["low"],
            high=d["high"],
            n_bins=int(d["n_bins"]),
            entities=[(str(n), int(a), int(b)) for n, a, b in d["entities"]],
            action_kind=d["action_kind"],
            n_actions=int(d["n_actions"]),
            action_low=d["action_low"],
            action_high=d["action_high"],
            bin_tokens=list(d["bin_tokens"]),
            action_tokens=list(d["action_tokens"]),
            entity_tokens=list(d["entity_tokens"]),
            end_token=d["end_token"],
            token_source=d.get("token_source", "reserved"),
            names=list(d.get("names", [])),
            state_coding=d.get("state_coding", "absolute"),
            delta_bound=d.get("delta_bound"),
            fixed_dims=d.get("fixed_dims"),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``codec.json`` (``path`` is the file or the folder that gets it)."""
        p = Path(path)
        if p.suffix != ".json":
            p = p / CODEC_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Codec:
        """Read ``codec.json`` (``path`` is the file or its folder)."""
        p = Path(path)
        if p.is_dir():
            p = p / CODEC_FILE
        return cls.from_dict(json.loads(p.read_text()))
