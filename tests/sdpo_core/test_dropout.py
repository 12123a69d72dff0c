"""Dropout is off while the policy trains (train.disable_dropout, TRL's default), so its
log-probs at the first update are the ones the reference was scored with."""

from __future__ import annotations

import pytest
import torch

from sdpo_core.config import LossConfig, TrainConfig
from sdpo_core.logprobs import TokenizedPair, score_pairs
from sdpo_core.train import train_dpo


def _gpt2_with_dropout() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _pairs() -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(1, 64, (n,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(5), ids(6 + i % 3), ids(4 + i % 2)) for i in range(8)]


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_while_training_and_restored_after(disable: bool) -> None:
    model = _gpt2_with_dropout()
    pairs = _pairs()
    ref = score_pairs(model.eval(), pairs, 0, 8, 64, "cpu", False)
    seen: list[list[float]] = []

    def callback(step: int, metrics: dict[str, float]) -> None:
        seen.append([m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)])
        seen[-1].append(metrics["abs_margin"])

    cfg = TrainConfig(micro_batch_size=8, learning_rate=1e-3, shared_prompt=False, disable_dropout=disable)
    train_dpo(model, pairs, ref, 0, cfg, LossConfig(), "cpu", callback)
    *probabilities, abs_margin = seen[0]
    assert probabilities and all(p == (0.0 if disable else 0.3) for p in probabilities)
    # The policy starts as the reference: h is 0 at the first update only without dropout.
    if disable:
        assert abs_margin < 1e-5
    else:
        assert abs_margin > 1e-2
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, torch.nn.Dropout)), "restored"
