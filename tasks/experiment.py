"""Tasks of an experiment: score the arms' models, read their loss curves, and write, log and
publish the comparison (comparison.json, comparison.md, PNG plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from sdpo_core.config import RunConfig
from sdpo_core.files import atomic_write_text
from tasks.context import RunContext
from tasks.retries import IO_TASK
from tasks.tracking import version_uri


@task(name="loss-curves", task_run_name="loss-curves-step-{step}", **IO_TASK)
def loss_curves(ctx: RunContext, versions: dict[str, str], step: int) -> dict[str, list[tuple[int, float]]]:
    """The training-loss history of each labelled registered version's step run, from MLflow."""
    from tasks import tracking

    c = tracking.client(ctx.tracking_uri)
    curves = {}
    for label, version in versions.items():
        run_id = c.get_model_version(ctx.model_name, version).run_id
        history = c.get_metric_history(run_id, "train/loss")
        curves[label] = sorted((int(m.step), float(m.value)) for m in history)
    return curves


def source_outcomes(cfg: RunConfig, ctx: RunContext, m0_uri: str, train_path: str) -> dict[str, np.ndarray]:
    """M0's preference (gamma > 0, as 0/1) per training pair, grouped by source."""
    from sdpo_core.data import read_pairs
    from sdpo_core.evaluate import gamma
    from sdpo_core.scores import load_scores
    from tasks.training import reference_logps

    scores = load_scores(reference_logps(cfg, ctx, m0_uri, train_path, "train"))
    wins = (gamma(scores, cfg.partition.accuracy) > 0).double().numpy()
    by_source: dict[str, list[float]] = {}
    for pair, win in zip(read_pairs(Path(train_path)), wins, strict=True):
        by_source.setdefault(pair.source, []).append(float(win))
    return {s: np.asarray(v) for s, v in by_source.items()}


@task(name="publish-comparison", task_run_name="publish-comparison", **IO_TASK)
def publish_comparison(ctx: RunContext, comparison: dict[str, Any], curves: dict[str, list], step: int) -> list[str]:
    """Write comparison.json, comparison.md and the plots under the experiment's folder; log them
    to the experiment's parent run (the flow adds the Prefect artifacts,
    :func:`comparison_artifacts`). Returns the paths."""
    from sdpo_core import plots
    from sdpo_core.comparison import comparison_markdown
    from tasks import artifacts, tracking

    out = Path(ctx.run_dir) / "comparison"
    files = [
        atomic_write_text(out / "comparison.json", json.dumps(comparison, indent=2) + "\n"),
        atomic_write_text(out / "comparison.md", comparison_markdown(comparison)),
    ]
    c = comparison["comparison"]
    files.append(plots.arms_plot(c, out / "arms.png"))
    if comparison.get("gamma_matrix"):
        files.append(plots.gamma_matrix_plot(comparison["gamma_matrix"], out / "gamma_matrix.png"))
    if any(curves.values()):
        files.append(plots.loss_overlay_plot(curves, out / f"step{step}_loss.png", step))
    if any("gold_win_rate" in a for a in c["arms"].values()):
        files.append(plots.win_rate_plot(c, out / "gold_win_rate.png"))
    client = tracking.client(ctx.tracking_uri)
    for path in files:
        artifacts.log_artifact(client, ctx.parent_run_id, path, ctx.s3)
    # The headline numbers as metrics of the parent run, so MLflow can chart and compare them.
    metrics = {f"{arm}/{m}": v["mean"] for arm, values in c["arms"].items() for m, v in values.items()}
    tracking.log_metrics(client, ctx.parent_run_id, metrics, 0)
    get_run_logger().info("comparison written to %s and logged to MLflow run %s", out, ctx.parent_run_id)
    return [str(p) for p in files]


@task(name="sample-model", task_run_name="sample-{what}-under-{model_uri}", **IO_TASK)
def sample_model(
    cfg: RunConfig,
    ctx: RunContext,
    model_uri: str,
    prompts: list[str],
    n: int,
    max_new_tokens: int,
    seed: int,
    what: str,
) -> str:
    """Sample ``n`` completions per prompt from a registered model with fixed seeds
    (sdpo_core.sampling); write them as pairs whose chosen and rejected are both the sample, so
    the pipeline's scoring gives their log-probs under any model. Cached by model and settings."""
    from sdpo_core.fingerprint import model_fingerprint
    from sdpo_core.hashing import sha256_json
    from sdpo_core.model_io import load_model, load_tokenizer
    from sdpo_core.pairs import PreferencePair, write_pairs
    from sdpo_core.sampling import sample_completions
    from tasks.tracking import fetch_for

    model_dir, _ = fetch_for(ctx, model_uri)
    settings = {"prompts": prompts, "n": n, "max_new_tokens": max_new_tokens, "seed": seed}
    key = sha256_json({"model": model_fingerprint(model_dir), **settings})[:24]
    path = Path(ctx.root) / "samples" / f"{key}.jsonl"
    if path.is_file():
        return str(path)
    model = load_model(cfg.model, model_dir).eval()
    tokenizer = load_tokenizer(cfg.model, model_dir)
    samples = sample_completions(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, seed=seed)
    pairs = [
        # An empty sample (the model stopped at once) is scored as one space: a completion needs a token.
        PreferencePair(prompt, text or " ", text or " ", f"sample-{j}")
        for prompt, texts in zip(prompts, samples, strict=True)
        for j, text in enumerate(texts)
    ]
    write_pairs(pairs, path)
    return str(path)


