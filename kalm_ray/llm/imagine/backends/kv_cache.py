"""A KV cache allocated once for a whole decode (:func:`kalm_ray.llm.imagine.backends.hf.decode`).

Hugging Face's growing cache (``DynamicCache``) appends a step's keys and values with
``torch.cat``, which copies the whole cache every step: at batch 256 and ~300 positions that
is ~270 MB a step for the tiny model. Its static cache writes in place but attends over all
its positions from the first step on (~2x the attention work of a 221-token rollout). This
one does neither: storage for ``capacity`` positions, written in place, and attention over
the positions written so far, as in the growing cache (same shapes, same numbers).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer
from typing_extensions import override


class PreallocatedLayer(DynamicLayer):
    """One attention layer's keys and values: ``keys``/``values`` are views of the filled
    prefix of ``(B, heads, capacity, head_dim)`` buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    @override
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d_k = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_empty(b, h, self.capacity, d_k)
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
        self.is_initialized = True

    @override
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        self._k[:, :, start:end] = key_states
        self._v[:, :, start:end] = value_states
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    @override
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the batch rows ``beam_idx`` (the decode loop drops finished rows)."""
        n = self.keys.shape[-2]
        self._k, self._v = self._k.index_select(0, beam_idx), self._v.index_select(0, beam_idx)
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


def preallocated_cache(model: torch.nn.Module, capacity: int) -> Cache:
    """A cache for every attention layer of ``model``, each holding ``capacity`` positions."""
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])
