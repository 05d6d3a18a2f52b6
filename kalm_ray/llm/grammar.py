"""The codec's grammar as a per-position token constraint (grammar-constrained decoding).

A rollout's layout is known before a single token is generated (:mod:`kalm_ray.llm.codec`)::

    trajectory := step{1..max_steps} <end>
    step       := ACTION STATE
    ACTION     := <act_a>                    discrete (CLEVR: one of 40 tokens)
                | <act> abin x k             continuous: the marker, then k action bins
    STATE      := sbin x f {<entity> sbin x n}   free dims, then every entity present
                | sbin x m                   delta coding: the m moving dims, no names

An entity is present in every state of an episode or in none (the objects of a task do not
appear or vanish), so the entities of a rollout's steps are those of its start state, and a
step is a *fixed* sequence of slots for a given request. The token allowed at generated
position ``p`` is then a pure function of ``p``: slot ``p % L`` of the step template, and at a
step boundary (slot 0) an action, the end token (after at least one step), or only the end
token (once ``max_steps`` steps are written). Under ``delta`` coding a state bin is one of the
``2c + 1`` usable change bins, never the unused top bin.

Backends turn these slot kinds into masks over their vocabulary (``hf``: a logits processor,
:class:`kalm_ray.llm.imagine.backends.hf.GrammarMask`). Constrained decoding removes malformed text,
not implausible physics: the validity filter still judges every rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kalm_ray.llm.codec import Codec

ACT = 0
"""The first step's action slot: an action token (or the continuous marker)."""
ACT_OR_END = 1
"""A later step boundary: another step, or the end of the rollout."""
END = 2
"""The step limit is reached: only the end token."""
ACTION_BIN = 3
"""A continuous action dimension: any of the ``n_bins`` bins (action bounds)."""
STATE_BIN = 4
"""A state dimension: any bin under absolute coding, a usable change bin under delta."""
ENTITY0 = 5
"""``ENTITY0 + k``: the name token of entity ``k`` (layout order)."""


def step_template(codec: Codec, start_state: np.ndarray) -> np.ndarray:
    """Slot kinds of one step of a rollout from ``start_state``, ``(L,)`` int64.

    Slot 0 is the action slot (kind :data:`ACT`; :func:`slot_kind` turns it into
    ``ACT_OR_END``/``END`` after the first step). ``L == len(step tokens)`` of every step.
    """
    s = np.asarray(start_state, np.float32).reshape(-1)
    kinds = [ACT]
    if not codec.discrete:
        kinds += [ACTION_BIN] * codec.n_actions
    if codec.compact_steps:
        return np.asarray(kinds + [STATE_BIN] * len(codec.moving_dims(s)), np.int64)
    covered = np.zeros(codec.state_dim, bool)
    for _, a, b in codec.entities:
        covered[a:b] = True
    kinds += [STATE_BIN] * int((~covered).sum())
    for k, (_, a, b) in enumerate(codec.entities):
        if np.any(s[a:b] != 0):
            kinds += [ENTITY0 + k] + [STATE_BIN] * (b - a)
    return np.asarray(kinds, np.int64)


def slot_kind(template: np.ndarray, position: int, max_steps: int) -> int:
    """Kind of generated position ``position`` (0 = first generated token) of a rollout."""
    step, slot = divmod(int(position), len(template))
    if slot:
        return int(template[slot])
    if step >= max_steps:
        return END
    return ACT if step == 0 else ACT_OR_END


def kind_tokens(codec: Codec) -> list[list[str]]:
    """Token strings allowed by each slot kind, indexed by kind (``ENTITY0 + k`` included)."""
    if codec.state_coding == "delta":
        c = (codec.n_bins - 1) // 2
        state_bins = codec.bin_tokens[: 2 * c + 1]
    else:
        state_bins = list(codec.bin_tokens)
    acts = list(codec.action_tokens)
    out: list[list[str]] = [acts, [*acts, codec.end_token], [codec.end_token]]
    out += [list(codec.bin_tokens), state_bins]
    out += [[tok] for tok in codec.entity_tokens]
    return out


def action_length(codec: Codec) -> int:
    """Tokens of one action: 1 (discrete) or the marker plus one bin per dimension."""
    return 1 if codec.discrete else 1 + codec.n_actions


@dataclass(frozen=True)
class RowGrammar:
    """What the constraint needs of one request: its step template and its step limit."""

    template: np.ndarray
    max_steps: int

    @classmethod
    def for_request(cls, codec: Codec, start_state: np.ndarray, max_steps: int) -> RowGrammar:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        return cls(step_template(codec, start_state), int(max_steps))

    def kind_at(self, position: int) -> int:
        return slot_kind(self.template, position, self.max_steps)

    def max_tokens(self) -> int:
        """Tokens of the longest legal rollout: ``max_steps`` steps and the end token."""
        return len(self.template) * self.max_steps + 1


@dataclass(frozen=True)
class NextStateGrammar:
    """The constraint on a dynamics prompt's answer: one step's STATE slots (the step template
    without its action), e.g. CLEVR's 10 change bins. Used by the stepwise imaginer."""

    kinds: np.ndarray

    @classmethod
    def for_request(cls, codec: Codec, start_state: np.ndarray) -> NextStateGrammar:
        return cls(step_template(codec, start_state)[action_length(codec) :])

    def kind_at(self, position: int) -> int:
        return int(self.kinds[min(int(position), len(self.kinds) - 1)])

    def __len__(self) -> int:
        return len(self.kinds)
