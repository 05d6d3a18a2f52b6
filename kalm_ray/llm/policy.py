"""The grounded LLM as a closed-loop policy (the KALM paper's LLM-as-policy baseline).

At every step the model is prompted with the instruction and the *current real state*, in
the rollout prompt it was grounded on (:func:`kalm_ray.llm.prompts.rollout_prompt`), and
the first action of its plan is decoded greedily under the codec's grammar restricted to
one action (:mod:`kalm_ray.llm.grammar`): every output is a legal action by construction.
Batched: one ``generate`` call per env step for all the environments a worker steps
together. The same object serves evaluation (``kalm evaluate``'s ``llm`` row) and the
grounding stage's check that grounding worked (held-out train-level goals, next to the
random policy on the same starts).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kalm_ray.eval.results import LLM_ALGO  # one name for the results row
from kalm_ray.llm.grammar import RowGrammar, action_length

__all__ = ["LLM_ALGO", "LLMPolicy"]


class LLMPolicy:
    """Instruction + current state -> one action, from a grounded model folder.

    Args:
        model_dir: ``run_dir/model`` (local path or URI).
        device: ``cpu``/``cuda``/``auto``.
        loader: ``(model_dir, device=..., dtype=...) -> (model, tokenizer, codec)``.
    """

    wants_instructions = True
    """:func:`kalm_ray.eval.episodes.run_episodes` passes states and wordings, not the
    policy observation (states + embeddings)."""

    def __init__(self, model_dir: str, *, device: str = "auto", loader: Any = None, seed: int = 0):
        import torch

        if loader is None:
            from kalm_ray.llm.model import load_grounded as loader
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok, codec = loader(model_dir, device=device)
        self._setup(model, tok, codec, device=device)
        self.info = {"algo": LLM_ALGO, "data": "real", "seed": seed, "model_dir": model_dir}

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, codec: Any) -> LLMPolicy:
        """A policy around a model already in memory (the grounding stage's metrics)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, codec, device=str(next(model.parameters()).device))
        self.info = {"algo": LLM_ALGO, "data": "real", "seed": 0}
        return self

    def _setup(self, model: Any, tok: Any, codec: Any, *, device: str) -> None:
        self.model, self.tok, self.codec, self.device = model.eval(), tok, codec, device
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def act_instructed(self, states: np.ndarray, instructions: list[str]) -> np.ndarray:
        """Greedy legal actions ``(B,)`` int64 (discrete) or ``(B, k)`` float32 (continuous)."""
        from kalm_ray.llm.imagine.backends.hf import constrained_tokens
        from kalm_ray.llm.prompts import rollout_prompt

        states = np.asarray(states, np.float32).reshape(len(instructions), -1)
        prompts = [
            rollout_prompt(self.codec, w, s) for w, s in zip(instructions, states, strict=True)
        ]
        rows = [RowGrammar.for_request(self.codec, s, 1) for s in states]
        toks, _ = constrained_tokens(
            self.model, self.tok, self.codec, prompts, rows, action_length(self.codec)
        )
        return decode_actions(self.codec, toks)

    def act(self, obs: np.ndarray) -> np.ndarray:  # pragma: no cover - guard, never called
        raise TypeError("LLMPolicy needs the instruction text: call act_instructed")


def decode_actions(codec: Any, toks: list[list[str]]) -> np.ndarray:
    """Each row's action tokens -> ``(B,)`` int64 (discrete) or ``(B, k)`` float32."""
    if codec.discrete:
        index = {t: i for i, t in enumerate(codec.action_tokens)}
        return np.asarray([index[t[0]] for t in toks], np.int64)
    return np.stack([codec._decode_action(t, 0)[0] for t in toks]).astype(np.float32)
