import json, logging, os, sys, time
import numpy as np, torch
sys.path.insert(0, os.getcwd())
from kalm_ray.llm.train_fn import train_loop
from kalm_ray.llm.model import load_grounded
from kalm_ray.llm.metrics import dynamics_metrics, explain_metrics
from kalm_ray.llm.prompts import EpisodeArrays
name, base, lr, mix = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 600
mixes = {"default": {"rollout": 0.4, "explain": 0.2, "dynamics": 0.3, "consequence": 0.1},
         "dyn": {"rollout": 0.3, "explain": 0.1, "dynamics": 0.5, "consequence": 0.1},
         "dyn6": {"rollout": 0.25, "explain": 0.05, "dynamics": 0.6, "consequence": 0.1}}
d = f"runs/sweep/{base}"
out = os.environ.get("OUT", "/tmp") + f"/{name}"
t0 = time.time()
m = train_loop({"base": d, "tokenizer_dir": d, "codec_path": f"{d}/codec.json", "examples": f"{d}/ex",
    "method": "full", "lora": {}, "max_steps": steps, "batch_size": 16, "lr": lr, "checkpoint_every": 100000,
    "seed": 0, "cpu_threads": 2, "task_mix": mixes[mix], "checkpoint_dir": f"/tmp/ck_{name}",
    "output_dir": f"/tmp/m_{name}", "info": {"method": "full"}})
train_s = time.time() - t0
torch.set_num_threads(2)
model, tok, codec = load_grounded(f"/tmp/m_{name}")
held = [EpisodeArrays(e["episode_id"], e["task"], e["instruction"], np.asarray(e["states"], np.float32),
        np.asarray(e["actions"])) for e in json.load(open("runs/sweep/heldout.json"))]
trans = [(e.states[t], e.actions[t], e.states[t + 1]) for e in held for t in range(len(e.actions))][:128]
with torch.no_grad():
    r = dynamics_metrics(model, tok, codec, trans, batch_size=64, device="cpu")
    r.update(explain_metrics(model, tok, codec, held, batch_size=64, device="cpu"))
r.update({"name": name, "loss": m["loss"], "tok_s": m["tokens_per_s"], "train_s": train_s, "eval_s": time.time() - t0 - train_s})
print("RESULT", json.dumps(r), flush=True)
