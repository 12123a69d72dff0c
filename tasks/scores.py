"""The log-probs cache: one safetensors file per (model, pairs file, tokenization) under the
workspace's cache/logps, shared by runs, and in storage.uri when the run has one."""

from __future__ import annotations

from pathlib import Path

from sdpo_core.config import RunConfig
from sdpo_core.fingerprint import model_fingerprint, tokenizer_sha256
from sdpo_core.scores import save_scores, score_model, scores_key
from tasks.context import RunContext
from tasks.progress import Progress
from tasks.storage import fetch


def scores_path(cfg: RunConfig, ctx: RunContext, model_dir: str, pairs_path: str | Path) -> Path:
    """Where the cache keeps ``model_dir``'s scores of ``pairs_path``."""
    # The weights and the tokenizer: a new chat template over the same weights scores differently.
    model_id = f"{model_fingerprint(model_dir)}|{tokenizer_sha256(model_dir)}"
    return ctx.cache_dir / f"{scores_key(cfg, model_id, pairs_path)}.safetensors"


def cached_scores(cfg: RunConfig, ctx: RunContext, model_dir: str, pairs_path: str | Path) -> tuple[Path, bool]:
    """The scores file of a model and a pairs file, computed unless found here or in storage.

    Returns (path, computed): ``computed`` is True when this call wrote the file.
    """
    path = scores_path(cfg, ctx, model_dir, pairs_path)
    if fetch(ctx, path):
        return path, False
    # A progress artifact on the flow run moves as batches are scored (tasks.progress).
    progress = Progress(f"scoring {Path(pairs_path).name} under {Path(model_dir).name}")
    save_scores(score_model(cfg, model_dir, pairs_path, progress), path)
    return path, True
