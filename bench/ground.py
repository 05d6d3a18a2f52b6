"""Grounding training throughput of the embedded ``tiny`` model, with the config's settings.

    .venv/bin/python bench/ground.py [--config configs/quick.yaml] [--steps 20] [--threads 2]
    python bench/ground.py --synthetic [--vocab 2442] [--batch-size 16]   # torch+transformers only

Builds the ``tiny`` model exactly as ``kalm ground`` does for the config's env (n_bins,
encoder init), makes examples of the four tasks from synthetic episodes inside the suite's
bounds (push-like steps, 2-8 per episode), and times optimizer steps of ``batch_size`` with
the config's task mix. Prints training tokens/s (prompt + target tokens, no padding) of:

- ours: the loss on target tokens only (the output layer runs at target positions only);
- baseline, same run, same batches: the usual ``model(input_ids, labels=...)`` loss, which
  computes logits at every position.

and the ratio. Timings are medians over steps after two warm-up steps.

``--micro K`` also times ours with each batch cut into K micro-batches of similar lengths
(sorted by length, each padded only to its own longest example; one backward over the
exactly recombined loss, so the same examples and gradient up to rounding), against ours on
the whole padded batch, and prints the batches' share of real tokens.

``--synthetic`` needs no suite, encoder package or config: the tiny shape with a given vocab
size and random token ids, with CLEVR's (prompt, target) lengths per task (rollout 27+57,
explain 72+11, dynamics 19+11, consequence 27+11 for 5-step episodes), for machines that
have only torch and transformers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def synthetic_episodes(suite, n: int, *, seed: int = 0):
    from kalm_ray.llm.prompts import EpisodeArrays

    rng = np.random.default_rng(seed)
    low, high = suite.layout.low, suite.layout.high
    discrete = hasattr(suite.action_space, "n")
    eps = []
    for i in range(n):
        t = int(rng.integers(2, 9))
        s = rng.uniform(low, high).astype(np.float32)
        states = [s]
        for _ in range(t):
            states.append(
                np.clip(states[-1] + rng.normal(0, 0.05, s.shape).astype(np.float32), low, high)
            )
        actions = (
            rng.integers(0, suite.action_space.n, t)
            if discrete
            else rng.uniform(-1, 1, (t, 4)).astype(np.float32)
        )
        tasks = suite.tasks("train")
        task = tasks[i % len(tasks)]
        eps.append(
            EpisodeArrays(
                episode_id=f"e{i}",
                task=task,
                instruction=suite.instructions("train", task)[0],
                states=np.stack(states),
                actions=actions,
            )
        )
    return eps


SYNTHETIC_LENGTHS = {
    "rollout": (27, 57),
    "explain": (72, 11),
    "dynamics": (19, 11),
    "consequence": (27, 11),
}
SYNTHETIC_MIX = {"rollout": 0.4, "explain": 0.2, "dynamics": 0.3, "consequence": 0.1}


def synthetic_setup(vocab: int, batch_size: int, steps: int):
    """Random tiny model and batches shaped like CLEVR grounding examples."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kalm_ray.llm.ground.train_fn import batch_collator
    from kalm_ray.llm.model import TINY

    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY))
    ids = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="1"))
    collate = batch_collator(
        PreTrainedTokenizerFast(tokenizer_object=ids, pad_token="0", unk_token="1")
    )
    rng = np.random.default_rng(0)
    tasks = list(SYNTHETIC_MIX)
    w = np.asarray([SYNTHETIC_MIX[t] for t in tasks])
    batches = []
    for _ in range(steps + 2):
        p, t = SYNTHETIC_LENGTHS[tasks[rng.choice(len(tasks), p=w / w.sum())]]
        rows = []
        for _ in range(batch_size):
            tl = max(2, int(t * rng.uniform(0.5, 1.5))) if t > 20 else t
            rows.append((rng.integers(5, vocab, p + tl), p))
        batches.append(collate(rows))
    return model, batches


