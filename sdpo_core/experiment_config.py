"""An experiment: arms (pipeline configs), each run with several seeds on one shared preparation.

A recipe (``recipes/experiments/<name>.yaml``) names a pipeline recipe, the seeds and the arms;
each arm is a set of ``key.sub: value`` changes to the pipeline config. Every arm's config is
built and validated when the recipe loads, so a bad arm fails before anything runs. The arms
must not change the model or the data settings: they share one data preparation and one M0.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field, StrictInt, StrictStr, ValidationError

from sdpo_core.config import RunConfig, from_dict
from sdpo_core.config_rules import SAFE_NAME, ConfigError, describe_errors, shown
from sdpo_core.config_sections import Number, Section, one_line
from sdpo_core.overrides import apply_override


class ArmConfig(Section):
    """One arm: changes to the pipeline config, run once per seed."""

    name: StrictStr = Field(description="The arm's name (letters, digits, '.', '_', '-').")
    set: dict[StrictStr, Any] = Field(
        default_factory=dict,
        description="Pipeline settings of this arm, as dotted keys: {partition.strategy: random}.",
    )
    seed_keys: tuple[StrictStr, ...] = Field(
        ("train.seed",),
        description="Settings that take each seed's value (the random arm also reseeds partition.seed).",
    )
    sizes_from: StrictStr | None = Field(
        None,
        description=one_line("""An earlier arm whose chunk sizes this arm's partition.sizes copies (the random
        arm: chunks of the same sizes as sdpo's)."""),
    )
    description: StrictStr = Field("", description="What the arm tests, for the report.")


class EvaluationConfig(Section):
    """How the arms' final models are compared."""

    replicates: StrictInt = Field(2000, description="Bootstrap replicates for every interval.")
    confidence: Number = Field(0.95, description="Confidence level of the intervals.")
    kl_prompts: StrictInt = Field(
        32, description="Held-out prompts on which KL(pi_t || pi_0) is estimated from samples; 0 skips it."
    )
    kl_samples: StrictInt = Field(2, description="Samples per prompt for the KL estimate.")
    max_new_tokens: StrictInt = Field(48, description="Tokens sampled per completion (KL and gold reward).")
    gold_prompts: StrictStr | None = Field(
        None,
        description=one_line("""A JSONL file of held-out prompts ({"prompt": ...}) for the gold-reward win rate
        (sdpo_core.gold); None: no gold reward (a user's own data)."""),
    )
    gold_samples: StrictInt = Field(2, description="Samples per gold prompt, from each model and from M0.")
    seed: StrictInt = Field(0, description="Seed of the sampling and of the bootstrap.")


class ExpoConfig(Section):
    """ExPO (sdpo_core.expo): an extra arm extrapolating another arm's final models from M0."""

    from_arm: StrictStr = Field("sdpo", description="The arm whose final model of each seed is extrapolated.")
    alphas: tuple[Number, ...] = Field(
        (0.0, 0.25, 0.5, 1.0),
        description="Candidate alphas; the best on the validation pairs is registered (0 is the arm's own model).",
    )
    validation_fraction: Number = Field(
        0.5,
        description=one_line("""Share of the eval split's prompts set apart to choose alpha; every arm is then
        compared on the rest only, so alpha is never chosen on the pairs it is judged on."""),
    )


