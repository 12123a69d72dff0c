"""The experiment flow: does stepwise help? Arms of sDPO and its controls, each run with several
seeds as pipeline subflows on one shared data preparation and one M0, then compared on the shared
eval split with paired bootstrap intervals (sDPO, arXiv 2403.19270: Tables 2 and 3, Figs. 2 and 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow
from prefect.runtime import flow_run

from flows.pipeline import PipelineResult, sdpo_pipeline
from sdpo_core.config import RunConfig
from sdpo_core.experiment_config import ExperimentConfig
from sdpo_core.records import PreparedData
from tasks import tracking
from tasks.blocks import read_access
from tasks.context import RunContext
from tasks.data import prepare_data
from tasks.registry import open_tracking
from tasks.tracking import version_uri
from tasks.workspace import run_folder, within, workspace_root

LOSS_STEP = 2
"""The step whose training-loss curves are overlaid (the paper's Fig. 3 shows step 2)."""


@dataclass(frozen=True)
class ExperimentResult:
    """Where the comparison is, and the arms' pipeline results by arm and seed."""

    comparison: dict[str, Any]
    markdown: str
    run_dir: str
    files: list[str]
    parent_run_id: str
    arms: dict[str, dict[int, PipelineResult]]


def _flow_run_name() -> str:
    config = flow_run.get_parameters().get("config")
    name = config.name if isinstance(config, ExperimentConfig) else (config or {}).get("name", "experiment")
    return f"experiment-{name}"


def base_config(exp: ExperimentConfig) -> RunConfig:
    """The config the shared steps use (data preparation, M0, scoring): the first arm's, named
    after the experiment. Every arm shares its model and data settings (checked at load)."""
    cfg = exp.arm_config(exp.arms[0], exp.seeds[0])
    return cfg.model_copy(update={"run_name": exp.name})


def run_arms(
    exp: ExperimentConfig, root: Path, prepared: PreparedData, parent_run_id: str
) -> dict[str, dict[int, PipelineResult]]:
    """Every arm with every seed, as pipeline subflows nested under the experiment's MLflow run.

    Each run is named ``<experiment>-<arm>-s<seed>``, so a rerun of the experiment finds its
    finished steps registered and reuses them (the pipeline's own reuse rule).
    """
    results: dict[str, dict[int, PipelineResult]] = {}
    for arm in exp.arms:
        results[arm.name] = {}
        for seed in exp.seeds:
            sizes = None
            if arm.sizes_from is not None:  # the same chunk sizes as an earlier arm (its first seed)
                sizes = tuple(row["pairs"] for row in results[arm.sizes_from][exp.seeds[0]].rows)
            cfg = exp.arm_config(arm, seed, sizes)
            run_dir = str(run_folder(root, cfg.run_name))
            results[arm.name][seed] = sdpo_pipeline(
                config=cfg, prepared=prepared, parent_run_id=parent_run_id, run_dir=run_dir
            )
    return results


def comparison_pairs(exp: ExperimentConfig, prepared: PreparedData) -> tuple[np.ndarray, list[int]]:
    """Which eval pairs the arms are compared on (a bool mask) and the validation pairs' indices:
    with an ExPO arm, a share of the eval prompts is set apart to choose its alpha."""
    from sdpo_core.data import read_pairs
    from sdpo_core.expo import validation_mask

    keys = [p.prompt_key for p in read_pairs(Path(prepared.eval_path))]
    if exp.expo is None:
        return np.ones(len(keys), dtype=bool), []
    validation = validation_mask(keys, exp.expo.validation_fraction)
    if validation.all() or not validation.any():
        from sdpo_core.config_rules import ConfigError

        raise ConfigError([f"expo.validation_fraction: leaves no pairs on one side of the {len(keys)} eval pairs"])
    return ~validation, [int(i) for i in np.flatnonzero(validation)]


def run_expo(
    exp: ExperimentConfig,
    cfg: RunConfig,
    ctx: RunContext,
    prepared: PreparedData,
    results: dict[str, dict[int, PipelineResult]],
    validation: list[int],
) -> dict[int, PipelineResult]:
    """The ExPO arm: each seed's final model of ``expo.from_arm`` extrapolated from M0, alpha
    chosen on the validation pairs, registered as its own version. Its budget is its source's."""
    import dataclasses

    from tasks.experiment import expo_model

    assert exp.expo is not None
    out = {}
    for seed, res in results[exp.expo.from_arm].items():
        chosen = expo_model(
            cfg, ctx, f"{exp.name}-expo-s{seed}", res.rows[-1]["version"], res.m0_version,
            list(exp.expo.alphas), validation, prepared.eval_path,
        )  # fmt: skip
        row = res.rows[-1] | {"version": chosen["version"], "chunk": f"expo alpha {chosen['alpha']:g}", "expo": chosen}
        out[seed] = dataclasses.replace(res, rows=[*res.rows[:-1], row])
    return out


def budgets(exp: ExperimentConfig, results: dict[str, dict[int, PipelineResult]]) -> dict[str, dict[str, Any]]:
    """Pairs trained and optimizer steps per arm (the same for each of its seeds, or listed)."""
    out = {}
    for arm, by_seed in results.items():
        pairs = {sum(r["pairs"] for r in res.rows) for res in by_seed.values()}
        steps = {sum(r["optimizer_steps"] for r in res.rows) for res in by_seed.values()}
        out[arm] = {
            "seeds": len(by_seed),
            "steps": len(next(iter(by_seed.values())).rows),
            "pairs": pairs.pop() if len(pairs) == 1 else sorted(pairs),
            "optimizer_steps": steps.pop() if len(steps) == 1 else sorted(steps),
        }
    return out


def compare(
    exp: ExperimentConfig,
    cfg: RunConfig,
    ctx: RunContext,
    prepared: PreparedData,
    results: dict[str, dict[int, PipelineResult]],
) -> tuple[dict[str, Any], dict[str, list]]:
    """The comparison record (comparison.json) and the step-2 loss curves."""
    from sdpo_core.comparison import compare_arms, gamma_matrix, pair_outcomes, source_order_report
    from sdpo_core.scores import load_scores
    from tasks.experiment import loss_curves, source_outcomes
    from tasks.training import reference_logps

    e = exp.evaluation
    first = exp.seeds[0]
    m0_version = next(iter(next(iter(results.values())).values())).m0_version
    m0_uri = version_uri(ctx.model_name, m0_version)

    def scores(uri: str, path: str, what: str) -> dict:
        return load_scores(reference_logps(cfg, ctx, uri, path, what))

    keep, _ = comparison_pairs(exp, prepared)
    m0_eval = scores(m0_uri, prepared.eval_path, "eval")
    outcomes: dict[str, dict[str, np.ndarray]] = {}
    for arm, by_seed in results.items():
        per_seed = [
            pair_outcomes(scores(version_uri(ctx.model_name, res.rows[-1]["version"]), prepared.eval_path, "eval"),
                          m0_eval, cfg.loss.beta)
            for res in by_seed.values()
        ]  # fmt: skip
        outcomes[arm] = {m: np.stack([o[m][keep] for o in per_seed]) for m in per_seed[0]}

    sampled = sampled_outcomes(exp, cfg, ctx, prepared, results, m0_uri, keep)
    for arm, metrics in sampled.items():
        outcomes[arm] |= metrics

    # Fig. 2 done so that rows compare: every model of each arm's first seed on the same columns,
    # the chunks of the compared-to arm (by source) and the eval split.
    reference_run = results[exp.compare_to][first]
    columns = {row["chunk"]: str(Path(reference_run.run_dir) / "chunks" / f"step-{row['step']}.jsonl")
               for row in reference_run.rows} | {"eval": prepared.eval_path}  # fmt: skip
    models = {"M0": m0_uri} | {
        f"{arm} M{row['step']}": version_uri(ctx.model_name, row["version"])
        for arm, by_seed in results.items()
        for row in by_seed[first].rows
        if arm != "expo" or row is by_seed[first].rows[-1]  # ExPO adds only its final model
    }
    matrix = gamma_matrix(
        {label: {col: scores(uri, path, col) for col, path in columns.items()} for label, uri in models.items()}
    )

    # Fig. 3: the step-2 loss of the compared-to arm and of every arm starting from M0.
    init = {arm.name: exp.arm_config(arm, first).train.init for arm in exp.arms}
    overlay = {
        f"{name} (init {init[name]})": results[name][first].rows[LOSS_STEP - 1]["version"]
        for name in init
        if len(results[name][first].rows) >= LOSS_STEP and (name == exp.compare_to or init[name] == "base")
    }
    curves = loss_curves(ctx, overlay, LOSS_STEP) if overlay else {}

    order = [row["chunk"] for row in reference_run.rows]
    by_source = source_outcomes(cfg, ctx, m0_uri, prepared.train_path)
    stats = {"replicates": e.replicates, "confidence": e.confidence, "seed": e.seed}
    comparison = {
        "name": exp.name,
        "seeds": list(exp.seeds),
        "eval_pairs": int(keep.sum()),
        "validation_pairs": int((~keep).sum()),
        "expo": {str(seed): res.rows[-1]["expo"] for seed, res in results.get("expo", {}).items()},
        "budgets": budgets(exp, results),
        "comparison": compare_arms(outcomes, exp.compare_to, **stats),
        "gamma_matrix": matrix,
        "gamma_matrix_models": "each arm's models of seed " + str(first),
        "source_order": source_order_report(by_source, [s for s in order if s in by_source], **stats)
        if all(s in by_source for s in order)
        else None,
        "runs": {
            arm: {str(seed): res.parent_run_id for seed, res in by_seed.items()} for arm, by_seed in results.items()
        },
        "final_versions": {
            arm: {str(seed): res.rows[-1]["version"] for seed, res in by_seed.items()}
            for arm, by_seed in results.items()
        },
    }
    return comparison, curves


def sampled_outcomes(
    exp: ExperimentConfig,
    cfg: RunConfig,
    ctx: RunContext,
    prepared: PreparedData,
    results: dict[str, dict[int, PipelineResult]],
    m0_uri: str,
    keep: np.ndarray,
) -> dict[str, dict[str, np.ndarray]]:
    """Per arm, (seeds, prompts) each: the sampled KL(pi_t || pi_0) on held-out prompts, and the
    gold-reward win rate against M0 when the recipe names gold prompts."""
    from sdpo_core.data import read_pairs
    from sdpo_core.experiment_config import read_gold_prompts
    from sdpo_core.generations import eval_prompts
    from tasks.experiment import gold_outcomes, sample_model, sampled_kl

    e = exp.evaluation
    out: dict[str, dict[str, list[np.ndarray]]] = {arm: {} for arm in results}
    # The compared pairs only: the prompts set apart for ExPO's alpha are not sampled.
    compared = [pair for pair, kept in zip(read_pairs(Path(prepared.eval_path)), keep, strict=True) if kept]
    kl_prompts = eval_prompts(compared, e.kl_prompts) if e.kl_prompts else []
    if not all(isinstance(p, str) for p in kl_prompts):
        kl_prompts = []  # conversational prompts: sampling takes plain text (no KL then)
    gold_prompts = read_gold_prompts(e.gold_prompts) if e.gold_prompts else []
    m0_gold = (
        sample_model(cfg, ctx, m0_uri, gold_prompts, e.gold_samples, e.max_new_tokens, e.seed, "gold")
        if gold_prompts
        else None
    )
    for arm, by_seed in results.items():
        for res in by_seed.values():
            uri = version_uri(ctx.model_name, res.rows[-1]["version"])
            if kl_prompts:
                own = sample_model(cfg, ctx, uri, kl_prompts, e.kl_samples, e.max_new_tokens, e.seed, "kl")
                kl = sampled_kl(cfg, ctx, uri, m0_uri, own, e.kl_samples)
                out[arm].setdefault("kl_vs_m0", []).append(kl)
            if m0_gold is not None:
                gold = sample_model(cfg, ctx, uri, gold_prompts, e.gold_samples, e.max_new_tokens, e.seed, "gold")
                out[arm].setdefault("gold_win_rate", []).append(gold_outcomes(gold, m0_gold, e.gold_samples))
    return {arm: {m: np.stack(v) for m, v in metrics.items()} for arm, metrics in out.items()}


def run_experiment(
    exp: ExperimentConfig, root: Path, prepared: PreparedData | None, run_dir: str | None
) -> ExperimentResult:
    """Prepare once, run the arms, compare, publish (called inside the flow)."""
    from sdpo_core.comparison import comparison_markdown
    from tasks.experiment import comparison_artifacts, publish_comparison

    cfg = base_config(exp)
    folder = str(within(root / "runs", Path(run_dir) if run_dir else run_folder(root, exp.name)))
    if prepared is None:
        prepared = prepare_data(cfg, folder)
    access = read_access(cfg.storage.credentials_block)
    ctx = open_tracking(cfg, str(root), folder, prepared, access)
    c = tracking.client(ctx.tracking_uri)
    c.set_tag(ctx.parent_run_id, "sdpo.experiment", exp.name)
    tracking.log_yaml(c, ctx.parent_run_id, exp.model_dump(mode="json"), "experiment.yaml", Path(folder), access)
    try:
        results = run_arms(exp, root, prepared, ctx.parent_run_id)
        if exp.expo is not None:
            results["expo"] = run_expo(exp, cfg, ctx, prepared, results, comparison_pairs(exp, prepared)[1])
        comparison, curves = compare(exp, cfg, ctx, prepared, results)
        files = publish_comparison(ctx, comparison, curves, LOSS_STEP)
        comparison_artifacts(comparison)
    except BaseException:
        c.set_terminated(ctx.parent_run_id, "FAILED")
        raise
    c.set_terminated(ctx.parent_run_id)
    return ExperimentResult(comparison, comparison_markdown(comparison), folder, files, ctx.parent_run_id, results)


@flow(name="sdpo_experiment", flow_run_name=_flow_run_name, validate_parameters=True)
def sdpo_experiment(
    config: ExperimentConfig, prepared: PreparedData | None = None, run_dir: str | None = None
) -> ExperimentResult:
    """Does stepwise help? Every arm with every seed on one shared preparation, then compared.

    Args:
        config: the experiment: the pipeline config, the seeds and the arms.
        prepared: data already prepared for the arms' shared model and data settings (the CLI's
            early check); None prepares it here.
        run_dir: the experiment's folder under the workspace; None makes a new one.
    """
    from sdpo_core.redact import redact_run_logs

    redact_run_logs()  # log lines printed or stored by Prefect pass through the one redaction
    return run_experiment(config, workspace_root(), prepared, run_dir)
