"""Text encoders and the instructions table (CPU, no network)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kalm_ray.artifacts import RunDir
from kalm_ray.config import TextConfig
from kalm_ray.data.text import (
    DEFAULT_ENCODER_NAME,
    TextEncoder,
    build_instruction_table,
    encoder_info,
    halves_pool,
    l2_normalize,
    load_instruction_table,
    make_encoder,
    pool_tokens,
    read_instruction_table,
    resolve_encoder,
    write_instruction_table,
)
from kalm_ray.errors import ConfigError, InputError

# ---- pure math ------------------------------------------------------------------------------


def test_pool_tokens_ignores_padding():
    x = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], dtype=np.float32)  # (1, 3, 2)
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(pool_tokens(x, mask, "mean"), [[2.0, 3.0]])
    np.testing.assert_allclose(pool_tokens(x, mask, "max"), [[3.0, 4.0]])
    np.testing.assert_allclose(pool_tokens(x, mask, "cls"), [[1.0, 2.0]])
    np.testing.assert_allclose(
        pool_tokens(x, mask, "mean_sqrt_len"), [[4.0 / np.sqrt(2), 6.0 / np.sqrt(2)]]
    )
    assert pool_tokens(x, mask).dtype == np.float32
    with pytest.raises(ValueError, match="pooling mode"):
        pool_tokens(x, mask, "median")


def test_l2_normalize_unit_rows_and_zero_rows():
    y = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    assert y.dtype == np.float32


def test_halves_pool_keeps_word_order():
    red, blue, pad = [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]
    x = np.array([[red, blue, pad], [blue, red, pad], [red, pad, pad]], dtype=np.float32)
    words = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]])
    out = halves_pool(x, words)
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(out[0], [r, 0, 0, r], atol=1e-6)  # red first, then blue
    np.testing.assert_allclose(out[1], [0, r, r, 0], atol=1e-6)  # the other order differs
    np.testing.assert_allclose(out[2], [r, 0, r, 0], atol=1e-6)  # one word fills both halves
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert out.dtype == np.float32 and halves_pool(x, np.zeros((3, 3))).sum() == 0


def test_word_halves_features_tell_swapped_roles_apart(encoder):
    """The sentence embedding puts "A left of B" nearer "B left of A" than a rewording of the
    same goal; word halves put it the right way round."""
    halves = make_encoder(TextConfig(features="word_halves"))
    assert halves.dim == 2 * encoder.dim and halves.name.endswith("+word_halves")
    texts = [
        "Push the red ball to the left of the blue ball.",
        "Push the blue ball to the left of the red ball.",
        "Move the red ball to the left of the blue ball.",
    ]
    for enc, swap_nearer in ((encoder, True), (halves, False)):
        a, swapped, reworded = enc.encode(texts)
        assert (
            a @ swapped / np.linalg.norm(swapped) > a @ reworded / np.linalg.norm(reworded)
        ) == (swap_nearer)
    with pytest.raises(ConfigError, match="text.features"):
        from kalm_ray.data.text import SentenceEncoder, default_model_path

        SentenceEncoder(default_model_path(), features="words")


# ---- the default encoder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return make_encoder(TextConfig())


def test_default_encoder_shape_norm_and_meaning(encoder):
    assert isinstance(encoder, TextEncoder)
    assert encoder.name == DEFAULT_ENCODER_NAME and encoder.dim == 384
    texts = [
        "push the red ball to the left of the blue ball",
        "move the red ball so it is left of the blue one",
        "open the window",
    ]
    v = encoder.encode(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]  # a paraphrase is closer than another task
    assert encoder.encode([]).shape == (0, 384)
    # Batching does not change results (padding is masked out).
    np.testing.assert_allclose(encoder.encode(texts[:1]), v[:1], atol=1e-5)


def test_encoder_cached_per_process(encoder):
    assert make_encoder(TextConfig()) is encoder


def test_encoder_by_local_path_matches_default(encoder):
    path = resolve_encoder(TextConfig())
    by_path = make_encoder(TextConfig(encoder=str(path), batch_size=2))
    assert by_path.name == str(path) and by_path.dim == 384
    texts = ["open the door", "press the button", "reach the goal"]
    np.testing.assert_allclose(by_path.encode(texts), encoder.encode(texts), atol=1e-5)


def test_matches_reference_values(encoder):
    """all-MiniLM-L6-v2 first dims for a fixed sentence, as sentence-transformers 6.2 gives them."""
    v = encoder.encode(["push the red ball to the left of the blue ball"])[0]
    np.testing.assert_allclose(v[:4], [0.0688984, 0.0248046, -0.0451079, -0.0094052], atol=1e-5)


def test_bad_encoder_is_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="text.encoder") as e:
        resolve_encoder(TextConfig(encoder=str(tmp_path / "nope")))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="config.json"):
        resolve_encoder(TextConfig(encoder=str(tmp_path)))


# ---- the instructions table -----------------------------------------------------------------


class _FakeSuite:
    name = "fake"
    _words = {
        ("train", "a"): ["do a", "please do a"],
        ("train", "b"): ["do b"],
        ("rephrase", "a"): ["perform a"],
        ("rephrase", "b"): ["perform b"],
        ("easy", "c"): ["do c"],
        ("hard", "d"): ["do d then a"],
    }

    def tasks(self, level: str) -> list[str]:
        return [t for (lv, t) in self._words if lv == level]

    def instructions(self, level: str, task: str) -> list[str]:
        return list(self._words[(level, task)])


class _HashEncoder:
    """Deterministic toy encoder: vectors from the text's bytes."""

    name = "hash-test"
    dim = 8

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i] = np.frombuffer(t.ljust(self.dim)[: self.dim].encode(), dtype=np.uint8) / 255.0
        return out


def test_instruction_table_roundtrip(tmp_path):
    suite, enc = _FakeSuite(), _HashEncoder()
    table = build_instruction_table(suite, enc)
    assert table.num_rows == 7
    assert table.column("level").to_pylist() == [
        "train",
        "train",
        "train",
        "rephrase",
        "rephrase",
        "easy",
        "hard",
    ]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert encoder_info(table) == ("hash-test", 8)

    run = RunDir(str(tmp_path / "run"))
    write_instruction_table(run, table)
    assert encoder_info(read_instruction_table(run)) == ("hash-test", 8)
    emb = load_instruction_table(run)
    assert set(emb) == {t for ws in suite._words.values() for t in ws}
    np.testing.assert_array_equal(emb["do b"], enc.encode(["do b"])[0])
    assert emb["do b"].dtype == np.float32 and emb["do b"].shape == (8,)
    assert load_instruction_table(str(tmp_path / "run")).keys() == emb.keys()


def test_missing_instruction_table_is_input_error(tmp_path):
    with pytest.raises(InputError, match="kalm collect"):
        load_instruction_table(RunDir(str(tmp_path)))
