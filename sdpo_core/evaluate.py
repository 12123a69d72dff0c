"""Metrics on scored pairs: gamma, reward accuracy and margins.

A score dict holds per-pair ``chosen`` and ``rejected`` summed completion log-probs and their
token counts, each (N,), as returned by :func:`sdpo_core.logprobs.score_pairs`.
"""

from __future__ import annotations

import torch

Scores = dict[str, torch.Tensor]


def gamma(scores: Scores, form: str = "sum") -> torch.Tensor:
    """gamma_m = log m(y_w|x) - log m(y_l|x) per pair, (N,).

    ``form="mean"`` uses mean per-token log-probs (length-normalised) instead of sums.
    """
    if form == "mean":
        return scores["chosen"] / scores["chosen_tokens"].clamp(min=1) - scores["rejected"] / scores[
            "rejected_tokens"
        ].clamp(min=1)
    if form == "sum":
        return scores["chosen"] - scores["rejected"]
    raise ValueError(f"unknown gamma form {form!r}; known: sum, mean")


def self_reward_accuracy(scores: Scores, form: str = "sum") -> float:
    """A model's reward accuracy against itself: the share of pairs with gamma > 0.

    The implicit DPO reward of M0 against M0 is zero, so the paper's "reward accuracy of the
    initial model" (sDPO section 3.2) is read as the share of pairs M0 already prefers.
    """
    g = gamma(scores, form)
    return float((g > 0).float().mean()) if len(g) else float("nan")


def preference_metrics(policy: Scores, ref: Scores, beta: float) -> dict[str, float]:
    """Implicit-reward metrics of a policy against a reference on the same pairs.

    Returns reward accuracy (share of pairs whose chosen reward beats the rejected one), the mean
    reward margin beta * (gamma_policy - gamma_ref), and the mean gamma of the policy.
    """
    r_chosen = beta * (policy["chosen"] - ref["chosen"])
    r_rejected = beta * (policy["rejected"] - ref["rejected"])
    return {
        "reward_accuracy": float((r_chosen > r_rejected).float().mean()),
        "reward_margin": float((r_chosen - r_rejected).mean()),
        "gamma": float(gamma(policy).mean()),
    }


def step_metrics(mt: Scores, m0: Scores, prev: Scores, ref_chunk: Scores, beta: float) -> dict[str, float]:
    """Per-step metrics, all from scores.

    On the held-out split (``mt``, ``m0``, ``prev``): reward accuracy and mean margin of Mt with M0
    as the reference, the same with M(t-1) as the reference, Mt's mean gamma and M(t-1)'s. On the
    step's chunk (``ref_chunk``): the mean gamma of its reference M(t-1).
    """
    vs_m0 = preference_metrics(mt, m0, beta)
    vs_prev = preference_metrics(mt, prev, beta)
    return {
        "eval/reward_accuracy_vs_m0": vs_m0["reward_accuracy"],
        "eval/reward_margin_vs_m0": vs_m0["reward_margin"],
        "eval/reward_accuracy_vs_prev": vs_prev["reward_accuracy"],
        "eval/reward_margin_vs_prev": vs_prev["reward_margin"],
        "eval/gamma": vs_m0["gamma"],
        # The reference's mean gamma on the eval split: the same pairs at every step, so the rows
        # compare (the paper's Fig. 2 quantity on fixed data). On the step's own chunk (below) each
        # step sees other pairs, so that one does not compare across steps.
        "eval/ref_gamma": float(gamma(prev).mean()),
        "chunk/ref_gamma": float(gamma(ref_chunk).mean()),
    }
