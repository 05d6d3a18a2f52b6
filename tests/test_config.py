"""Config validation at the edge: every shipped config is valid; bad values are one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kalm_ray.config import ExperimentConfig, load_config, parse_config
from kalm_ray.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert "${name}" not in cfg.run_dir


def test_quick_is_cpu_clevr() -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / "quick.yaml")
    assert cfg.env.name == "clevr" and not cfg.ground.use_gpu
    assert set(cfg.train.data) == {"real", "real+imagined"} and len(cfg.train.seeds) >= 2


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"name": "x", "collect": {"episodes_per_task": -3}}, "collect.episodes_per_task"),
        ({"name": "x", "collect": {"episodes": 3}}, "collect.episodes: unknown key"),
        ({"name": "x", "bogus": 1}, "bogus: unknown key"),
        ({"name": "x", "train": {"iterations": "many"}}, "train.iterations"),
        ({"name": "x", "env": {"name": "atari"}}, "env.name"),
        ({"name": "x", "train": {"algos": ["cql"]}}, "c.yaml: train.algos: ['cql'] do not fit"),
        ({"name": "x", "imagine": {"min_actors": 3, "max_actors": 1}}, "min_actors"),
        # An empty list would plan no work (or fail in its stage) and say nothing.
        ({"name": "x", "train": {"algos": []}}, "train.algos: List should have at least 1"),
        ({"name": "x", "train": {"seeds": []}}, "train.seeds"),
        ({"name": "x", "train": {"data": []}}, "train.data"),
        ({"name": "x", "evaluate": {"levels": []}}, "evaluate.levels"),
        ({"name": "x", "imagine": {"levels": []}}, "imagine.levels"),
        ({"name": "x", "collect": {"tasks": []}}, "collect.tasks"),
        # An item twice: two units of one name race into one folder; a level twice counts
        # each episode twice.
        ({"name": "x", "train": {"seeds": [0, 1, 0]}}, "train.seeds: 0 is listed"),
        ({"name": "x", "evaluate": {"levels": ["easy", "easy"]}}, "'easy' is listed twice"),
        ({"name": "x", "train": {"algos": ["bc", "bc"]}}, "train.algos"),
        # No bool for a number inside a mapping's values either.
        ({"name": "x", "ground": {"task_mix": {"rollout": True}}}, "ground.task_mix.rollout"),
        (
            {"name": "x", "ground": {"model": {"tiny": {"num_hidden_layers": True}}}},
            "ground.model.tiny.num_hidden_layers",
        ),
        ({"name": "x", "imagine": {"candidates": 4}}, "candidates > 1 needs mode: stepwise"),
        ({"name": "x", "imagine": {"candidates": 0, "mode": "stepwise"}}, "imagine.candidates"),
        (
            {"name": "x", "imagine": {"candidates": 4, "mode": "stepwise"}},
            "candidates: 4 with temperature 0 imagines one rollout 4 times",
        ),
        (
            {"name": "x", "ground": {"model": {"tiny": {"num_attention_heads": 2}}}},
            "num_attention_heads (2) must be a multiple of num_key_value_heads (4, its default",
        ),
        (
            {"name": "x", "ground": {"model": {"tiny": {"num_key_value_heads": 3}}}},
            "num_attention_heads (4) must be a multiple of num_key_value_heads (3)",
        ),
        ({"name": "bad name!"}, "name"),
        # `..` would make the default run dir runs/.., the project root
        ({"name": ".."}, "name: dots alone are no name"),
        ({"name": "x", "run_dir": ""}, "run_dir: String should have at least 1 character"),
        ({"name": "x", "train": {"lr": float("inf")}}, "train.lr: Input should be a finite"),
        ({"name": "x", "imagine": {"temperature": float("nan")}}, "imagine.temperature"),
        # A training unit's RLlib seed is master x 1000 + train seed, below 2**32.
        ({"name": "x", "seed": 4_294_967}, "seed: Input should be less than or equal to 4294966"),
        ({"name": "x", "train": {"seeds": [0, 1000]}}, "train.seeds.1: Input should be less"),
        (
            {
                "name": "x",
                "env": {"name": "metaworld"},
                "train": {"algos": ["bc"]},
                "ground": {"relabel_copies": 2},
            },
            "only CLEVR has symmetries",
        ),
        ({"name": "x", "ground": {"relabel_copies": -1}}, "ground.relabel_copies"),
        ({"name": "x", "ground": {"weight_decay": -0.1}}, "ground.weight_decay"),
        ({"name": "x", "ground": {"lr_decay_fraction": 0}}, "ground.lr_decay_fraction"),
        ({"name": "x", "ground": {"lr_decay_fraction": 1.5}}, "ground.lr_decay_fraction"),
        ({"name": "x", "imagine": {"compose": True}}, "compose needs mode: stepwise"),
        (
            {"name": "x", "ground": {"task_mix": {"policy": 0.6, "dynamics": 0.4}}},
            "imagine.mode rollout continues the rollout prompt: ground.task_mix needs rollout",
        ),
        (
            {
                "name": "x",
                "ground": {"task_mix": {"policy": 1.0, "dynamics": 0.0}},
                "imagine": {"mode": "stepwise"},
            },
            "ground.task_mix needs dynamics, and policy or rollout",
        ),
        (
            {
                "name": "x",
                "ground": {"task_mix": {"dynamics": 1.0, "explain": 0.5}},
                "imagine": {"mode": "stepwise"},
            },
            "ground.task_mix needs dynamics, and policy or rollout",
        ),
        ({"name": "x", "imagine": {"state_retries": 2}}, "state_retries needs mode: stepwise"),
        ({"name": "x", "imagine": {"action_retries": 2}}, "action_retries needs mode: stepwise"),
        (
            {"name": "x", "imagine": {"consistency_draws": 4}},
            "consistency_draws needs mode: stepwise",
        ),
        (
            {"name": "x", "imagine": {"mode": "stepwise", "consistency_min": 1.5}},
            "imagine.consistency_min",
        ),
        (
            {"name": "x", "imagine": {"mode": "stepwise", "state_temperature": 0}},
            "imagine.state_temperature",
        ),
        (
            {
                "name": "x",
                "env": {"name": "metaworld"},
                "train": {"algos": ["bc"]},
                "imagine": {"compose": True, "mode": "stepwise", "backend": "hf"},
            },
            "only CLEVR's hard goals",
        ),
    ],
)
def test_bad_values_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, source="c.yaml")
    msg = str(e.value)
    assert msg.startswith("c.yaml") and needle in msg and "\n" not in msg
    # pydantic's own labels are not ours to show: a check across sections names its keys.
    assert "Value error" not in msg and "(top level)" not in msg


def test_yaml_errors_are_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ncollect: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_run_dir_override_and_hash_stability(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: exp\n")
    cfg = load_config(p, run_dir=str(tmp_path / "r"))
    assert cfg.run_dir == str(tmp_path / "r")
    assert load_config(p).run_dir == "runs/exp"
    # --seed: a replicate of the experiment, the same file with another master seed.
    rep = load_config(p, seed=3)
    assert rep.seed == 3 and load_config(p).seed == 0 and rep.run_dir == "runs/exp"
    assert rep.section_hash("collect") != load_config(p).section_hash("collect")
    with pytest.raises(ConfigError, match="seed"):
        load_config(p, seed=-1)
    # ~ is the user's home, as in a shell (it made a folder named `~` in the project)
    from kalm_ray.artifacts import RunDir

    assert RunDir("~/kalm-run").root == str(Path.home() / "kalm-run")
    # A YAML key that is a list or mapping (`? [a, b]`) is refused with the file's name.
    k = tmp_path / "k.yaml"
    k.write_text("name: exp\n? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="k.yaml: line 2 not valid YAML .a key must be a plain"):
        load_config(k)
    # ${seed}: each replicate in its own folder without a --run-dir per seed.
    t = tmp_path / "t.yaml"
    t.write_text("name: exp\nrun_dir: runs/${name}_s${seed}\n")
    assert load_config(t).run_dir == "runs/exp_s0"
    assert load_config(t, seed=3).run_dir == "runs/exp_s3"
    t.write_text("name: exp\nrun_dir: runs/${experiment}\n")
    with pytest.raises(ConfigError, match="placeholder other than"):
        load_config(t)
    a = cfg.section_hash("env", "collect")
    b = parse_config({"name": "exp", "collect": {"epsilon": 0.1}}).section_hash("env", "collect")
    c = parse_config({"name": "exp", "collect": {"epsilon": 0.2}}).section_hash("env", "collect")
    assert a == b != c
    # A field added later is hashed only when set: runs made before it stay current.
    plain = parse_config({"name": "exp"})
    assert "relabel_copies" not in plain.ground.hashed_dump()
    assert plain.section_hash("ground") == parse_config(
        {"name": "exp", "ground": {"relabel_copies": 0}}
    ).section_hash("ground")
    assert plain.section_hash("ground") != parse_config(
        {"name": "exp", "ground": {"relabel_copies": 4}}
    ).section_hash("ground")
    for key, value in (("weight_decay", 0.1), ("lr_decay_fraction", 0.5)):
        assert key not in plain.ground.hashed_dump()
        assert plain.section_hash("ground") != parse_config(
            {"name": "exp", "ground": {key: value}}
        ).section_hash("ground")
    # Where checkpoints fall changes no weight: a grounding is not redone for it, and the
    # fingerprint is the one every run had (hashed at the old default).
    every = parse_config({"name": "exp", "ground": {"checkpoint_every": 50}})
    assert every.section_hash("ground") == plain.section_hash("ground")
    assert every.ground.hashed_dump()["checkpoint_every"] == 200
    assert "compose" not in plain.imagine.hashed_dump()
    stepwise = {"name": "exp", "imagine": {"mode": "stepwise"}}
    composed = {"name": "exp", "imagine": {"mode": "stepwise", "compose": True}}
    assert parse_config(stepwise).section_hash("imagine") != parse_config(composed).section_hash(
        "imagine"
    )

    # Redraws: their temperature counts only where there are draws.
    def imagine_hash(**kw: object) -> str:
        imagine = {"mode": "stepwise", **kw}
        return parse_config({"name": "exp", "imagine": imagine}).section_hash("imagine")

    assert imagine_hash() == imagine_hash(state_retries=0, state_temperature=0.3)
    assert (
        imagine_hash()
        != imagine_hash(state_retries=2)
        != imagine_hash(state_retries=2, state_temperature=0.3)
    )
    assert imagine_hash() == imagine_hash(action_retries=0, consistency_draws=0)
    assert imagine_hash() == imagine_hash(consistency_min=0.9)  # no draws: nothing to judge
    assert imagine_hash() != imagine_hash(action_retries=2)
    assert (
        imagine_hash()
        != imagine_hash(consistency_draws=4)
        != imagine_hash(consistency_draws=4, consistency_min=0.9)
    )


def test_placement_fields_do_not_change_stage_hash() -> None:
    base = parse_config({"name": "x"})
    more = parse_config(
        {
            "name": "x",
            "collect": {"num_workers": 8},
            "evaluate": {"num_workers": 3},
            "imagine": {"max_actors": 6},
            "text": {"batch_size": 8},
        }
    )
    for sections in (("env", "collect", "text"), ("env", "evaluate"), ("env", "ground", "imagine")):
        assert base.section_hash(*sections) == more.section_hash(*sections)
    assert base.section_hash("collect") != parse_config(
        {"name": "x", "collect": {"episodes_per_task": 3}}
    ).section_hash("collect")
