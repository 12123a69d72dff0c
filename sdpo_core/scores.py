"""Forward-only log-probs of a pairs file under a model, and their cache key.

A scores file is safetensors with ``chosen``, ``rejected``, ``chosen_tokens`` and
``rejected_tokens``, each (N,), in the pairs file's order. The key names everything the numbers
depend on: the model's weights, the file's bytes, the tokenization limits and the dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdpo_core.config import RunConfig
from sdpo_core.evaluate import Scores
from sdpo_core.files import atomic_path
from sdpo_core.hashing import sha256_file, sha256_json
from sdpo_core.logprobs import score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id, resolve_device
from sdpo_core.precision import resolve_precision
from sdpo_core.tokenization import tokenized_file
from sdpo_core.train import for_device


def scores_key(cfg: RunConfig, fingerprint: str, pairs_path: str | Path) -> str:
    """Cache key of a model's scores of a data file: model, data and tokenization settings."""
    parts = {
        "model": fingerprint,
        "data": sha256_file(pairs_path),
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "dtype": cfg.model.dtype,
    }
    if cfg.train.precision != "auto":  # auto follows model.dtype, already in the key
        parts["precision"] = cfg.train.precision
    if cfg.train.compile:  # compiled kernels round otherwise (bf16): scores made to match the policy's
        parts["compile"] = True
    return sha256_json(parts)[:24]


def save_scores(scores: Scores, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp))
    return Path(path)


def load_scores(path: str | Path) -> Scores:
    return load_file(str(path))


def score_model(
    cfg: RunConfig, model_dir: str, pairs_path: str | Path, progress: Callable[[int, int], None] | None = None
) -> Scores:
    """Every pair of a JSON-lines file scored by the model in ``model_dir`` (forward only);
    ``progress(done, total)`` hears of each batch scored."""
    device = resolve_device(cfg.train.device)
    # The precision the policy trains in: with the same weights, h = 0 at the start of a step.
    precision = resolve_precision(cfg.train, cfg.model, device)
    tokenizer = load_tokenizer(cfg.model, model_dir)
    model = load_model(cfg.model, model_dir, device, precision.master)
    pairs = tokenized_file(pairs_path, tokenizer, cfg.data)
    train = for_device(cfg.train, device)
    with precision.autocast(device):
        return score_pairs(
            model,
            pairs,
            pad_id(tokenizer),
            train.eval_batch_size,
            train.logprob_chunk_rows,
            device,
            train.shared_prompt,
            progress,
            max_tokens=train.score_pass_tokens,
            row_tokens=train.packed_row_tokens,
            compiled=train.compile,
        )


def mean_scores(all_scores: list[Scores]) -> Scores:
    """The mean log-probs of several models on the same pairs (a multi-reference loss's
    reference, ``loss.reference: mean``); token counts are the pairs', the same under each model.

    Raises:
        ValueError: no scores, or scores of different pairs (other lengths or token counts).
    """
    if not all_scores:
        raise ValueError("mean_scores needs at least one model's scores")
    first = all_scores[0]
    for other in all_scores[1:]:
        for key in ("chosen_tokens", "rejected_tokens"):
            if other[key].shape != first[key].shape or not torch.equal(other[key], first[key]):
                raise ValueError(f"mean_scores: the models' scores are of different pairs ({key} differ)")
    out = {k: v.clone() for k, v in first.items()}
    for key in ("chosen", "rejected"):
        out[key] = torch.stack([s[key].double() for s in all_scores]).mean(0).to(first[key].dtype)
    return out
