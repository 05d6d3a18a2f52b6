"""The ``hf`` backend: a Hugging Face model in an autoscaling Ray Data actor pool.

:class:`HFGenerator` is the callable class ``map_batches`` runs: each actor loads the model
once, then decodes a whole batch per call (:func:`decode`: left padding, a preallocated KV
cache, finished rows leave the batch), stopping a request at the codec's end token (or the
tokenizer's EOS) or at ``max_new_tokens``. When the spec lists the codec's tokens, a request
also stops at its first token outside them: its text is unparseable from there on anyway,
and a batch no longer runs to the token budget for the sake of rows that are already lost.

With ``spec.grammar`` (the default) every position is constrained to the tokens the codec's
grammar allows there (:class:`GrammarMask`, :mod:`kalm_ray.llm.grammar`): an action or the end
at a step boundary, a bin inside a step, the end token once the request's level allows no
more steps. Every rollout is then well-formed; the filter still judges its physics.

Sampling (temperature > 0) is done with the Gumbel-max trick in a logits processor, with one
random stream per request seeded by the request's seed: a request's output then depends on
its seed only, not on which batch or actor it landed in (plain ``do_sample`` draws from one
stream shared by the batch).

A logits processor here is ``proc(position, rows, scores) -> scores``: ``position`` the
generated position (the same for every row under left padding), ``rows`` the batch rows still
decoding (``(b,)`` indices into the batch it was built for), ``scores`` their ``(b, V)`` logits.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from kalm_ray.llm.imagine.backends import GenerationSpec

if TYPE_CHECKING:
    import ray.data
    import torch

    from kalm_ray.config import ImagineConfig


def load_hf_dir(model_dir: str, *, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """A plain Hugging Face model folder: ``(model, tokenizer)`` (no codec, no adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32)
    return model.to(device).eval(), tok


def _resolve_loader(path: str):
    mod, _, fn = path.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def gumbel_scores(
    logits: torch.Tensor, noise: torch.Tensor, *, temperature: float, top_p: float
) -> torch.Tensor:
    """Scores whose argmax is a sample from ``softmax(logits / temperature)`` within top-p.

    Args:
        logits: ``(B, V)`` float32 next-token logits.
        noise: ``(B, V)`` uniform(0, 1) draws, one independent row per request.
        temperature: > 0.
        top_p: nucleus mass in (0, 1]; tokens outside the nucleus get ``-inf``.

    Returns:
        ``(B, V)`` scores = ``logits / T + Gumbel`` (Gumbel-max: argmax is an exact sample).
    """
    import torch

    scores = logits / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        outside = (probs.cumsum(-1) - probs) >= top_p  # the first token is always kept
        scores = scores.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
    return scores + gumbel


class SeededSampling:
    """Logits processor: per-request seeded sampling via :func:`gumbel_scores`.

    ``seeds`` (one per row) or ``generators`` (``torch.Generator`` per row, carried across
    several calls: the stepwise imaginer draws each request's actions from one stream over
    all its steps). Each call draws one vocabulary of noise per row still decoding.
    """

    def __init__(
        self,
        seeds: list[int] | None = None,
        *,
        temperature: float,
        top_p: float,
        generators: list[Any] | None = None,
    ):
        import torch

        if generators is None:
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds or []]
        self.gens = generators
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, position: int, rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        vocab = scores.shape[-1]
        noise = torch.stack([torch.rand(vocab, generator=self.gens[i]) for i in rows.tolist()])
        return gumbel_scores(
            scores.float(), noise.to(scores.device), temperature=self.temperature, top_p=self.top_p
        )


