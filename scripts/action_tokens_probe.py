"""Diagnostic: is the push direction learnt sooner when a CLEVR push is two tokens?

The grounded tiny model learns which ball to push long before which way
(``policy_action_nll_direction`` stays near its uniform 2.08 for thousands of steps). A
push is one of 40 action tokens, so the model must settle ball and direction at one position.
This trains ``configs/cpu.yaml``'s tiny model (4 heads) on the policy and dynamics examples
of a run's collected episodes (16 relabelled copies of each training episode, held-out
episodes as the ground stage splits them) under one of three action texts:

- ``joint``: one token per push (the codec's);
- ``factored``: a ball token, then a direction token (5 + 8 tokens);
- ``named``: ``factored``, and every prompt state writes each ball's ball token before its two
  coordinates, so the direction position can find its ball's numbers by content.

Every ``--every`` steps it prints the held-out demonstrator's NLL of the ball and of the
direction given the ball, the softmax over the legal tokens only (as the grounding metrics
do)::

    kalm collect configs/quick.yaml --seed 0 --run-dir runs/probe
    python scripts/action_tokens_probe.py runs/probe factored --steps 4000

A diagnostic only: nothing in the pipeline reads it.
"""

from __future__ import annotations

import argparse
import glob
import json
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from kalm_ray.envs import LEVELS, get_suite
from kalm_ray.llm.codec import Codec
from kalm_ray.llm.ground.metrics import factor_nll
from kalm_ray.llm.ground.train_fn import batch_collator, lr_schedule
from kalm_ray.llm.model import build_tiny
from kalm_ray.llm.prompts import (
    episodes_from_table,
    is_heldout,
    relabelled_copies,
    tokenize_example,
)

MODES = ("joint", "factored", "named")
N_BALLS, N_DIRS = 5, 8  # CLEVR's action_factors: action = ball * 8 + direction


class ActionText:
    """Prompts and targets of one mode, on the codec's tokens (balls and directions reuse the
    first 13 of its 40 action tokens: their rows start random either way)."""

    def __init__(self, codec: Codec, mode: str):
        self.codec, self.mode = codec, mode
        self.balls = codec.action_tokens[:N_BALLS]
        self.dirs = codec.action_tokens[N_BALLS : N_BALLS + N_DIRS]

    def action(self, a: int) -> str:
        if self.mode == "joint":
            return self.codec.action_tokens[a]
        return self.balls[a // N_DIRS] + self.dirs[a % N_DIRS]

    def state(self, s: np.ndarray) -> str:
        toks = self.codec.encode_state(s)
        if self.mode == "named":  # layout: red.x red.y blue.x blue.y ...
            toks = [t for k in range(N_BALLS) for t in (self.balls[k], *toks[2 * k : 2 * k + 2])]
        return self.codec.join(toks)

    def policy_prompt(self, instruction: str, s: np.ndarray) -> str:
        return f"instruction: {instruction.strip()}\nstart: {self.state(s)}\nplan:"

    def dynamics_prompt(self, s: np.ndarray, a: int) -> str:
        return f"state: {self.state(s)}\naction: {self.action(a)}\nnext state:"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="a run dir whose collect stage is done")
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy-share", type=float, default=0.6, help="rest: dynamics batches")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, 64, state_coding="delta")
    texts = [w for lv in LEVELS for t in suite.tasks(lv) for w in suite.instructions(lv, t)]
    tiny = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2)
    model, tok = build_tiny(
        codec,
        texts,
        seed=args.seed,
        overrides={**tiny, "num_attention_heads": 4, "num_key_value_heads": 4},
    )
    fmt = ActionText(codec, args.mode)

    def ids(prompt: str, target: str, eos: bool = True) -> tuple[np.ndarray, int]:
        row, plen = tokenize_example(tok, prompt, target)
        return np.asarray(row if eos else row[:-1], np.int64), plen

    files = glob.glob(f"{args.run_dir}/data/real/**/*.parquet", recursive=True)
    train, held = [], []
    for ep in episodes_from_table(pq.read_table(files)):
        if is_heldout(ep.episode_id, 0.1, args.seed):
            held.append(ep)
        else:
            train += [ep, *relabelled_copies(ep, 16, args.seed)]
    policy, dynamics = [], []
    for ep in train:
        for t, a in enumerate(int(x) for x in ep.actions):
            s, nxt = ep.states[t], ep.states[t + 1]
            policy.append(ids(fmt.policy_prompt(ep.instruction, s), fmt.action(a)))
            step = codec.join(codec.encode_next_state(s, nxt))
            dynamics.append(ids(fmt.dynamics_prompt(s, a), step))
    scored = [
        (fmt.policy_prompt(ep.instruction, ep.states[t]), int(a))
        for ep in held
        for t, a in enumerate(ep.actions)
    ]
    print(
        f"{len(train)} training episodes, {len(policy)} policy examples, "
        f"{len(scored)} held-out states",
        flush=True,
    )
    as_ids = tok.convert_tokens_to_ids
    act_ids = torch.tensor(as_ids(codec.action_tokens))
    ball_ids, dir_ids = torch.tensor(as_ids(fmt.balls)), torch.tensor(as_ids(fmt.dirs))

    collate = batch_collator(tok)  # the ground stage's: right-padded, loss on targets only

    @torch.no_grad()
    def held_out_nll() -> tuple[float, float]:
        """Mean NLL of the demonstrator's ball, and of its direction given that ball."""
        model.eval()
        nb, nd = [], []
        for i in range(0, len(scored), 64):
            chunk = scored[i : i + 64]
            joint = args.mode == "joint"
            rows = [ids(p, "" if joint else fmt.balls[a // N_DIRS], eos=False) for p, a in chunk]
            batch = collate(rows)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            for j, (_, plen) in enumerate(rows):
                a = chunk[j][1]
                b, d = divmod(a, N_DIRS)
                if joint:  # the grounding metrics' chain-rule split of the 40-way softmax
                    lp = torch.log_softmax(logits[j, plen - 1, act_ids], -1).numpy()
                    part = factor_nll(lp[None], np.asarray([a]), [N_BALLS, N_DIRS])[0]
                    nb.append(float(part[0]))
                    nd.append(float(part[1]))
                else:
                    nb.append(-float(torch.log_softmax(logits[j, plen - 1, ball_ids], -1)[b]))
                    nd.append(-float(torch.log_softmax(logits[j, plen, dir_ids], -1)[d]))
        model.train()
        return float(np.mean(nb)), float(np.mean(nd))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = lr_schedule(opt, peak=1e-3, total=args.steps)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        pool = policy if rng.random() < args.policy_share else dynamics
        model(**collate([pool[i] for i in rng.integers(0, len(pool), 64)])).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
        if step % args.every == 0 or step == args.steps:
            ball, direction = held_out_nll()
            print(
                json.dumps(
                    {
                        "mode": args.mode,
                        "step": step,
                        "ball_nll": round(ball, 3),
                        "direction_nll": round(direction, 3),
                        "s": round(time.time() - t0),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
