"""Experiment recipes: arms built from the pipeline recipe, every problem reported at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sdpo_core.config_rules import ConfigError
from sdpo_core.experiment_config import load_experiment

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {
    "name": "e",
    "pipeline_recipe": str(REPO / "recipes" / "default.yaml"),
    "pipeline": {"train": {"epochs": 2}},
    "seeds": [3, 4],
    "arms": [
        {"name": "sdpo"},
        {"name": "dpo", "set": {"partition.strategy": "sequential", "partition.num_steps": 1}},
        {"name": "random", "set": {"partition.strategy": "random"}, "seed_keys": ["train.seed", "partition.seed"],
         "sizes_from": "sdpo"},
        {"name": "init_base", "set": {"train.init": "base"}},
    ],
}  # fmt: skip


def test_arm_configs(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, BASE))
    sdpo = exp.arm_config(exp.arm("sdpo"), 3)
    assert sdpo.run_name == "e-sdpo-s3" and sdpo.train.seed == 3 and sdpo.train.epochs == 2
    assert sdpo.partition.strategy == "by_source" and sdpo.model.name_or_path == "models/stories260K"
    rnd = exp.arm_config(exp.arm("random"), 4, (5, 6, 7))
    assert (rnd.partition.seed, rnd.train.seed, rnd.partition.sizes) == (4, 4, (5, 6, 7))
    assert exp.arm_config(exp.arm("init_base"), 3).train.init == "base"
    assert exp.arm_config(exp.arm("dpo"), 3).planned_steps() == 1
    # Arms share the data preparation: one data hash, whatever else differs.
    assert len({exp.arm_config(a, 3).data_hash() for a in exp.arms}) == 1
    assert len({exp.arm_config(a, 3).hash() for a in exp.arms}) == 4


def test_every_problem_named_together(tmp_path: Path) -> None:
    bad = dict(BASE)
    bad["seeds"] = [1, 1]
    bad["compare_to"] = "nope"
    bad["arms"] = [
        {"name": "sdpo", "set": {"loss.beta": "x"}},
        {"name": "a/b", "sizes_from": "later"},
        {"name": "later", "set": {"data.max_length": 64}},
    ]
    with pytest.raises(ConfigError) as info:
        load_experiment(_write(tmp_path, bad))
    text = str(info.value)
    for expected in ("seeds: each seed once", "compare_to: 'nope'", "arms.1.name", "arms.1.sizes_from: 'later'"):
        assert expected in text, text


def test_an_arm_with_a_bad_setting_or_other_data_fails_at_load(tmp_path: Path) -> None:
    bad = dict(BASE)
    bad["arms"] = [{"name": "sdpo", "set": {"loss.beta": "x"}}, {"name": "other", "set": {"data.max_length": 64}}]
    with pytest.raises(ConfigError, match=r"arms.0 \(sdpo\): loss.beta"):
        load_experiment(_write(tmp_path, bad))
    bad["arms"] = [{"name": "sdpo"}, {"name": "other", "set": {"data.max_length": 200}}]
    with pytest.raises(ConfigError, match="must keep the model and data settings.*other"):
        load_experiment(_write(tmp_path, bad))
    bad["arms"] = [{"name": "sdpo", "sett": {}}]
    with pytest.raises(ConfigError, match="arms.0.sett"):
        load_experiment(_write(tmp_path, bad))


def test_shipped_experiment_recipes_load() -> None:
    for path in sorted((REPO / "recipes" / "experiments").glob("*.yaml")):
        exp = load_experiment(path)
        assert len(exp.seeds) >= 3, path
        assert {"sdpo", "dpo", "random", "hard_to_easy", "init_base"} <= {a.name for a in exp.arms}, path


def test_gold_prompts_are_checked_at_load(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Once upon a time"}\n{"text": "no prompt key"}\n')
    data = dict(BASE) | {"evaluation": {"gold_prompts": str(prompts)}}
    with pytest.raises(ConfigError, match=r"evaluation.gold_prompts: .*prompts.jsonl, line 2"):
        load_experiment(_write(tmp_path, data))
    prompts.write_bytes(b'{"prompt": "\\xff"}\n\xff\xfe\n')
    with pytest.raises(ConfigError, match="evaluation.gold_prompts"):
        load_experiment(_write(tmp_path, data))
    data["evaluation"] = {"gold_prompts": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ConfigError, match="file not found"):
        load_experiment(_write(tmp_path, data))
