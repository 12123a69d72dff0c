"""Config loading: shipped recipes, unknown keys, collected problems, overrides, types, help text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from sdpo_core.config import (
    ConfigError,
    RunConfig,
    SourceConfig,
    from_dict,
    load_config,
    parse_override,
)
from sdpo_core.config_rules import describe

REPO = Path(__file__).resolve().parents[2]
# Pipeline recipes; recipes/experiments/ holds experiment recipes (tests/sdpo_core/test_experiment_config.py).
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.y*ml") if "experiments" not in p.relative_to(REPO).parts)


def _minimal(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"data": {"sources": [{"path": "data/a.jsonl"}]}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return data


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_there_are_shipped_recipes() -> None:
    assert any(p.name == "default.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipe_loads(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.sources
    assert all(s.name for s in cfg.data.sources)
    # Saved beside each checkpoint and reloaded: the resolved config must round-trip.
    assert from_dict(cfg.to_dict()) == cfg


def test_default_recipe_values() -> None:
    cfg = load_config(REPO / "recipes" / "default.yaml")
    assert [s.name for s in cfg.data.sources] == ["hh-rlhf-helpful", "orca-dpo", "llamafactory-mix"]
    assert [s.format for s in cfg.data.sources] == ["hh", "openai", "sharegpt"]
    assert cfg.data.sources[0].max_pairs == 400 and cfg.data.sources[1].max_pairs is None
    assert cfg.train.grad_accum_steps == 2 and cfg.train.learning_rate == 0.001
    for s in cfg.data.sources:
        assert (REPO / s.path).is_file(), f"{s.path} is shipped with the repo"


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  sources:\n    - path: data/a.jsonl\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"learning_rate: unknown key") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert info.value.problems == [info.value.problems[0]] and "learning_rate" in info.value.problems[0]


def test_unknown_nested_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.foo: unknown key") as info:
        from_dict(_minimal(train={"foo": 1}))
    assert "learning_rate" in str(info.value), "the message lists the known keys of the section"
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.nmae: unknown key"):
        from_dict({"data": {"sources": [{"path": "a.jsonl", "nmae": "x"}]}})


def test_unknown_key_through_override() -> None:
    with pytest.raises(ConfigError, match=r"loss\.betta: unknown key"):
        load_config(REPO / "recipes" / "default.yaml", ["loss.betta=0.2"])


def test_all_problems_reported_together() -> None:
    data = _minimal(train={"foo": 1, "epochs": "two", "micro_batch_size": 1.5}, loss={"name": "kto"}, bar=3)
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    problems = info.value.problems
    assert len(problems) == 5, problems
    text = str(info.value)
    assert text.startswith("5 problem(s)")
    for key in ("train.foo", "train.epochs", "train.micro_batch_size", "loss.name", "bar"):
        assert any(p.startswith(key + ":") for p in problems), key
        assert key in text


def test_value_problems_reported_together() -> None:
    """Checks beyond types (ranges, cross-field rules) are collected the same way."""
    data = _minimal(
        data={"eval_fraction": 1.5, "max_length": 64, "max_prompt_length": 64},
        loss={"beta": -1.0, "name": "ipo", "label_smoothing": 0.1},
        train={"learning_rate": 0.0},
        run_name="a/b",
        storage={"credentials_block": "S3 Credentials/prod"},
    )
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    keys = {p.split(":")[0] for p in info.value.problems}
    assert keys == {
        "data.eval_fraction",
        "data.max_prompt_length",
        "loss.beta",
        "loss.label_smoothing",
        "train.learning_rate",
        "run_name",
        "storage.credentials_block",
    }
    assert from_dict(_minimal(storage={"credentials_block": "s3-credentials/prod"})).storage.credentials_block


def test_no_sources_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.sources: at least one source"):
        from_dict({})


def test_duplicate_source_names() -> None:
    data = {"data": {"sources": [{"path": "x/a.jsonl"}, {"path": "y/a.json"}]}}
    with pytest.raises(ConfigError, match=r"source names must be unique.*\['a', 'a'\]"):
        from_dict(data)


def test_overrides_apply() -> None:
    cfg = load_config(
        REPO / "recipes" / "default.yaml",
        ["train.learning_rate=0.002", "data.sources.0.max_pairs=5", "loss.name=ipo", "train.adam_betas=[0.8, 0.9]"],
    )
    assert cfg.train.learning_rate == 0.002
    assert cfg.data.sources[0].max_pairs == 5
    assert cfg.data.sources[1].max_pairs is None
    assert cfg.loss.name == "ipo"
    assert cfg.train.adam_betas == (0.8, 0.9)


def test_override_replaces_a_list_item() -> None:
    cfg = load_config(REPO / "recipes" / "default.yaml", ["data.sources.1={path: data/other.jsonl, format: standard}"])
    assert cfg.data.sources[1] == SourceConfig(path="data/other.jsonl", name="other", format="standard")
    assert cfg.data.sources[0].name == "hh-rlhf-helpful"


def test_override_int_to_float_and_null() -> None:
    cfg = load_config(REPO / "recipes" / "default.yaml", ["train.learning_rate=1", "data.sources.0.max_pairs=null"])
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.data.sources[0].max_pairs is None


def test_layout_settings_take_auto_or_a_value() -> None:
    default = load_config(REPO / "recipes" / "default.yaml")
    assert (default.train.shared_prompt, default.train.max_pass_tokens) == ("auto", "auto")
    cfg = load_config(REPO / "recipes" / "default.yaml", ["train.shared_prompt=false", "train.max_pass_tokens=2048"])
    assert (cfg.train.shared_prompt, cfg.train.max_pass_tokens) == (False, 2048)
    cfg = load_config(REPO / "recipes" / "default.yaml", ["train.max_pass_tokens=null"])
    assert cfg.train.max_pass_tokens is None
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "recipes" / "default.yaml", ["train.shared_prompt=sometimes", "train.max_pass_tokens=lots"])
    assert "train.shared_prompt: expected 'auto' or 'packed' or true or false, got str 'sometimes'" in str(err.value)
    assert "train.max_pass_tokens: expected 'auto' or an integer or null, got str 'lots'" in str(err.value)
    with pytest.raises(ConfigError, match="train.max_pass_tokens: must be at least 1, got 0"):
        load_config(REPO / "recipes" / "default.yaml", ["train.max_pass_tokens=0"])


def test_override_scientific_notation() -> None:
    cfg = load_config(REPO / "recipes" / "default.yaml", ["train.learning_rate=1e-3", "loss.beta=5e-2"])
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.loss.beta == pytest.approx(5e-2)


def test_override_errors() -> None:
    default = REPO / "recipes" / "default.yaml"
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(default, ["train.learning_rate"])
    with pytest.raises(ConfigError, match=r"data\.sources\.7\.max_pairs: data\.sources\.7 is not a section"):
        load_config(default, ["data.sources.7.max_pairs=3"])
    with pytest.raises(ConfigError, match=r"data\.sources\.3: no list item 3"):
        load_config(default, ["data.sources.3={path: x.jsonl}"])
    with pytest.raises(ConfigError, match=r"run_name\.x: run_name is not a section"):
        load_config(default, ["run_name.x=1"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..epochs=1")


def test_parse_override_yaml_values() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"train": {"learning_rate": "fast"}}, r"train\.learning_rate: expected a number, got str 'fast'"),
        ({"train": {"epochs": True}}, r"train\.epochs: expected an integer, got bool True"),
        ({"train": {"epochs": 1.0}}, r"train\.epochs: expected an integer, got float 1\.0"),
        ({"model": {"trust_remote_code": "yes"}}, r"model\.trust_remote_code: expected true or false"),
        ({"run_name": 5}, r"run_name: expected a string, got int 5"),
        ({"train": {"adam_betas": 0.9}}, r"train\.adam_betas: expected a list"),
        ({"train": {"adam_betas": [0.9]}}, r"train\.adam_betas: expected 2 values, got 1"),
        ({"partition": {"strategy": "zigzag"}}, r"partition\.strategy: 'zigzag' is not one of 'by_source', 'random'"),
        ({"train": 3}, r"train: expected a mapping, got int 3"),
    ],
)
def test_wrong_types_are_named(section: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        from_dict(_minimal(**section))


def test_wrong_type_in_a_source() -> None:
    data = {"data": {"sources": [{"path": "a.jsonl", "max_pairs": "ten"}]}}
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.max_pairs: expected an integer, got str 'ten'"):
        from_dict(data)
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.path: required"):
        from_dict({"data": {"sources": [{"name": "x"}]}})


def test_source_name_defaults_to_file_stem() -> None:
    data = {
        "data": {
            "sources": [
                {"path": "data/hh-rlhf_helpful-base_test.jsonl.gz"},
                {"path": "data/llamafactory_dpo_en_demo.json"},
                {"path": "x/orca.jsonl", "name": "custom"},
            ]
        }
    }
    cfg = from_dict(data)
    assert [s.name for s in cfg.data.sources] == ["hh-rlhf_helpful-base_test", "llamafactory_dpo_en_demo", "custom"]


def test_missing_recipe_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_config_is_frozen_and_hash_tracks_content() -> None:
    cfg = from_dict(_minimal())
    with pytest.raises(ValidationError, match="frozen"):
        cfg.run_name = "x"  # type: ignore[misc]
    assert cfg.hash() == from_dict(_minimal()).hash()
    assert cfg.hash() != from_dict(_minimal(train={"seed": 1})).hash()


def _leaves(cls: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf key of a config model, walked from its JSON schema, independently of describe()."""
    schema = cls.model_json_schema()
    defs = schema.get("$defs", {})

    def walk(node: dict[str, Any], prefix: str) -> set[str]:
        out: set[str] = set()
        for name, prop in node["properties"].items():
            ref = prop.get("$ref") or next((a.get("$ref") for a in prop.get("anyOf", []) if "$ref" in a), None)
            items = prop.get("items", {}).get("$ref")
            if ref:
                out |= walk(defs[ref.rsplit("/", 1)[-1]], f"{prefix}{name}.")
            else:
                out.add(prefix + name)
                if items:
                    out |= walk(defs[items.rsplit("/", 1)[-1]], f"{prefix}{name}.<i>.")
        return out

    return walk(schema, prefix)


