"""The ground stage: the train loop with and without Ray, resume, the saved model, the stage.

Module-level imports stay light (pytest, numpy): the ``gpu`` test runs on a machine with
torch + transformers + peft and no Ray, pyarrow or gymnasium.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import loop_config, toy_episodes, toy_suite

from kalm_ray.errors import InputError


def test_train_loop_without_ray_resumes_and_reloads(prepared, tmp_path):
    from kalm_ray.llm.ground.train_fn import train_loop
    from kalm_ray.llm.model import load_grounded, model_files
    from kalm_ray.llm.prompts import rollout_prompt

    cfg = loop_config(
        prepared, checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out")
    )
    first = train_loop(cfg)
    assert (
        first["step"] == 4
        and first["resumed_from"] == 0
        and (tmp_path / "ckpt" / "step_00000004").is_dir()
    )
    # The loss of the log window by task (4 steps log every step: one batch, one task).
    (by_task,) = [k for k in first if k.startswith("loss_")]
    assert by_task.removeprefix("loss_") in cfg["task_mix"] and first[by_task] == first["loss"]
    # Each task's share of the training time so far: what a task mix costs.
    shares = {k.removeprefix("time_share_"): v for k, v in first.items() if "time_share_" in k}
    assert set(shares) <= set(cfg["task_mix"]) and sum(shares.values()) == pytest.approx(1.0)
    again = train_loop({**cfg, "max_steps": 6})  # a longer run picks up where the first stopped
    assert again["resumed_from"] == 4 and again["step"] == 6
    # Where it trained, beside the model: a later regrounding that differs is checked here.
    import torch

    where = json.loads((tmp_path / "out" / "grounded.json").read_text())["trained_on"]
    assert where["device"] == "cpu" and where["cpu"] and where["torch_threads"] >= 1
    assert where["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert where["kernel"] and (where["cpu_id"] or not Path("/proc/cpuinfo").exists())
    model, tok, codec = load_grounded(tmp_path / "out")
    assert model_files(tmp_path / "out")["model"] == str(tmp_path / "out")
    enc = tok(
        [rollout_prompt(codec, "push the red ball left", toy_episodes(1)[0]["states"][0])],
        return_tensors="pt",
    )
    gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_heldout_scores_during_training_leave_the_run_unchanged_and_survive_a_resume(
    prepared, tmp_path
):
    """``score_every``: the held-out demonstrator's actions scored every N steps on rank 0,
    kept in the checkpoint (a resumed run's curve starts with the scores taken before), and
    written as the final metrics' ``curve``; the training run's numbers stay what they are
    without it (scoring samples nothing and changes no weight)."""
    import torch

    from kalm_ray.llm.ground.fit import curve_line
    from kalm_ray.llm.ground.train_fn import STATE_FILE, train_loop

    _write_real_data(tmp_path / "real", toy_episodes(4, seed=1))
    metrics = {
        "env": "clevr",
        "heldout_real": str(tmp_path / "real" / "data" / "real" / "episodes-0000.parquet"),
        # The same episodes as a "seen" sample: its action metrics must equal the held-out ones.
        "seen_real": str(tmp_path / "real" / "data" / "real" / "episodes-0000.parquet"),
        "max_examples": 2,
        "max_rollouts": 1,
        "max_policy_episodes": 1,
    }

    def run(name: str, steps: int, every: int) -> dict:
        cfg = loop_config(
            prepared,
            max_steps=steps,
            score_every=every,
            metrics=metrics,
            checkpoint_dir=str(tmp_path / name / "ckpt"),
            output_dir=str(tmp_path / name / "out"),
        )
        return train_loop(cfg)

    plain, scored = run("plain", 4, 0), run("scored", 4, 2)
    assert scored["loss"] == plain["loss"]
    weights = [
        torch.load(tmp_path / n / "ckpt" / "step_00000004" / STATE_FILE, weights_only=True)
        for n in ("plain", "scored")
    ]
    for k, v in weights[0]["params"].items():
        assert torch.equal(v, weights[1]["params"][k]), k
    assert weights[0]["curve"] == [] and [c["step"] for c in weights[1]["curve"]] == [2, 4]
    done = json.loads((tmp_path / "scored" / "out" / "grounding_metrics.json").read_text())
    assert "curve" not in json.loads(
        (tmp_path / "plain" / "out" / "grounding_metrics.json").read_text()
    )
    # The last score is the final metrics' own number; CLEVR's split by ball, then direction.
    last = done["curve"][-1]
    assert last["policy_action_nll"] == pytest.approx(done["policy_action_nll"], abs=1e-5)
    assert last["policy_action_nll_ball"] + last["policy_action_nll_direction"] == pytest.approx(
        last["policy_action_nll"], abs=1e-4
    )
    for key in ("n", "nll", "match", "nll_ball", "nll_direction"):
        assert done[f"seen_policy_action_{key}"] == done[f"policy_action_{key}"], key
    again = run("scored", 6, 2)  # resumes at 4: the curve keeps steps 2 and 4
    assert again["resumed_from"] == 4
    curve = json.loads((tmp_path / "scored" / "out" / "grounding_metrics.json").read_text())[
        "curve"
    ]
    assert [c["step"] for c in curve] == [2, 4, 6] and curve[:2] == done["curve"]
    assert curve_line(curve).startswith("held-out action NLL by step (direction): 2 ")


def test_lora_adapter_saved_and_merged(prepared, tmp_path):
    from kalm_ray.llm.ground.train_fn import train_loop
    from kalm_ray.llm.model import load_grounded

    cfg = loop_config(
        prepared,
        method="lora",
        max_steps=2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        output_dir=str(tmp_path / "out"),
        info={"method": "lora", "base": "base", "adapter_servable": False},
    )
    train_loop(cfg)
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists() and (
        out / "base" / "config.json"
    ).exists()
    model, _, _ = load_grounded(out)
    assert not hasattr(model, "peft_config")  # plain transformers model, merged


def test_torchtrainer_checkpoint_and_resume(prepared, tmp_path, ray_local, capsys):
    """Ray Train: checkpoint, resume, and the driver's progress bar fed by rank 0."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kalm_ray.llm.ground.train_fn import train_loop
    from kalm_ray.progress import show_progress

    def fit(steps: int):
        with show_progress("ground", total=steps) as board:
            return TorchTrainer(
                train_loop,
                train_loop_config=loop_config(prepared, max_steps=steps, progress_actor=board),
                scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                run_config=RunConfig(name="g", storage_path=str(tmp_path / "ray")),
            ).fit()

    first = fit(2)
    with first.checkpoint.as_directory() as d:
        assert (Path(d) / "train_state.pt").exists() and (Path(d) / "final" / "codec.json").exists()
    assert "ground: 100%" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    second = fit(4)
    assert second.metrics["resumed_from"] == 2 and second.metrics["step"] == 4
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "ground: 100%" in bar[-1] and "4/4" in bar[-1] and "loss=" in bar[-1]


def _write_real_data(run_dir: Path, episodes: list[dict]) -> None:
    import pyarrow.parquet as pq

    from kalm_ray.artifacts import Manifest, RunDir, write_manifest
    from kalm_ray.data.schema import Episode, episodes_to_table, transition_schema
    from kalm_ray.envs import get_suite

    suite = get_suite("clevr")
    eps = [
        Episode(
            env="clevr",
            level="train",
            rewards=np.zeros(len(e["actions"]), np.float32),
            successes=np.zeros(len(e["actions"]), bool),
            terminated=False,
            truncated=True,
            **e,
        )
        for e in episodes
    ]
    table = episodes_to_table(eps, transition_schema(10, suite.action_space))
    (run_dir / "data" / "real").mkdir(parents=True)
    pq.write_table(table, run_dir / "data" / "real" / "episodes-0000.parquet")
    run = RunDir(str(run_dir))
    run.claim("groundtest")
    write_manifest(run, "data/real", Manifest.new("collect", "x", {}))


def test_action_metrics_score_the_demonstrators_actions(prepared):
    """Batched and left-padded, the metric is each example's own forward pass; a model whose
    output favours the demonstrated action scores better than uniform, and one that favours
    another action worse."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kalm_ray.llm.ground.metrics import action_metrics
    from kalm_ray.llm.prompts import EpisodeArrays, rollout_prompt

    root, codec = prepared["root"], prepared["codec"]
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    tok = AutoTokenizer.from_pretrained(root / "base")
    episodes = [EpisodeArrays(**e) for e in toy_episodes(5)]
    got = action_metrics(model, tok, codec, episodes, batch_size=3, device="cpu")
    ids = tok.convert_tokens_to_ids(codec.action_tokens)
    nll = []
    with torch.no_grad():
        for e in episodes:
            for t, a in enumerate(e.actions):
                enc = tok([rollout_prompt(codec, e.instruction, e.states[t])], return_tensors="pt")
                logp = torch.log_softmax(model(**enc).logits[0, -1, ids], -1)
                nll.append(-float(logp[int(a)]))
    assert got["policy_action_n"] == len(nll)
    assert got["policy_action_nll"] == pytest.approx(np.mean(nll), abs=1e-4)
    assert got["policy_action_uniform_nll"] == pytest.approx(np.log(40))

    class Leaning(torch.nn.Module):
        """The model with its logit of action 3 raised by 50: a policy sure of action 3."""

        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, **enc):  # noqa: ANN003 - tokenizer outputs
            out = self.lm(**enc)
            out.logits[..., ids[3]] += 50.0
            return out

    def acting(a: int) -> list[EpisodeArrays]:
        return [
            EpisodeArrays(e.episode_id, e.task, e.instruction, e.states, np.full_like(e.actions, a))
            for e in episodes
        ]

    parts = (("ball", 5), ("direction", 8))  # CLEVR's action_factors: action 3 is ball 0, way 3
    sure = action_metrics(
        Leaning(), tok, codec, acting(3), batch_size=4, device="cpu", factors=parts
    )
    wrong = action_metrics(
        Leaning(), tok, codec, acting(4), batch_size=4, device="cpu", factors=parts
    )
    other = action_metrics(
        Leaning(), tok, codec, acting(11), batch_size=4, device="cpu", factors=parts
    )
    assert sure["policy_action_match"] == 1.0 and sure["policy_action_nll"] < 1e-6
    assert wrong["policy_action_match"] == 0.0 and wrong["policy_action_nll"] > 40
    # By part: action 4 is the right ball pushed the wrong way; action 11 is another ball.
    assert wrong["policy_action_nll_ball"] < 1e-6 and wrong["policy_action_nll_direction"] > 40
    assert other["policy_action_nll_ball"] > 40
    assert other["policy_action_nll_direction"] == pytest.approx(
        other["policy_action_nll"] - other["policy_action_nll_ball"], abs=1e-3
    )
    assert wrong["policy_action_uniform_nll_direction"] == pytest.approx(np.log(8))
    with pytest.raises(ValueError, match="multiply"):
        action_metrics(model, tok, codec, episodes, batch_size=4, device="cpu", factors=(("x", 7),))
    assert action_metrics(model, tok, codec, [], batch_size=4, device="cpu") == {}


def test_lr_schedule_and_bin_features():
    import torch

    from kalm_ray.llm.ground.train_fn import lr_schedule
    from kalm_ray.llm.model import bin_features

    def lrs(start: int, n: int, decay: float = 1.0) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = lr_schedule(opt, peak=1.0, total=200, start=start, decay_fraction=decay)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    full = lrs(0, 201)  # warm-up over 10 steps (200 / 20), cosine to 10% at the end
    assert full[0] == 0.0 and full[5] == pytest.approx(0.5) and full[10] == pytest.approx(1.0)
    assert full[200] == pytest.approx(0.1) and full[105] == pytest.approx(0.55)
    assert lrs(60, 20) == pytest.approx(full[60:80])  # a resume continues the same curve
    # Half the steps after the warm-up at the peak, then the same cosine compressed into the
    # other half: 10 warm-up, 95 stable, 95 decay.
    held = lrs(0, 201, decay=0.5)
    assert held[0] == pytest.approx(0.1) and held[10] == held[105] == pytest.approx(1.0)
    assert held[105 + 95 // 2] == pytest.approx(0.55, abs=0.01) and held[200] == pytest.approx(0.1)
    assert lrs(120, 20, decay=0.5) == pytest.approx(held[120:140])
    f = bin_features(64, 32)
    assert f.shape == (64, 32) and np.sqrt((f**2).mean()) == pytest.approx(1.0, rel=1e-4)
    near, far = np.linalg.norm(f[10] - f[11]), np.linalg.norm(f[10] - f[50])
    assert near < 0.5 * far  # neighbouring values start close


def test_weight_decay_reaches_the_matrices_only():
    import torch

    from kalm_ray.llm.ground.train_fn import param_groups

    w, norm = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    assert [g["weight_decay"] for g in param_groups([w, norm], 0.0)] == [0.0]  # old checkpoints
    opt = torch.optim.AdamW(param_groups([w, norm], 0.5), lr=0.1)
    opt.zero_grad()
    (0.0 * (w.sum() + norm.sum())).backward()  # zero gradients: only the decay moves weights
    opt.step()
    assert torch.allclose(w, torch.full((3, 3), 0.95)) and torch.equal(norm, torch.ones(3))


def test_example_pool_batches_do_not_depend_on_file_or_row_order(tmp_path):
    """Ray Data writes the examples in task-completion order; the batches a seed draws (and so
    the grounded weights, and a resumed run's match with an uninterrupted one) must not vary
    with it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kalm_ray.llm.ground.train_fn import ExamplePool

    rng = np.random.default_rng(0)
    rows = [
        {
            "episode_id": f"e{i % 7}",
            "task": ("rollout", "dynamics")[i % 2],
            "input_ids": rng.integers(0, 50, size=int(rng.integers(3, 9))).tolist(),
            "prompt_len": 2,
            "split": "train",
        }
        for i in range(60)
    ]
    draws = []
    for k, order in enumerate((range(60), rng.permutation(60), rng.permutation(60))):
        folder = tmp_path / f"ex{k}"
        folder.mkdir()
        shuffled = [rows[int(i)] for i in order]
        for f in range(3):  # three files, named so that their listing order changes too
            pq.write_table(
                pa.Table.from_pylist(shuffled[f::3]), folder / f"{(f + k) % 3}-{k}.parquet"
            )
        pool = ExamplePool(
            str(folder), rank=0, world=1, task_mix={"rollout": 1.0, "dynamics": 1.0}, seed=5
        )
        draws.append(
            [(t, [r[0].tolist() for r in b]) for t, b in (pool.batch(s, 4) for s in range(20))]
        )
    assert draws[0] == draws[1] == draws[2]


@pytest.mark.slow
def test_run_ground_stage(tmp_path, ray_local, capsys):
    from kalm_ray.config import parse_config
    from kalm_ray.llm.model import load_grounded
    from kalm_ray.llm.prompts import is_heldout
    from kalm_ray.stages.ground import run_ground

    _write_real_data(tmp_path, toy_episodes(30))
    cfg = parse_config(
        {
            "name": "groundtest",
            "run_dir": str(tmp_path),
            "env": {"name": "clevr"},
            "ground": {
                "method": "full",
                "max_steps": 3,
                "batch_size": 4,
                "n_bins": 64,
                "heldout_fraction": 0.2,
                "eval_examples": 8,
                "eval_rollouts": 2,
                "checkpoint_every": 2,
                "score_every": 1,
            },
        }
    )
    m = run_ground(cfg, str(tmp_path))
    model_dir = tmp_path / "model"
    metrics = json.loads((model_dir / "grounding_metrics.json").read_text())
    assert {"dynamics_mae", "copy_baseline_mae", "explain_exact_match", "rollout_decoded"} <= set(
        metrics
    )
    assert m.counts["episodes_heldout"] > 0 and m.counts["examples_train"] > 0
    # The training time by task (recorded and printed): what the task mix costs.
    shares = {k: v for k, v in m.counts.items() if k.startswith("time_share_")}
    assert shares and sum(shares.values()) == pytest.approx(1.0)
    shown = capsys.readouterr()
    assert "; by task: " in shown.out
    # Held-out scores during training: printed at the end, and on the bar as they come.
    assert "held-out action NLL by step (direction): 1 " in shown.out
    assert [c["step"] for c in metrics["curve"]] == [1, 2, 3]
    assert "held-out NLL=" in shown.err
    # One-step predictions from held-out states through the validity filter, and the data's own
    # next states beside them. The toy world's pushes ignore collisions, so some of its own steps
    # put balls into each other, which the filter rejects. That the metric is exactly the share
    # of real next states the filter rejects (real CLEVR steps pass) is test_filter.py's
    # test_dynamics_metrics_score_the_real_next_states_through_the_filter.
    assert 0.0 <= metrics["dynamics_rejected"] <= 1.0
    assert 0.0 <= metrics["dynamics_rejected_real"] < 1.0
    # The LLM-as-policy 2 x 2: held-out and training starts, own and rephrased wordings.
    assert metrics["policy_n"] == m.counts["episodes_heldout"]
    assert metrics["policy_seen_n"] == m.counts["episodes_train"]
    for prefix in ("policy", "policy_seen"):
        for key in ("llm_success", "random_success", "llm_rephrase_success"):
            assert 0.0 <= metrics[f"{prefix}_{key}"] <= 1.0
    # The demonstrator's actions also on whole training episodes: a seeded sample of them
    # (another stream of the held-out hash), never a held-out one.
    sample = [
        e
        for e in toy_episodes(30)
        if not is_heldout(e["episode_id"], 0.2, 0) and is_heldout(e["episode_id"], 0.2, 1)
    ]
    assert sample and metrics["seen_policy_action_n"] == sum(len(e["actions"]) for e in sample)
    assert f"and on {metrics['seen_policy_action_n']} states it trained on: NLL" in shown.out
    # A grounding whose LLM is not ahead of random pushes says so, and only such a one.
    ahead = metrics["policy_llm_success"] > metrics["policy_random_success"]
    assert ("ground: warning: the LLM as a policy" in shown.out) is not ahead
    assert not (tmp_path / "model.work").exists()
    model, tok, codec = load_grounded(model_dir)
    assert codec.n_bins == 64 and model.config.vocab_size >= len(tok)
    assert run_ground(cfg, str(tmp_path)).output_id == m.output_id  # current: skipped


def test_relabel_copies_refuse_episodes_without_a_training_wording(tmp_path, ray_local):
    """``ground.relabel_copies`` needs each episode's wording to be one of its goal's current
    training wordings: one error line naming the key, before any example is built."""
    from kalm_ray.config import parse_config
    from kalm_ray.stages.ground import run_ground

    _write_real_data(tmp_path, toy_episodes(6))  # wording "push the red ball left"
    cfg = parse_config(
        {
            "name": "groundtest",
            "run_dir": str(tmp_path),
            "ground": {"method": "full", "max_steps": 1, "relabel_copies": 2},
        }
    )
    with pytest.raises(InputError, match="ground.relabel_copies: 2: .*'push the red ball left'"):
        run_ground(cfg, str(tmp_path))
    assert not (tmp_path / "model").exists()


def test_rephrased_wordings_are_the_same_goals_and_stable():
    """The policy metrics' rephrased episodes: same goal and start, a rephrase-level wording."""
    from kalm_ray.envs import get_suite
    from kalm_ray.llm.ground.metrics import rephrased
    from kalm_ray.llm.prompts import EpisodeArrays

    suite = get_suite("clevr")
    tasks = suite.tasks("train")[:5]
    states = np.zeros((2, suite.layout.dim), np.float32)
    eps = [
        EpisodeArrays(f"e{i}", t, suite.instructions("train", t)[0], states, np.zeros(1))
        for i, t in enumerate(tasks)
    ]
    got = rephrased(suite, eps, seed=3)
    assert [e.task for e in got] == tasks and all(e.states is states for e in got)
    assert all(e.instruction in suite.instructions("rephrase", e.task) for e in got)
    assert not {e.instruction for e in got} & {e.instruction for e in eps}
    assert [e.instruction for e in rephrased(suite, eps, seed=3)] == [e.instruction for e in got]
    novel = EpisodeArrays("x", suite.tasks("easy")[0], "w", states, np.zeros(1))
    assert rephrased(suite, [*eps, novel], seed=3) == []  # a goal with no rephrase wording


@pytest.mark.gpu
def test_lora_grounding_110m_on_gpu(tmp_path):
    """LoRA grounding of a ~113M-parameter Llama (random init, built locally) through train_loop."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kalm_ray.llm.codec import Codec
    from kalm_ray.llm.ground.train_fn import train_loop
    from kalm_ray.llm.model import count_params, load_grounded, make_codec_tokens_atomic
    from kalm_ray.llm.prompts import EpisodeArrays, episode_examples, rollout_prompt

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    codec = Codec.for_suite(toy_suite(), 64)
    tok = _standalone_tokenizer(codec)
    make_codec_tokens_atomic(tok, codec)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    assert count_params(model) >= 100e6
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    codec.save(tmp_path)
    rows = []
    for e in toy_episodes(64):
        rows += episode_examples(codec, tok, EpisodeArrays(**e), max_seq_len=512)[0]
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = train_loop(
        {
            "base": str(tmp_path / "base"),
            "tokenizer_dir": str(tmp_path / "base"),
            "codec_path": str(tmp_path / "codec.json"),
            "examples": str(tmp_path / "ex"),
            "method": "lora",
            "lora": {
                "r": 16,
                "alpha": 32,
                "dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            },
            "train_codec_embeddings": True,
            "init_codec_rows": True,
            "max_steps": 60,
            "batch_size": 16,
            "lr": 2e-3,
            "checkpoint_every": 30,
            "seed": 0,
            "use_gpu": True,
            "task_mix": {"dynamics": 1.0, "rollout": 1.0},
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "output_dir": str(tmp_path / "out"),
            "info": {"method": "lora", "base": "base", "adapter_servable": False},
        }
    )
    print("gpu lora:", out)
    assert out["step"] == 60 and np.isfinite(out["loss"])
    model, tok, codec = load_grounded(tmp_path / "out", device="cuda")
    assert model.dtype == torch.bfloat16
    enc = tok(
        [rollout_prompt(codec, "push the red ball left", toy_episodes(1)[0]["states"][0])],
        return_tensors="pt",
    ).to("cuda")
    gen = model.generate(**enc, max_new_tokens=20, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def _standalone_tokenizer(codec):
    """The tiny tokenizer when the encoder package is installed, else a character-level one."""
    try:
        from kalm_ray.llm.model import build_tiny_tokenizer

        return build_tiny_tokenizer(codec, ["push the red ball left"])[0]
    except ImportError:
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        chars = [chr(c) for c in range(32, 127)]
        vocab = {
            t: i
            for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *chars, *codec.all_tokens])
        }
        tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", special_tokens=[("[CLS]", 2)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tk,
            bos_token="[CLS]",
            eos_token="[SEP]",
            unk_token="[UNK]",
            pad_token="[PAD]",
        )


@pytest.mark.parametrize(
    ("ground", "error", "needle"),
    [
        ({"use_gpu": True}, "BackendUnavailable", "ground.use_gpu asks for GPUs"),
        (
            {"num_workers": 3, "num_cpus_per_worker": 4},
            "InputError",
            "ground.num_workers: needs 12 CPUs at once, but this local Ray has 8",
        ),
    ],
)
def test_groundings_ray_cannot_place_are_refused_before_any_example(
    tmp_path, ray_local, ground, error, needle
):
    """GPUs where Ray has none (this CPU machine), or more CPUs at once than the local Ray
    has: one line naming the key, before the examples are built, instead of Ray Train
    waiting for its workers forever."""
    from kalm_ray import errors
    from kalm_ray.config import parse_config
    from kalm_ray.stages.ground import run_ground

    _write_real_data(tmp_path, toy_episodes(6))
    cfg = parse_config(
        {
            "name": "groundtest",
            "run_dir": str(tmp_path),
            "ground": {"method": "full", "max_steps": 1, **ground},
        }
    )
    with pytest.raises(getattr(errors, error), match=needle):
        run_ground(cfg, str(tmp_path))
    assert not (tmp_path / "model").exists()
    assert not list((tmp_path / "model.work").glob("*/examples"))
