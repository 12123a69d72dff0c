"""lm-evaluation-harness scores of a step model, logged to the step's MLflow run."""

from __future__ import annotations

from typing import Any

from sdpo_core.config import RunConfig


def log_harness(cfg: RunConfig, ctx: Any, model_dir: str, run_id: str, step: int) -> dict[str, float]:
    """Run ``evaluate.harness`` on a step model where it trained (a GPU worker for a deployment
    run) and log the scores as the step run's metrics ``harness/<task>/<metric>`` at optimizer
    step ``step``; returns them (none when the harness is off).

    An adapter step model (``train.lora.registered_as: adapter``) is merged into its base first.
    """
    from sdpo_core.harness import enabled, harness_scores
    from sdpo_core.model_io import resolve_device
    from tasks import tracking

    if not enabled(cfg):
        return {}
    full = tracking.full_model_dir(ctx.tracking_uri, model_dir, ctx.model_cache, ctx.s3)
    device = str(resolve_device(cfg.train.device))
    scores = harness_scores(full, cfg.evaluate.harness, device)
    if scores:
        tracking.log_metrics(tracking.client(ctx.tracking_uri), run_id, scores, step)
    return scores
