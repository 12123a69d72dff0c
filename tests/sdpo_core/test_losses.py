"""Hand-derived values for the DPO-family losses in sdpo_core.losses.

Most cases use the pair

    policy chosen -1, policy rejected -2, reference chosen -3, reference rejected -2
    h = (-1 - (-2)) - (-3 - (-2)) = 1 - (-1) = 2

and beta = 0.5, so beta * h = 1.
"""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sdpo_core.config import LossConfig, LossName
from sdpo_core.losses import (
    LENGTH_NORMALISED,
    LOSSES,
    PairLogps,
    dpop_loss,
    get_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    nll_loss,
    pass_losses,
    sigmoid_loss,
)


def _t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def _pair(pc: float = -1.0, pr: float = -2.0, rc: float = -3.0, rr: float = -2.0) -> PairLogps:
    return PairLogps(_t(pc), _t(pr), _t(rc), _t(rr))


def _softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_margin_is_gamma_policy_minus_gamma_ref() -> None:
    """h = (-1 - (-2)) - (-3 - (-2)) = 1 + 1 = 2; a second pair (0, -1, -1, -1) gives 1 - 0 = 1."""
    lp = PairLogps(_t(-1.0, 0.0), _t(-2.0, -1.0), _t(-3.0, -1.0), _t(-2.0, -1.0))
    assert_close(lp.margin(), _t(2.0, 1.0))


def test_sigmoid_loss() -> None:
    """beta h = 0.5 * 2 = 1, so the loss is -log sigmoid(1) = log(1 + e^-1) = 0.3132617.

    The second pair swaps chosen and rejected (h = -2): -log sigmoid(-1) = log(1 + e) = 1.3132617.
    """
    lp = PairLogps(_t(-1.0, -2.0), _t(-2.0, -1.0), _t(-3.0, -2.0), _t(-2.0, -3.0))
    out = sigmoid_loss(lp, LossConfig(name="sigmoid", beta=0.5))
    assert out.shape == (2,)
    assert_close(out, _t(0.3132617, 1.3132617))
    assert_close(out, _t(_softplus(-1.0), _softplus(1.0)))


def test_sigmoid_loss_with_label_smoothing() -> None:
    """Conservative DPO with eps = 0.1, beta h = 1:

    0.9 * (-log sigmoid(1)) + 0.1 * (-log sigmoid(-1))
      = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.2819355 + 0.1313262 = 0.4132617
    """
    out = sigmoid_loss(_pair(), LossConfig(name="sigmoid", beta=0.5, label_smoothing=0.1))
    assert_close(out, _t(0.4132617))


def test_ipo_loss() -> None:
    """(h - 1 / (2 beta))^2 with h = 2:

    beta 0.5 -> (2 - 1)^2 = 1;  beta 0.25 -> (2 - 2)^2 = 0;  beta 1 -> (2 - 0.5)^2 = 2.25.
    """
    for beta, expected in [(0.5, 1.0), (0.25, 0.0), (1.0, 2.25)]:
        assert_close(ipo_loss(_pair(), LossConfig(name="ipo", beta=beta)), _t(expected))


def test_hinge_loss() -> None:
    """max(0, 1 - beta h) with h = 2: beta 0.25 -> 1 - 0.5 = 0.5; beta 0.5 -> 0; beta 1 -> max(0, -1) = 0.

    With chosen and rejected swapped (h = -2) and beta 0.5: 1 - (-1) = 2.
    """
    for beta, expected in [(0.25, 0.5), (0.5, 0.0), (1.0, 0.0)]:
        assert_close(hinge_loss(_pair(), LossConfig(name="hinge", beta=beta)), _t(expected))
    swapped = _pair(pc=-2.0, pr=-1.0, rc=-2.0, rr=-3.0)
    assert_close(hinge_loss(swapped, LossConfig(name="hinge", beta=0.5)), _t(2.0))


def test_dpop_penalty_inactive_equals_dpo() -> None:
    """The policy's chosen log-prob (-1) is above the reference's (-3): penalty max(0, -3 - (-1)) = 0,
    so DPO-Positive equals DPO: -log sigmoid(0.5 * 2) = 0.3132617, whatever lambda is.
    """
    cfg = LossConfig(name="dpop", beta=0.5, dpop_lambda=50.0)
    assert_close(dpop_loss(_pair(), cfg), _t(0.3132617))


def test_dpop_penalty_active() -> None:
    """policy chosen -4, rejected -5, reference chosen -3, rejected -2:

    h = (-4 - (-5)) - (-3 - (-2)) = 1 + 1 = 2 (the same h as above, so DPO would give 0.3132617),
    penalty = max(0, -3 - (-4)) = 1, lambda = 1.5, beta = 0.5:
    -log sigmoid(0.5 * (2 - 1.5 * 1)) = -log sigmoid(0.25) = log(1 + e^-0.25) = 0.5759394.
    """
    lp = _pair(pc=-4.0, pr=-5.0, rc=-3.0, rr=-2.0)
    assert_close(lp.margin(), _t(2.0))
    out = dpop_loss(lp, LossConfig(name="dpop", beta=0.5, dpop_lambda=1.5))
    assert_close(out, _t(0.5759394))
    assert_close(out, _t(_softplus(-0.25)))
    assert_close(sigmoid_loss(lp, LossConfig(beta=0.5)), _t(0.3132617))


