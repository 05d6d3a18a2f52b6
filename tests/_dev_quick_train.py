"""Quick-preset grounding (tiny, full FT, 600 steps x 16) through train_loop without Ray."""
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
sys.path.insert(0, os.getcwd())
from kalm_ray.llm.train_fn import train_loop
d = os.path.join(os.getcwd(), "runs/devcarry")
out = os.environ.get("OUT", "/tmp") + "/quick_model"
t0 = time.time()
m = train_loop({"base": f"{d}/base", "tokenizer_dir": f"{d}/base", "codec_path": f"{d}/codec.json",
    "examples": f"{d}/examples", "method": "full", "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
    "target_modules": ["q_proj"]}, "max_steps": int(sys.argv[1]) if len(sys.argv) > 1 else 600,
    "batch_size": 16, "lr": 1e-3, "checkpoint_every": 10000, "seed": 0, "cpu_threads": 2,
    "task_mix": {"rollout": 0.4, "explain": 0.2, "dynamics": 0.3, "consequence": 0.1},
    "checkpoint_dir": "/tmp/qckpt", "output_dir": out, "info": {"method": "full"}})
print("QUICK_TRAIN", json.dumps({**m, "wall_s": time.time() - t0}))