def read_samples(path: str, n: int) -> list[list[str]]:
    """The samples of :func:`sample_model`, ``n`` per prompt, in prompt order."""
    from sdpo_core.data import read_pairs

    texts = [p.chosen for p in read_pairs(Path(path))]
    return [texts[i : i + n] for i in range(0, len(texts), n)]


def sampled_kl(cfg: RunConfig, ctx: RunContext, model_uri: str, m0_uri: str, samples_path: str, n: int) -> np.ndarray:
    """Per prompt, the mean over the model's own samples of log pi_t(y|x) - log pi_0(y|x): an
    unbiased estimate of KL(pi_t || pi_0) per completion (in nats), on the re-tokenized samples."""
    from sdpo_core.scores import load_scores
    from tasks.training import reference_logps

    policy = load_scores(reference_logps(cfg, ctx, model_uri, samples_path, "samples"))["chosen"]
    base = load_scores(reference_logps(cfg, ctx, m0_uri, samples_path, "samples"))["chosen"]
    return (policy - base).double().numpy().reshape(-1, n).mean(axis=1)


def gold_outcomes(policy_path: str, base_path: str, n: int) -> np.ndarray:
    """Per prompt, the model's gold-reward win rate against M0 over its samples (ties 1/2)."""
    from sdpo_core.gold import gold_win_rate

    policy, base = read_samples(policy_path, n), read_samples(base_path, n)
    return np.asarray([np.mean(gold_win_rate(p, b)) for p, b in zip(policy, base, strict=True)])


@task(name="expo", task_run_name="expo-{name}", **IO_TASK)
def expo_model(
    cfg: RunConfig,
    ctx: RunContext,
    name: str,
    final_version: str,
    m0_version: str,
    alphas: list[float],
    validation: list[int],
    eval_path: str,
) -> dict[str, Any]:
    """ExPO on one final model: score each alpha's extrapolated model on the validation pairs
    (implicit-reward accuracy against M0), register the best as its own version with lineage
    tags, and return ``{"version", "alpha", "validation": {alpha: accuracy}}``.

    A rerun finds the version registered before under the same tags and registers none.
    """
    from sdpo_core.comparison import pair_outcomes
    from sdpo_core.expo import choose_alpha, extrapolate
    from sdpo_core.fingerprint import record_fingerprint
    from sdpo_core.model_io import load_model, load_tokenizer, save_model
    from sdpo_core.scores import load_scores
    from tasks import tracking
    from tasks.scores import cached_scores
    from tasks.tracking import fetch_for

    c = tracking.client(ctx.tracking_uri)
    final_dir, _ = fetch_for(ctx, version_uri(ctx.model_name, final_version))
    m0_dir, _ = fetch_for(ctx, version_uri(ctx.model_name, m0_version))
    m0_eval = load_scores(cached_scores(cfg, ctx, m0_dir, eval_path)[0])
    final_model = load_model(cfg.model, final_dir)
    final_state = {k: v.clone() for k, v in final_model.state_dict().items()}
    base_state = load_model(cfg.model, m0_dir).state_dict()
    tokenizer = load_tokenizer(cfg.model, final_dir)
    folders, accuracy = {}, {}
    for alpha in alphas:
        folder = Path(ctx.run_dir) / "expo" / name / f"alpha-{alpha:g}"
        final_model.load_state_dict(extrapolate(final_state, base_state, alpha))
        meta = {"expo_alpha": alpha, "expo_from_version": final_version, "expo_base_version": m0_version}
        record_fingerprint(save_model(final_model, tokenizer, folder, meta))
        scores = load_scores(cached_scores(cfg, ctx, str(folder), eval_path)[0])
        wins = pair_outcomes(scores, m0_eval, cfg.loss.beta)["reward_accuracy_vs_m0"]
        folders[alpha], accuracy[alpha] = folder, float(wins[validation].mean())
    alpha = choose_alpha(list(accuracy), list(accuracy.values()))
    tags = {
        "sdpo.step": "expo",
        "sdpo.run": name,
        "sdpo.expo_alpha": repr(alpha),
        "sdpo.expo_from_version": final_version,
        "sdpo.reference_version": m0_version,
    }
    found = tracking.find_version(c, ctx.model_name, tags)
    if found is not None:
        return {"version": str(found.version), "alpha": alpha, "validation": accuracy}
    run_id = tracking.start_run(c, ctx.experiment_id, name, parent_id=ctx.parent_run_id, tags={"sdpo.step": "expo"})
    tracking.log_params(c, run_id, {"expo.alpha": repr(alpha), "expo.from_version": final_version})
    tracking.log_metrics(c, run_id, {f"validation/reward_accuracy_alpha_{a:g}": v for a, v in accuracy.items()}, 0)
    tags["sdpo.parent_run_id"] = ctx.parent_run_id
    version = tracking.register(c, ctx.model_name, run_id, str(folders[alpha]), tags, access=ctx.s3)
    c.set_terminated(run_id)
    return {"version": version, "alpha": alpha, "validation": accuracy}


def comparison_artifacts(comparison: dict[str, Any]) -> None:
    """The comparison as a Markdown and a table artifact of the experiment's flow run (called in
    the flow's body, so that they belong to the flow run, not to a task run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from sdpo_core.comparison import comparison_markdown

    create_markdown_artifact(comparison_markdown(comparison), key="experiment-comparison")
    rows = [
        {"arm": arm, "metric": m, "mean": v["mean"], "low": v["low"], "high": v["high"]}
        for arm, values in comparison["comparison"]["arms"].items()
        for m, v in values.items()
    ]
    create_table_artifact(rows, key="experiment-arms")
