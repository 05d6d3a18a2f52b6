"""Helpers shared by several test modules (no test module imports another).

Module-level imports stay light (stdlib, numpy): ``test_ground.py`` and ``test_smollm2.py``
run on a machine with torch + transformers + peft and no Ray, pyarrow or gymnasium; heavier
imports happen inside the helpers that need them.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# ---- a fake Ray job server (test_cluster_submit.py, test_safety.py) ------------------------------


TOKEN = "s3cret-token"


def job_node(head: bool, cpus: float) -> dict:
    return {
        "node_id": "x",
        "state": "ALIVE",
        "is_head_node": head,
        "resources_total": {"CPU": cpus},
    }


class FakeJobServer:
    """Answers /api/version and /api/v0/nodes like a Ray 2.60 job server with token auth."""

    def __init__(self, *, nodes: list[dict], token: str | None = TOKEN):
        self.nodes, self.token = nodes, token
        self.seen_auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                auth = self.headers.get("Authorization")
                outer.seen_auth.append(auth)
                if outer.token is not None and auth is None:
                    return self._send(401, "Unauthorized: Missing authentication token")
                if outer.token is not None and auth != f"Bearer {outer.token}":
                    return self._send(403, "Forbidden: Invalid authentication token")
                if self.path == "/api/version":
                    return self._send(200, json.dumps({"version": "4", "ray_version": "2.60.0"}))
                if self.path.startswith("/api/v0/nodes"):
                    body = {"result": True, "data": {"result": {"result": outer.nodes}}}
                    return self._send(200, json.dumps(body))
                return self._send(404, "not found")

            def _send(self, code: int, body: str) -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- tiny HF models (test_imagine.py, test_vllm_config.py, test_collect.py, ...) -----------------


END = "<eot>"
WORDS = [f"w{i}" for i in range(40)]


def save_tiny_model(folder: Path, *, seed: int = 0, hidden: int = 32, heads: int = 4) -> Path:
    """A randomly initialised 2-layer Llama and a word-level tokenizer, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", END, "go", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 or 1,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_sentence_model(folder: Path) -> str:
    """A random 32-d, 1-layer BERT saved in sentence-transformers layout (MiniLM's tokenizer)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from kalm_ray.config import TextConfig
    from kalm_ray.data.text import resolve_encoder

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(cfg).save_pretrained(folder)
    src = resolve_encoder(TextConfig())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return str(folder)


# ---- the ground stage's toy world (test_ground*.py, test_localcopy.py, test_smollm2.py) ----------


SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
DIRS = [(1, 0), (0, 1), (-1, 0), (0, -1), (0.8, 0.8), (-0.8, 0.8), (0.8, -0.8), (-0.8, -0.8)]


def toy_suite() -> SimpleNamespace:
    """CLEVR's shapes (10-d state, Discrete(40)) without importing gymnasium or MuJoCo."""
    low = np.tile(np.array([-0.6, -0.3], np.float32), 5)
    high = np.tile(np.array([0.6, 0.7], np.float32), 5)
    layout = SimpleNamespace(
        low=low, high=high, names=tuple(f"b{i // 2}.{'xy'[i % 2]}" for i in range(10)), entities={}
    )
    return SimpleNamespace(
        name="clevr",
        layout=layout,
        action_space=SimpleNamespace(n=40),
        max_episode_steps=50,
        success=lambda task, start, state: bool(state[0] < start[0]),
    )


def toy_episodes(n: int, *, seed: int = 0) -> list[dict]:
    """Episodes of a simple push world: action a moves ball a // 8 by 0.25 along DIRS[a % 8]."""
    rng = np.random.default_rng(seed)
    suite = toy_suite()
    out = []
    for i in range(n):
        t = int(rng.integers(2, 6))
        s = rng.uniform(suite.layout.low + 0.1, suite.layout.high - 0.1).astype(np.float32)
        states, actions = [s], []
        for _ in range(t):
            a = int(rng.integers(0, 40))
            nxt = states[-1].copy()
            nxt[2 * (a // 8) : 2 * (a // 8) + 2] += 0.25 * np.asarray(DIRS[a % 8], np.float32)
            states.append(np.clip(nxt, suite.layout.low, suite.layout.high))
            actions.append(a)
        out.append(
            {
                "episode_id": f"ep{i:04d}",
                "task": "left:red:blue",
                "instruction": "push the red ball left",
                "states": np.stack(states),
                "actions": np.asarray(actions, np.int64),
            }
        )
    return out


def loop_config(prepared: dict, **kw) -> dict:
    root = prepared["root"]
    cfg = {
        "base": str(root / "base"),
        "tokenizer_dir": str(root / "base"),
        "codec_path": str(root / "codec.json"),
        "examples": str(root / "examples"),
        "method": "full",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "max_steps": 4,
        "batch_size": 4,
        "lr": 1e-3,
        "checkpoint_every": 2,
        "seed": 0,
        "task_mix": {"rollout": 0.4, "explain": 0.2, "dynamics": 0.3, "consequence": 0.1},
        "cpu_threads": 1,
        "info": {"method": "full"},
    }
    cfg.update(kw)
    return cfg


# ---- Meta-World states (test_metaworld_env.py, test_labels.py) -----------------------------------


def slot_state(**parts: np.ndarray) -> np.ndarray:
    """A made-up 91-d Meta-World slot state; entities get the identity orientation."""
    from kalm_ray.envs.metaworld import slots

    s = np.zeros(91, np.float32)
    for name, value in parts.items():
        slots.position(s, name)[:] = value
        if name not in ("gripper", "goal"):
            slots.quaternion(s, name)[:] = (1.0, 0.0, 0.0, 0.0)
    return s


def coffee_state(mug_ok: bool, pressed: bool) -> np.ndarray:
    """A make-coffee scene: the mug under the spout or 20 cm off, the button pressed or not."""
    import importlib

    # The package exports a `tasks` function, which shadows the submodule as an attribute.
    mwt = importlib.import_module("kalm_ray.envs.metaworld.tasks")
    machine = np.array([0.0, 0.95, 0.0])
    goal = machine + mwt.COFFEE_BUTTON_GOAL_OFFSET
    mug = machine + mwt.SPOUT_OFFSET + ([0, 0, 0] if mug_ok else [0, -0.2, 0])
    button = goal + ([0, 0.005, 0] if pressed else [0, -0.03, 0])
    return slot_state(
        goal=goal, object=mug, coffee_machine=machine, coffee_button=button, gripper=[0, 0.6, 0.2]
    )