class ExperimentConfig(Section):
    """Arms of stepwise and plain DPO compared on one shared data preparation and one M0."""

    name: StrictStr = Field("experiment", description="The experiment's name (MLflow parent run, run folders).")
    pipeline: dict[StrictStr, Any] = Field(
        default_factory=dict, description="The pipeline config every arm starts from (a recipe's contents)."
    )
    seeds: tuple[StrictInt, ...] = Field((0, 1, 2), description="Seeds each arm is run with.")
    arms: tuple[ArmConfig, ...] = Field(description="The arms, run in this order.")
    compare_to: StrictStr = Field("sdpo", description="The arm every other arm is compared with.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="The comparison.")
    expo: ExpoConfig | None = Field(None, description="An ExPO arm (extrapolated models); None: none.")

    def arm(self, name: str) -> ArmConfig:
        return next(a for a in self.arms if a.name == name)

    def arm_config(self, arm: ArmConfig, seed: int, sizes: tuple[int, ...] | None = None) -> RunConfig:
        """The pipeline config of one arm and seed: run name ``<experiment>-<arm>-s<seed>``."""
        data = copy.deepcopy(self.pipeline)  # (deepcopy keeps YAML aliases shared: no blow-up)
        for key, value in arm.set.items():
            apply_override(data, key.split("."), value)
        for key in arm.seed_keys:
            apply_override(data, key.split("."), seed)
        if sizes is not None:
            apply_override(data, ["partition", "sizes"], list(sizes))
        data["run_name"] = f"{self.name}-{arm.name}-s{seed}"
        return from_dict(data, f"arm {arm.name!r}, seed {seed}")


def experiment_problems(exp: ExperimentConfig) -> list[str]:
    """What the types do not check: names, references between arms, and every arm's config."""
    problems: list[str] = []
    if not SAFE_NAME.fullmatch(exp.name):
        problems.append(f"name: letters, digits, '.', '_' and '-' only, got {shown(exp.name)}")
    if not exp.seeds:
        problems.append("seeds: at least one seed")
    if len(set(exp.seeds)) != len(exp.seeds):
        problems.append(f"seeds: each seed once, got {list(exp.seeds)}")
    names = [a.name for a in exp.arms]
    if not names:
        problems.append("arms: at least one arm")
    for i, arm in enumerate(exp.arms):
        if not SAFE_NAME.fullmatch(arm.name):
            problems.append(f"arms.{i}.name: letters, digits, '.', '_' and '-' only, got {shown(arm.name)}")
        if names.count(arm.name) > 1:
            problems.append(f"arms.{i}.name: {arm.name!r} is used by more than one arm")
        if arm.sizes_from is not None and arm.sizes_from not in names[:i]:
            problems.append(f"arms.{i}.sizes_from: {arm.sizes_from!r} is not an arm declared before {arm.name!r}")
    if exp.compare_to not in names:
        problems.append(f"compare_to: {exp.compare_to!r} is not an arm")
    e = exp.evaluation
    if e.replicates < 100:
        problems.append(f"evaluation.replicates: at least 100, got {e.replicates}")
    if not 0.5 <= e.confidence < 1:
        problems.append(f"evaluation.confidence: in [0.5, 1), got {e.confidence}")
    for key in ("kl_prompts", "kl_samples", "max_new_tokens", "gold_samples"):
        if getattr(e, key) < 0 or (key != "kl_prompts" and getattr(e, key) < 1):
            problems.append(f"evaluation.{key}: must be positive, got {getattr(e, key)}")
    if e.gold_prompts is not None:
        try:
            read_gold_prompts(e.gold_prompts)
        except ValueError as exc:
            problems.append(f"evaluation.gold_prompts: {exc}")
    if exp.expo is not None:
        if exp.expo.from_arm not in names:
            problems.append(f"expo.from_arm: {exp.expo.from_arm!r} is not an arm")
        if "expo" in names:
            problems.append("arms: 'expo' is the name of the ExPO arm (expo:); name the other arm differently")
        if not exp.expo.alphas or any(not (0 <= a <= 10) for a in exp.expo.alphas):
            problems.append(f"expo.alphas: one or more numbers in [0, 10], got {list(exp.expo.alphas)}")
        if not 0 < exp.expo.validation_fraction < 1:
            problems.append(f"expo.validation_fraction: in (0, 1), got {exp.expo.validation_fraction}")
    if problems:
        return problems
    data_hashes: dict[str, str] = {}
    for arm in exp.arms:
        try:
            # sizes_from arms get their sizes at run time; check them with equal chunks.
            cfg = exp.arm_config(arm, exp.seeds[0])
        except ConfigError as exc:
            problems += [f"arms.{names.index(arm.name)} ({arm.name}): {p}" for p in exc.problems]
            continue
        data_hashes[arm.name] = cfg.data_hash()
    if len(set(data_hashes.values())) > 1:
        problems.append(
            "arms: every arm must keep the model and data settings (they share one preparation and one "
            f"M0); these differ from {names[0]!r}: "
            + ", ".join(n for n, h in data_hashes.items() if h != data_hashes[names[0]])
        )
    return problems


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment recipe; ``pipeline_recipe: <path>`` names the pipeline recipe the
    ``pipeline`` mapping is applied on top of. Overrides (``key.sub=value``) apply to the
    experiment recipe (``pipeline.train.epochs=2``, ``seeds=[0]``)."""
    from sdpo_core.config import load_yaml_mapping
    from sdpo_core.overrides import parse_override

    origin = str(path)
    data = load_yaml_mapping(Path(path))
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
    recipe = data.pop("pipeline_recipe", None)
    if recipe is not None:
        if not isinstance(recipe, str):
            raise ConfigError([f"pipeline_recipe: a recipe path, got {shown(recipe)}"], origin)
        base = load_yaml_mapping(Path(recipe))
        for key, value in _dotted(data.get("pipeline") or {}):
            apply_override(base, key, value)
        data["pipeline"] = base
    try:
        exp = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, ExperimentConfig), origin) from None
    problems = experiment_problems(exp)
    if problems:
        raise ConfigError(problems, origin)
    return exp


def _dotted(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[list[str], Any]]:
    """Leaves of nested mappings as (key path, value), so a partial section overrides key by key."""
    out: list[tuple[list[str], Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _dotted(value, (*prefix, str(key)))
        else:
            out.append(([*prefix, str(key)], value))
    return out


def read_gold_prompts(path: str, limit: int = 100_000) -> list[str]:
    """The held-out prompts of a gold task: JSON lines, each ``{"prompt": "<text>"}``.

    Raises:
        ValueError: a missing file, or a line that is not such an object (naming the line).
    """
    import json

    if not Path(path).is_file():
        raise ValueError(f"file not found: {path}")
    prompts: list[str] = []
    with open(path, encoding="utf-8", errors="strict") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ValueError(f'{path}, line {i}: expected {{"prompt": "<text>"}}')
            prompts.append(row["prompt"])
            if len(prompts) > limit:
                raise ValueError(f"{path}: more than {limit} prompts")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
