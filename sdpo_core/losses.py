"""DPO-family losses as pure functions of per-sequence log-probabilities.

Every loss takes a :class:`PairLogps` (per-pair summed completion log-probs of the policy and of
the frozen reference, each of shape ``(B,)``) and a :class:`~sdpo_core.config.LossConfig`, and
returns per-pair losses of shape ``(B,)``; the caller reduces. With

    h = gamma_policy - gamma_ref,   gamma_m = log m(y_w|x) - log m(y_l|x)

the losses are (DPO, arXiv 2305.18290 eq. 7; IPO, arXiv 2310.12036 eq. 17; DPO-Positive,
arXiv 2402.13228 eq. 3):

- sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing)
- ipo:     (h - 1 / (2 beta))^2, with every log-prob divided by its completion's length first
           (TRL's ipo, as the IPO authors confirmed to TRL: see :data:`LENGTH_NORMALISED`)
- hinge:   max(0, 1 - beta h)
- dpop:    -log sigmoid(beta (h - lambda max(0, log ref(y_w|x) - log policy(y_w|x))))

A new variant is a new function added to :data:`LOSSES`, not a branch in an existing one.
:func:`pass_losses` is what the training loop computes for each pass (and what the TRL parity
tests call): the variant, on length-averaged log-probs where it asks for them, plus the weighted
NLL of the chosen completions.

Which TRL 1.16 ``loss_type`` each equals: sigmoid = ``sigmoid`` (with label smoothing eps > 0 it
is conservative DPO, TRL's ``aot`` on one-pair batches; TRL's ``sigmoid`` ignores label_smoothing
and its ``robust`` is a different loss); ipo = ``ipo``; hinge = ``hinge``; dpop has no TRL
counterpart; ``nll_weight`` w = ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, w]``
(RPO's ``rpo_alpha`` in older TRL).
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


LENGTH_NORMALISED = frozenset({"ipo"})
"""Losses computed on per-token mean log-probs: each sequence's log-prob divided by its completion
length, for policy and reference alike (the same tokens, so the same length)."""


def pass_losses(
    lp: PairLogps, tokens: torch.Tensor, cfg: LossConfig, mean_chosen_tokens: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair losses of one pass, and the per-pair NLL term, each (B,).

    Args:
        lp: summed completion log-probs of the B pairs.
        tokens: completion token counts, (2B,): chosen then rejected.
        cfg: the loss and its weights.
        mean_chosen_tokens: chosen completion tokens per pair over the whole optimizer step. The
            NLL is a mean over every chosen token of the step, as TRL's ``sft`` term is over its
            batch: a pair's share is -log p(y_w|x) / mean_chosen_tokens, whose mean over the step's
            pairs is the token mean, however the step is split into passes.
    """
    b = lp.policy_chosen.shape[0]
    loss_lp = lp
    if cfg.name in LENGTH_NORMALISED:
        n_c, n_r = tokens[:b].to(lp.policy_chosen.dtype), tokens[b:].to(lp.policy_chosen.dtype)
        loss_lp = PairLogps(
            lp.policy_chosen / n_c, lp.policy_rejected / n_r, lp.ref_chosen / n_c, lp.ref_rejected / n_r
        )
    losses = get_loss(cfg.name)(loss_lp, cfg)
    nll = nll_loss(lp.policy_chosen, mean_chosen_tokens)
    if cfg.nll_weight:
        losses = losses + cfg.nll_weight * nll
    return losses, nll


def get_loss(name: str) -> LossFn:
    """The loss function registered under ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None


def nll_loss(chosen_logps: torch.Tensor, mean_chosen_tokens: float) -> torch.Tensor:
    """Each pair's share of the token-mean NLL of the chosen completions, shape (B,): its summed
    -log p(y_w|x) over the mean chosen length of the batch the mean is taken over."""
    return -chosen_logps / max(mean_chosen_tokens, 1.0)


def implicit_rewards(lp: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached implicit rewards beta (log policy - log ref) of chosen and rejected, each (B,)."""
    chosen = beta * (lp.policy_chosen - lp.ref_chosen).detach()
    rejected = beta * (lp.policy_rejected - lp.ref_rejected).detach()
    return chosen, rejected