def main() -> None:
    import torch

    from kalm_ray.llm.ground.train_fn import batch_collator
    from kalm_ray.llm.model import count_params

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quick.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--vocab", type=int, default=2442)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro", type=int, default=1, help="also time K length micro-batches")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        model, batches = synthetic_setup(args.vocab, args.batch_size, args.steps)
        print(
            f"synthetic tiny: {count_params(model) / 1e6:.1f}M params, vocab {args.vocab}, "
            f"batch {args.batch_size}, {args.threads} threads"
        )
        return _compare(model, batches, micro=args.micro)
    from kalm_ray.config import load_config
    from kalm_ray.envs import LEVELS, get_suite
    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.model import build_tiny
    from kalm_ray.llm.prompts import episode_examples

    cfg = load_config(args.config)
    g = cfg.ground
    suite = get_suite(cfg.env.name)
    codec = Codec.for_suite(suite, g.n_bins, state_coding=g.state_coding)
    texts = [w for lv in LEVELS for t in suite.tasks(lv) for w in suite.instructions(lv, t)]
    model, tok = build_tiny(
        codec, texts, init_from_encoder=g.tiny_init_from_encoder, overrides=dict(g.model.tiny)
    )  # the config's shape (quick's is 0.7M parameters, not the default 4M)
    rows = [
        r
        for e in synthetic_episodes(suite, 200)
        for r in episode_examples(codec, tok, e, max_seq_len=g.max_seq_len)[0]
    ]
    by_task: dict[str, list] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append((np.asarray(r["input_ids"]), r["prompt_len"]))
    tasks = [t for t in g.task_mix if t in by_task]
    w = np.asarray([g.task_mix[t] for t in tasks])
    rng = np.random.default_rng(0)
    collate = batch_collator(tok)
    batches = []
    for _ in range(args.steps + 2):
        pool = by_task[tasks[rng.choice(len(tasks), p=w / w.sum())]]
        batches.append(collate([pool[i] for i in rng.integers(0, len(pool), g.batch_size)]))
    print(
        f"tiny: {count_params(model) / 1e6:.1f}M params, vocab {len(tok)}, "
        f"{ {k: getattr(model.config, k) for k in SHAPE} }; "
        f"env {cfg.env.name}, n_bins {g.n_bins}, batch {g.batch_size}, method {g.method}, "
        f"{args.threads} threads; mean example "
        f"{np.mean([len(r['input_ids']) for r in rows]):.0f} tokens"
    )

    _compare(model, batches, micro=args.micro)


def micro_batches(b: dict, k: int) -> list[tuple[dict, float]]:
    """``b`` cut into ``k`` length-sorted micro-batches, each trimmed to its longest example,
    with each one's share of ``b``'s target tokens (the weight of its mean loss)."""
    import torch

    from kalm_ray.llm.prompts import IGNORE

    lengths = b["attention_mask"].sum(1)
    order = torch.argsort(lengths)
    n_targets = int((b["labels"][:, 1:] != IGNORE).sum())
    out = []
    for idx in torch.tensor_split(order, k):
        width = int(lengths[idx].max())
        sub = {key: v[idx, :width] for key, v in b.items()}
        out.append((sub, int((sub["labels"][:, 1:] != IGNORE).sum()) / n_targets))
    return out


def _compare(model, batches, *, micro: int = 1) -> None:
    import torch

    from kalm_ray.llm.ground.train_fn import _target_loss_module

    ours = _target_loss_module(model)

    def run(name: str, loss_fn) -> float:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rates = []
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            loss = loss_fn(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                rates.append(int(b["attention_mask"].sum()) / (time.perf_counter() - t0))
        med = statistics.median(rates)
        print(f"{name:<44} {med:8.0f} tokens/s")
        return med

    base = run("baseline: HF loss, logits at every position", lambda t: model(**t).loss)
    mine = run(
        "ours: loss on target positions only",
        lambda t: ours(t["input_ids"], t["attention_mask"], t["labels"]),
    )
    print(f"ratio ours / baseline: {mine / base:.2f}x")
    if micro > 1:
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        print(f"real tokens in the padded batches: {real / padded:.0%}")

        def split(t):
            parts = micro_batches(t, micro)
            return sum(
                share * ours(p["input_ids"], p["attention_mask"], p["labels"]) for p, share in parts
            )

        cut = run(f"ours, {micro} length micro-batches per batch", split)
        print(f"ratio micro-batches / whole batch: {cut / mine:.2f}x")


if __name__ == "__main__":
    main()