class GrammarMask:
    """Logits processor: only the tokens the codec's grammar allows at each row's position.

    Each row has its own step template (entities of its start state) and step limit (its
    level); see :mod:`kalm_ray.llm.grammar`. The slot kind of every (row, position) is
    worked out once here, so a step is one gather of mask rows.
    """

    _tables: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
    """(tokenizer, codec) -> the (kinds, vocab) mask table: built once per process."""

    def __init__(self, tok: Any, codec: Any, rows: list[Any], *, n_positions: int):
        import torch

        self.table = self.table_for(tok, codec)
        self.kinds = torch.tensor(
            [[r.kind_at(p) for p in range(n_positions)] for r in rows], dtype=torch.long
        )

    @classmethod
    def table_for(cls, tok: Any, codec: Any) -> torch.Tensor:
        """``(n_kinds, vocab)`` bool: which token ids each slot kind allows."""
        import torch

        from kalm_ray.llm.grammar import kind_tokens

        key = (id(tok), id(codec))
        held = cls._tables.get(key)
        if held is None or held[0] is not tok or held[1] is not codec:  # ids can be reused
            kinds = kind_tokens(codec)
            vocab = max(len(tok), int(max(tok.get_vocab().values())) + 1)
            table = torch.zeros(len(kinds), vocab, dtype=torch.bool)
            for k, toks in enumerate(kinds):
                ids = tok.convert_tokens_to_ids(toks)
                if any(i is None or i == tok.unk_token_id for i in ids):
                    raise ValueError(
                        f"codec tokens {toks[:3]}... are not in the tokenizer's vocabulary"
                    )
                table[k, ids] = True
            cls._tables = {key: (tok, codec, table)}  # one model per process: keep one
        return cls._tables[key][2]

    def __call__(self, position: int, rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        if self.table.device != scores.device or self.table.shape[1] < scores.shape[1]:
            # Once: on the scores' device, as wide as the model's rows (beyond the tokenizer's
            # vocabulary: padding rows, never allowed).
            pad = max(0, scores.shape[1] - self.table.shape[1])
            self.table = torch.nn.functional.pad(self.table, (0, pad)).to(scores.device)
            self.kinds = self.kinds.to(scores.device)
        allowed = self.table[self.kinds[rows, position], : scores.shape[1]]
        return scores.masked_fill(~allowed, float("-inf"))


def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_id: int,
    processors: list[Any] | tuple[Any, ...] = (),
    stop_ids: list[int] | tuple[int, ...] = (),
    allowed: list[int] | None = None,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Greedy decoding (after ``processors``, e.g. masking and seeded sampling) of left-padded
    prompts; ``(B, n)`` int64 new token ids, ``n <= max_new_tokens``.

    What ``model.generate`` does for these models, without its per-step machinery: the prompts
    run once (logits of their last position only), then one token per row per step, with the
    KV cache allocated once for ``prompt + max_new_tokens`` positions and written in place
    (:mod:`~kalm_ray.llm.imagine.backends.kv_cache`). A row is done after a stop id, or with
    ``allowed`` after its first token outside it; its later positions are ``pad_id``. Once a
    quarter of the rows still in the batch are done they leave it, cache rows included, so a
    batch's long tail runs at the width of the rows still writing. Decoding ends when every
    row is done. ``timings`` (optional) gets ``prefill_s``, ``decode_s``, ``steps`` and
    ``row_steps`` (rows computed, summed over decode steps) added to it.
    """
    import time

    import torch

    from kalm_ray.llm.imagine.backends.kv_cache import preallocated_cache

    n_rows, prompt_len = input_ids.shape
    device = input_ids.device
    out = torch.full((n_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.cat([attention_mask, attention_mask.new_ones(n_rows, max_new_tokens)], dim=1)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = preallocated_cache(model, prompt_len + max_new_tokens)
    rows = torch.arange(n_rows, device=device)  # batch rows still in the computation
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    ends = None  # (V,) bool: the token ends its row
    ids, n_steps, row_steps, t0 = input_ids, 0, 0, time.perf_counter()
    prefill_s = 0.0
    with torch.inference_mode():
        for step in range(max_new_tokens):
            logits = (
                model(
                    input_ids=ids,
                    attention_mask=mask[:, : prompt_len + step],
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                .logits[:, -1]
                .float()
            )
            if step == 0:
                prefill_s = time.perf_counter() - t0
            else:
                row_steps += len(rows)
            for proc in processors:
                logits = proc(step, rows, logits)
            nxt = logits.argmax(-1).masked_fill(done, pad_id)
            out[rows, step] = nxt
            n_steps = step + 1
            if ends is None:
                ends = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
                if allowed is not None:
                    ends[:] = True
                    ends[torch.tensor(allowed, dtype=torch.long, device=device)] = False
                ends[torch.tensor(list(stop_ids), dtype=torch.long, device=device)] = True
            done |= ends[nxt]
            n_done = int(done.sum())
            if n_done == len(rows):
                break
            if n_done * 4 >= len(rows):
                keep = torch.nonzero(~done).squeeze(1)
                cache.reorder_cache(keep)
                rows, nxt, mask = rows[keep], nxt[keep], mask[keep]
                positions, done = positions[keep], done[keep]
            positions = positions[:, -1:] + 1
            ids = nxt[:, None]
    if timings is not None:
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + prefill_s
        timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t0 - prefill_s
        timings["steps"] = timings.get("steps", 0) + n_steps
        timings["row_steps"] = timings.get("row_steps", 0) + row_steps
    return out[:, :n_steps]


def constrained_tokens(
    model: Any,
    tok: Any,
    codec: Any,
    prompts: list[str],
    rows: list[Any],
    n_new: int,
    *,
    sampling: SeededSampling | None = None,
) -> tuple[list[list[str]], list[int]]:
    """Exactly ``n_new`` tokens per prompt under the grammar ``rows`` (one per prompt), greedy
    or with ``sampling``; returns the token strings and the prompt length of each prompt.

    One step of the LLM-as-policy (an action) and of the stepwise imaginer (an action, then a
    next state): a fixed number of tokens, every one legal, so no stopping rule is needed.
    ``tok`` must pad on the left.
    """
    enc = tok(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    processors: list[Any] = [GrammarMask(tok, codec, rows, n_positions=n_new)]
    if sampling is not None:  # after the mask: sampling only ever sees legal tokens
        processors.append(sampling)
    new = (
        decode(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=n_new,
            pad_id=tok.pad_token_id,
            processors=processors,
        )
        .cpu()
        .numpy()
    )
    n_in = enc["attention_mask"].sum(dim=1).cpu().tolist()
    return [tok.convert_ids_to_tokens(row.tolist()) for row in new], [int(x) for x in n_in]


def allowed_token_ids(tok: Any, tokens: tuple[str, ...]) -> list[int]:
    """Ids of ``tokens`` plus every vocabulary entry that decodes to whitespace only."""
    ids = [int(i) for i in tok.convert_tokens_to_ids(list(tokens))]
    for t, i in tok.get_vocab().items():
        if not tok.convert_tokens_to_string([t]).strip():
            ids.append(int(i))
    return ids


def cut_at_stop(ids: np.ndarray, stop_ids: list[int]) -> int:
    """Number of generated tokens up to and including the first stop id (all when none)."""
    hits = np.flatnonzero(np.isin(ids, stop_ids))
    return int(hits[0]) + 1 if len(hits) else len(ids)


class HFGenerator:
    """Ray Data ``map_batches`` callable: one model per actor, one :func:`decode` per batch.

    Input batch: a ``pyarrow.Table`` with at least ``prompt`` and ``seed``; output: the same
    table plus ``generated_text``, ``num_generated_tokens``, ``num_input_tokens`` (and, in
    ``stepwise`` mode, ``doubtful``: see :class:`~.stepwise.StepwiseImaginer`).
    """

    def __init__(
        self,
        spec: GenerationSpec,
        *,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
    ):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        model, tok, *rest = _resolve_loader(spec.loader)(
            spec.model_dir, device=device, dtype=_dtype(dtype, device)
        )
        # The grammar needs the codec (load_grounded returns it third); a plain HF folder
        # (tests, benchmarks) generates unconstrained.
        self.codec = rest[0] if rest and spec.grammar else None
        tok.padding_side = "left"  # so every row's last prompt token is the last column
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        end_id = tok.convert_tokens_to_ids(spec.end_token)
        if end_id is None or end_id == tok.unk_token_id:
            raise ValueError(f"end token {spec.end_token!r} is not in the tokenizer's vocabulary")
        self.stop_ids = sorted(
            {int(end_id)} | ({int(tok.eos_token_id)} if tok.eos_token_id is not None else set())
        )
        self.model, self.tok, self.device, self.spec = model.eval(), tok, device, spec
        self.allowed = (
            allowed_token_ids(tok, spec.codec_tokens) + self.stop_ids if spec.codec_tokens else None
        )
        self.timings: dict[str, float] = {}
        """Where :func:`decode` spent this actor's time (prefill, decode, rows computed)."""
        self.stepwise = None
        if spec.mode == "stepwise":
            from kalm_ray.envs import get_suite
            from kalm_ray.llm.imagine.backends.stepwise import StepwiseImaginer

            if not rest:
                raise ValueError("imagine.mode stepwise needs a grounded model folder (codec)")
            self.stepwise = StepwiseImaginer(
                model.eval(),
                tok,
                rest[0],
                suite=get_suite(spec.env),
                temperature=spec.temperature,
                top_p=spec.top_p,
                candidates=spec.candidates,
                part_steps=spec.max_steps if spec.compose else None,
                limits=spec.limits,
                state_retries=spec.state_retries,
                state_temperature=spec.state_temperature,
                action_retries=spec.action_retries,
                consistency_draws=spec.consistency_draws,
                consistency_min=spec.consistency_min,
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.stepwise is not None:
            texts, counts, n_in, doubtful = self.stepwise(batch, self.spec.steps_for)
            return (
                batch.append_column("generated_text", pa.array(texts, pa.string()))
                .append_column("num_generated_tokens", pa.array(np.asarray(counts, np.int64)))
                .append_column("num_input_tokens", pa.array(np.asarray(n_in, np.int64)))
                .append_column("doubtful", pa.array(doubtful, pa.bool_()))
            )
        prompts = batch.column("prompt").to_pylist()
        enc = self.tok(prompts, return_tensors="pt", padding=True).to(self.device)
        processors: list[Any] = []
        if self.codec is not None:  # first: sampling then only ever sees legal tokens
            processors.append(
                GrammarMask(
                    self.tok,
                    self.codec,
                    self.row_grammars(batch),
                    n_positions=self.spec.max_new_tokens,
                )
            )
        if self.spec.temperature > 0:
            processors.append(
                SeededSampling(
                    batch.column("seed").to_pylist(),
                    temperature=self.spec.temperature,
                    top_p=self.spec.top_p,
                )
            )
        new = (
            decode(
                self.model,
                enc["input_ids"],
                enc["attention_mask"],
                max_new_tokens=self.spec.max_new_tokens,
                pad_id=self.tok.pad_token_id,
                processors=processors,
                stop_ids=self.stop_ids,
                allowed=self.allowed,
                timings=self.timings,
            )
            .cpu()
            .numpy()
        )
        texts, counts = [], []
        for row in new:
            n = cut_at_stop(row, self.stop_ids)
            if self.allowed is not None:  # a row stopped early is padded after its last token
                foreign = np.flatnonzero(~np.isin(row[:n], self.allowed))
                n = int(foreign[0]) + 1 if len(foreign) else n
            counts.append(n)
            texts.append(self.tok.decode(row[:n].tolist(), skip_special_tokens=False))
        n_in = enc["attention_mask"].sum(dim=1).cpu().numpy().astype(np.int64)
        return (
            batch.append_column("generated_text", pa.array(texts, pa.string()))
            .append_column("num_generated_tokens", pa.array(np.asarray(counts, np.int64)))
            .append_column("num_input_tokens", pa.array(n_in))
        )

    def row_grammars(self, batch: pa.Table) -> list[Any]:
        """Each request's grammar: its start state's entities and its level's step limit."""
        from kalm_ray.llm.grammar import RowGrammar
        from kalm_ray.llm.imagine.requests import state_matrix

        starts = state_matrix(batch.column("start_state"), self.codec.state_dim)
        levels = (
            batch.column("level").to_pylist()
            if "level" in batch.column_names
            else [None] * batch.num_rows
        )
        return [
            RowGrammar.for_request(self.codec, s, self.spec.steps_for(lv))
            for s, lv in zip(starts, levels, strict=True)
        ]


def generate_hf(
    ds: ray.data.Dataset, *, spec: GenerationSpec, icfg: ImagineConfig
) -> ray.data.Dataset:
    """The requests dataset through an autoscaling pool of :class:`HFGenerator` actors."""
    import ray.data

    remote_args: dict[str, Any] = {"num_cpus": icfg.num_cpus_per_actor}
    if icfg.num_gpus_per_actor > 0:
        remote_args["num_gpus"] = icfg.num_gpus_per_actor
        if icfg.accelerator_type:
            remote_args["accelerator_type"] = icfg.accelerator_type
    device = icfg.device
    if device == "auto" and icfg.num_gpus_per_actor == 0:
        device = "cpu"  # an actor that reserved no GPU must not grab one it happens to see
    return ds.map_batches(
        HFGenerator,
        fn_constructor_args=(spec,),
        fn_constructor_kwargs={
            "device": device,
            "dtype": icfg.dtype,
            "num_threads": max(1, math.ceil(icfg.num_cpus_per_actor)),
        },
        batch_size=icfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=icfg.min_actors, max_size=icfg.max_actors),
        **remote_args,
    )
