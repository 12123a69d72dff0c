"""DPO-family losses as pure functions of per-sequence log-probabilities.

Every loss takes a :class:`PairLogps` (per-pair summed completion log-probs of the policy and of
the frozen reference, each of shape ``(B,)``) and a :class:`~sdpo_core.config.LossConfig`, and
returns per-pair losses of shape ``(B,)``; the caller reduces. With

    h = gamma_policy - gamma_ref,   gamma_m = log m(y_w|x) - log m(y_l|x)

the losses are (DPO, arXiv 2305.18290 eq. 7; IPO, arXiv 2310.12036 eq. 17; DPO-Positive,
arXiv 2402.13228 eq. 3):

- sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing)
- ipo:     (h - 1 / (2 beta))^2
- hinge:   max(0, 1 - beta h)
- dpop:    -log sigmoid(beta (h - lambda max(0, log ref(y_w|x) - log policy(y_w|x))))

A new variant is a new function added to :data:`LOSSES`, not a branch in an existing one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdpo_core.config import LossConfig


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs for a batch of pairs; every tensor has shape (B,)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    def margin(self) -> torch.Tensor:
        """h = gamma_policy - gamma_ref, shape (B,)."""
        return (self.policy_chosen - self.policy_rejected) - (self.ref_chosen - self.ref_rejected)


def sigmoid_loss(lp: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """DPO, optionally conservative (label smoothing eps), shape (B,)."""
    logits = cfg.beta * lp.margin()
    eps = cfg.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def ipo_loss(lp: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """IPO: squared distance of h from 1 / (2 beta), shape (B,)."""
    return (lp.margin() - 1.0 / (2.0 * cfg.beta)) ** 2


def hinge_loss(lp: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """SLiC-style hinge on beta h, shape (B,)."""
    return torch.relu(1.0 - cfg.beta * lp.margin())


def dpop_loss(lp: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """DPO-Positive (Smaug): penalise the chosen log-prob falling below the reference's, (B,)."""
    penalty = torch.clamp(lp.ref_chosen - lp.policy_chosen, min=0.0)
    return -F.logsigmoid(cfg.beta * (lp.margin() - cfg.dpop_lambda * penalty))


LossFn = Callable[[PairLogps, LossConfig], torch.Tensor]

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "dpop": dpop_loss,
}


def get_loss(name: str) -> LossFn:
    """The loss function registered under ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None


def nll_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen completion, mean per token, shape (B,)."""
    return -chosen_logps / chosen_tokens.clamp(min=1)


def implicit_rewards(lp: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached implicit rewards beta (log policy - log ref) of chosen and rejected, each (B,)."""
    chosen = beta * (lp.policy_chosen - lp.ref_chosen).detach()
    rejected = beta * (lp.policy_rejected - lp.ref_rejected).detach()
    return chosen, rejected
