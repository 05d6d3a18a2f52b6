"""The ``hf`` backend: Hugging Face ``generate`` in an autoscaling Ray Data actor pool.

:class:`HFGenerator` is the callable class ``map_batches`` runs: each actor loads the model
once, then generates a whole batch per call with the KV cache and left padding, stopping a
request at the codec's end token (or the tokenizer's EOS) or at ``max_new_tokens``. When
the spec lists the codec's tokens, a request also stops at its first token outside them
(:class:`StopOnForeignToken`): its text is unparseable from there on anyway, and a batch no
longer runs to the token budget for the sake of rows that are already lost.

With ``spec.grammar`` (the default) every position is constrained to the tokens the codec's
grammar allows there (:class:`GrammarMask`, :mod:`kalm_ray.llm.grammar`): an action or the end
at a step boundary, a bin inside a step, the end token once the request's level allows no
more steps. Every rollout is then well-formed; the filter still judges its physics.

Sampling (temperature > 0) is done with the Gumbel-max trick in a logits processor, with one
random stream per request seeded by the request's seed: a request's output then depends on
its seed only, not on which batch or actor it landed in (plain ``do_sample`` draws from one
stream shared by the batch).
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
    several ``generate`` calls: the stepwise imaginer draws each request's actions from one
    stream over all its steps).
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

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        vocab = scores.shape[-1]
        noise = torch.stack([torch.rand(vocab, generator=g) for g in self.gens]).to(scores.device)
        return gumbel_scores(scores.float(), noise, temperature=self.temperature, top_p=self.top_p)


class GrammarMask:
    """Logits processor: only the tokens the codec's grammar allows at each row's position.

    Rows are left padded, so generated position ``p`` is the same for every row:
    ``input_ids.shape[1] - prompt_len``. Each row has its own step template (entities of its
    start state) and step limit (its level); see :mod:`kalm_ray.llm.grammar`.
    """

    _tables: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
    """(tokenizer, codec) -> the (kinds, vocab) mask table: built once per process."""

    def __init__(self, tok: Any, codec: Any, rows: list[Any], *, prompt_len: int):
        self.table = self.table_for(tok, codec)
        self.rows, self.prompt_len = rows, prompt_len

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

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        pos = input_ids.shape[1] - self.prompt_len
        kinds = torch.tensor([r.kind_at(pos) for r in self.rows], dtype=torch.long)
        allowed = self.table[kinds].to(scores.device)
        if allowed.shape[1] < scores.shape[1]:  # model rows beyond the tokenizer (padding)
            pad = torch.zeros(
                allowed.shape[0], scores.shape[1] - allowed.shape[1], dtype=torch.bool
            )
            allowed = torch.cat([allowed, pad.to(scores.device)], dim=1)
        return scores.masked_fill(~allowed[:, : scores.shape[1]], float("-inf"))


class StopOnForeignToken:
    """Stopping criterion: a request is done once it generates a token outside ``allowed``.

    Called by ``generate`` after each step with the sequences so far; returns ``(B,)`` bool.
    """

    def __init__(self, allowed_ids: list[int], *, prompt_len: int):
        import torch

        self.allowed = torch.tensor(sorted(set(allowed_ids)), dtype=torch.long)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        import torch

        if input_ids.shape[1] <= self.prompt_len:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        allowed = self.allowed.to(input_ids.device)
        return ~torch.isin(input_ids[:, -1], allowed)


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
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    enc = tok(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    processors = LogitsProcessorList(
        [GrammarMask(tok, codec, rows, prompt_len=enc["input_ids"].shape[1])]
    )
    if sampling is not None:  # after the mask: sampling only ever sees legal tokens
        processors.append(sampling)
    cfg = GenerationConfig(
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            generation_config=cfg,
            logits_processor=processors,
        )
    new = out[:, enc["input_ids"].shape[1] :].cpu().numpy()
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
    """Ray Data ``map_batches`` callable: one model per actor, one ``generate`` per batch.

    Input batch: a ``pyarrow.Table`` with at least ``prompt`` and ``seed``; output: the same
    table plus ``generated_text``, ``num_generated_tokens``, ``num_input_tokens``.
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
        self.stepwise = None
        if spec.mode == "stepwise":
            from kalm_ray.envs import get_suite
            from kalm_ray.llm.imagine.backends.stepwise import StepwiseImaginer

            if not rest:
                raise ValueError("imagine.mode stepwise needs a grounded model folder (codec)")
            self.stepwise = StepwiseImaginer(
                model.eval(), tok, rest[0], suite=get_suite(spec.env),
                temperature=spec.temperature, top_p=spec.top_p,
                candidates=spec.candidates, limits=spec.limits,
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        if self.stepwise is not None:
            texts, counts, n_in = self.stepwise(batch, self.spec.steps_for)
            return (
                batch.append_column("generated_text", pa.array(texts, pa.string()))
                .append_column("num_generated_tokens", pa.array(np.asarray(counts, np.int64)))
                .append_column("num_input_tokens", pa.array(np.asarray(n_in, np.int64)))
            )
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        prompts = batch.column("prompt").to_pylist()
        enc = self.tok(prompts, return_tensors="pt", padding=True).to(self.device)
        gen_cfg = GenerationConfig(
            max_new_tokens=self.spec.max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tok.pad_token_id,
        )
        processors = LogitsProcessorList()
        if self.codec is not None:  # first: sampling then only ever sees legal tokens
            processors.append(
                GrammarMask(
                    self.tok,
                    self.codec,
                    self.row_grammars(batch),
                    prompt_len=enc["input_ids"].shape[1],
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
        stops = StoppingCriteriaList()
        if self.allowed is not None:
            stops.append(StopOnForeignToken(self.allowed, prompt_len=enc["input_ids"].shape[1]))
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                generation_config=gen_cfg,
                logits_processor=processors,
                stopping_criteria=stops,
            )
        new = out[:, enc["input_ids"].shape[1] :].cpu().numpy()
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