def test_sigmoid_loss_gradient() -> None:
    """d/d(policy chosen) of -log sigmoid(beta h) = -beta sigmoid(-beta h) = -0.5 * sigmoid(-1)
    = -0.5 * 0.2689414 = -0.1344707, and +0.1344707 for policy rejected.
    """
    pc, pr = _t(-1.0, grad=True), _t(-2.0, grad=True)
    lp = PairLogps(pc, pr, _t(-3.0), _t(-2.0))
    sigmoid_loss(lp, LossConfig(beta=0.5)).sum().backward()
    assert_close(pc.grad, _t(-0.1344707))
    assert_close(pr.grad, _t(0.1344707))


def test_registry_matches_config_names() -> None:
    assert set(LOSSES) == set(typing.get_args(LossName))
    assert get_loss("sigmoid") is sigmoid_loss
    assert get_loss("ipo") is ipo_loss
    assert get_loss("hinge") is hinge_loss
    assert get_loss("dpop") is dpop_loss


def test_get_loss_unknown_names_it() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'kto_pair'.*dpop.*sigmoid"):
        get_loss("kto_pair")


def test_nll_is_a_token_mean_over_the_step() -> None:
    """Chosen log-probs -6 (3 tokens), -3 (1 token), -3 (2 tokens): the token mean over the step is
    (6 + 3 + 3) / 6 = 2. Each pair's share is -logp / (6 / 3 tokens per pair): 3, 1.5, 1.5, whose
    mean is 2; a per-pair token mean would give (2 + 3 + 1.5) / 3 = 2.1667 instead."""
    logps = _t(-6.0, -3.0, -3.0)
    shares = nll_loss(logps, mean_chosen_tokens=2.0)
    assert_close(shares, _t(3.0, 1.5, 1.5))
    assert_close(shares.mean(), torch.tensor(2.0))
    # Split in two passes of the same step (same mean length): the same sum.
    assert_close(nll_loss(logps[:1], 2.0).sum() + nll_loss(logps[1:], 2.0).sum(), shares.sum())


def test_pass_losses_adds_the_weighted_nll() -> None:
    lp = PairLogps(_t(-6.0, -3.0), _t(-5.0, -4.0), _t(-6.0, -3.0), _t(-5.0, -4.0))  # h = 0
    tokens = torch.tensor([3, 1, 5, 2])  # chosen 3, 1; rejected 5, 2
    losses, nll = pass_losses(lp, tokens, LossConfig(beta=0.5, nll_weight=0.25), mean_chosen_tokens=2.0)
    assert_close(nll, _t(3.0, 1.5))
    assert_close(losses, _t(math.log(2.0) + 0.75, math.log(2.0) + 0.375))  # -log sigmoid(0) = log 2


def test_ipo_is_computed_on_length_averaged_logps() -> None:
    """TRL's ipo: each log-prob divided by its completion length before the square. Policy chosen
    -6 over 3 tokens (-2), rejected -8 over 4 (-2); reference chosen -3 over 3 (-1), rejected -8
    over 4 (-2): h = (-2 - -2) - (-1 - -2) = -1, and with beta 0.5: (-1 - 1)^2 = 4. On sums, h
    would be (-6 + 8) - (-3 + 8) = -3 and the loss 16."""
    lp = PairLogps(_t(-6.0), _t(-8.0), _t(-3.0), _t(-8.0))
    losses, _ = pass_losses(lp, torch.tensor([3, 4]), LossConfig(name="ipo", beta=0.5), mean_chosen_tokens=3.0)
    assert_close(losses, _t(4.0))
    assert "ipo" in LENGTH_NORMALISED and "sigmoid" not in LENGTH_NORMALISED
    sums, _ = pass_losses(lp, torch.tensor([3, 4]), LossConfig(name="sigmoid", beta=0.5), mean_chosen_tokens=3.0)
    assert_close(sums, -F.logsigmoid(_t(0.5 * -3.0)))  # sigmoid keeps the sums


def test_implicit_rewards_values_and_detached() -> None:
    """beta (policy - ref): chosen 0.5 * (-1 - (-3)) = 1, rejected 0.5 * (-2 - (-2)) = 0;
    a second pair (-4, -1, -2, -3) gives 0.5 * (-2) = -1 and 0.5 * 2 = 1.
    """
    pc, pr = _t(-1.0, -4.0, grad=True), _t(-2.0, -1.0, grad=True)
    lp = PairLogps(pc, pr, _t(-3.0, -2.0), _t(-2.0, -3.0))
    chosen, rejected = implicit_rewards(lp, beta=0.5)
    assert_close(chosen, _t(1.0, -1.0))
    assert_close(rejected, _t(0.0, 1.0))
    assert not chosen.requires_grad and not rejected.requires_grad
    assert chosen.grad_fn is None and rejected.grad_fn is None
    # The losses themselves keep the graph.
    assert sigmoid_loss(lp, LossConfig(beta=0.5)).requires_grad