def test_describe_covers_every_leaf_with_a_doc() -> None:
    rows = describe(RunConfig)
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == _leaves(RunConfig)
    assert "train.learning_rate" in keys and "data.sources.<i>.max_pairs" in keys
    undocumented = [key for key, _, doc in rows if not doc.strip()]
    assert undocumented == []
    defaults = {key: default for key, default, _ in rows}
    assert defaults["loss.beta"] == "0.1"
    assert defaults["data.sources"] == "[]"
    assert defaults["train.adam_betas"] == "(0.9, 0.999)"


def _alias_bomb(key: str) -> str:
    """540 bytes of YAML that expand to 10^9 strings if walked: nine levels of ten aliases."""
    lines = ['  a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "anchors:\n" + "\n".join(lines) + f"\n{key}: *a8\n"


@pytest.mark.parametrize("key", ["run_name", "data:\n  sources", "train:\n  adam_betas"])
def test_a_yaml_alias_bomb_is_one_short_error(tmp_path: Path, key: str) -> None:
    """The values are shared, never walked or printed whole: each problem names its key and shows
    a short excerpt of the value."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _alias_bomb(key)))
    assert len(str(info.value)) < 4000
    assert all(len(p) < 300 for p in info.value.problems)
    assert any(p.startswith("anchors: unknown key") for p in info.value.problems)


def test_deeply_nested_yaml_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(_write(tmp_path, "run_name: " + "[" * 100_000 + "]" * 100_000 + "\n"))
    with pytest.raises(ConfigError, match="run_name: the value is nested too deeply"):
        load_config(None, ["run_name=" + "[" * 100_000 + "]" * 100_000])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.device=quantum", "train.device: must be auto, cpu, mps, cuda or cuda:N"),
        ("train.device=cuda:x", "train.device"),
        ("train.adam_betas=[2, -1]", "train.adam_betas.0: must be in [0, 1), got 2.0"),
        ("train.adam_betas=[0.9, .nan]", "train.adam_betas.1"),
        ("train.weight_decay=.inf", "train.weight_decay: must be a finite number"),
        ("train.max_grad_norm=-1", "train.max_grad_norm"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio"),
        ("train.lora.alpha=0", "train.lora.alpha"),
        ("train.lora.dropout=1", "train.lora.dropout"),
        ("train={carry_optimizer: true, lora: {r: 8}}", "train.carry_optimizer: needs full fine-tuning"),
        ("train={carry_optimizer: true, init: base}", "train.carry_optimizer: carries M(t-1)'s moments"),
        ("loss.nll_weight=.nan", "loss.nll_weight"),
        ("data.sources.0.name=" + "n" * 101, "data.sources.0.name: 1-100 printable characters"),
        ("tracking.experiment=" + "e" * 201, "tracking.experiment: 1-200 printable characters"),
    ],
)
def test_settings_types_accept_but_values_do_not(override: str, message: str) -> None:
    """Values that pass the types but would fail later (after M0 is registered, or in MLflow's
    limits) are refused at load, each naming its key; the message stays short."""
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "recipes" / "default.yaml", [override])
    assert message in str(info.value)
    assert len(str(info.value)) < 400


def test_devices_torch_knows_are_accepted() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert load_config(REPO / "recipes" / "default.yaml", [f"train.device={device}"]).train.device == device


def test_packed_rows_refuse_compile_with_checkpointing() -> None:
    with pytest.raises(ConfigError, match="packed rows with both train.compile and train.gradient_checkpointing"):
        load_config(
            REPO / "recipes" / "default.yaml",
            ["train.shared_prompt=packed", "train.compile=true", "train.gradient_checkpointing=true"],
        )
    for pair in (["train.compile=true"], ["train.gradient_checkpointing=true"]):
        cfg = load_config(REPO / "recipes" / "default.yaml", ["train.shared_prompt=packed", *pair])
        assert cfg.train.shared_prompt == "packed"
