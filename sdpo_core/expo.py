"""ExPO, model extrapolation (Zheng et al., "Weak-to-Strong Extrapolation Expedites Alignment",
arXiv 2404.16792): theta = theta_T + alpha * (theta_T - theta_0), a step further along the
direction alignment moved the weights, with alpha chosen on validation pairs.

The registry keeps theta_0 (M0) and theta_T (an arm's final model), so the candidates cost one
weight sum each and no training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def extrapolate(final: dict[str, torch.Tensor], base: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """theta_T + alpha * (theta_T - theta_0), tensor by tensor, computed in float32 and returned
    in each tensor's own dtype. Integer buffers (none in a Llama) are kept from theta_T.

    Raises:
        ValueError: the two state dicts do not hold the same tensors and shapes.
    """
    if final.keys() != base.keys():
        raise ValueError(
            f"ExPO needs two models of one architecture: keys differ ({sorted(final.keys() ^ base.keys())[:3]})"
        )
    out = {}
    for name, t in final.items():
        b = base[name]
        if t.shape != b.shape:
            raise ValueError(f"ExPO: {name} has shape {tuple(t.shape)} in the final model and {tuple(b.shape)} in M0")
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        moved = t.float() + alpha * (t.float() - b.float())
        out[name] = moved.to(t.dtype)
    return out


def choose_alpha(alphas: Sequence[float], scores: Sequence[float]) -> float:
    """The alpha with the best validation score; ties go to the smaller alpha (the smaller step
    away from the trained model)."""
    if not alphas or len(alphas) != len(scores):
        raise ValueError(f"{len(alphas)} alphas for {len(scores)} validation scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"validation scores must be finite, got {list(scores)}")
    best = max(scores)
    return min(a for a, s in zip(alphas, scores, strict=True) if s == best)


def validation_mask(prompt_keys: Sequence[str], fraction: float) -> np.ndarray:
    """Which eval pairs go to validation (True) and which stay for the comparison: by prompt, so
    no prompt is on both sides, and deterministic (the prompt id's leading hex digits)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    return np.asarray([int(k[:8], 16) / 0x1_0000_0000 < fraction for k in prompt_keys], dtype=bool)
