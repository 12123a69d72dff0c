"""The shared-prompt layout and token-budgeted passes compute the same thing as padded rows.

One row ``[prompt | chosen | rejected]`` with a 4-D attention mask must give each completion the
log-probs it gets after ``prompt`` alone (values and gradients), and splitting a micro-batch into
length-sorted passes must not change the update.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdpo_core import attention
from sdpo_core.config import DataConfig, LossConfig, ModelConfig, SourceConfig, TrainConfig
from sdpo_core.data import load_source, tokenize_pair
from sdpo_core.layouts import split_by_tokens
from sdpo_core.logprobs import SharedPromptBatch, collate, completion_logps, score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.train import train_dpo

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(name_or_path=str(REPO / "models" / "stories260K"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    cfg = DataConfig(max_length=160, max_prompt_length=48)
    out = []
    for path, fmt in [
        ("data/hh-rlhf_helpful-base_test.jsonl.gz", "hh"),
        ("data/orca_dpo_pairs_validation_msfoundry.jsonl", "openai"),
    ]:
        loaded, _ = load_source(SourceConfig(path=str(REPO / path), name=fmt, format=fmt, max_pairs=4))
        out.extend(tokenize_pair(p, tokenizer, cfg) for p in loaded)
    # Lengths must differ, or padding would not be exercised.
    assert len({len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in out}) > 1
    return out


def test_shared_prompt_logps_and_gradients_equal_padded_rows(pairs, tokenizer):
    model = load_model(MODEL)
    results = {}
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        logps, tokens = completion_logps(model, collate(pairs, pad_id(tokenizer), shared), chunk_rows=16)
        logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[shared] = (logps.detach(), tokens, grads)
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-4, rtol=1e-5)
    assert torch.equal(results[True][1], results[False][1])
    expected = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert results[True][1].tolist() == expected
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, atol=1e-3, rtol=1e-4, msg=name)


def test_rejected_tokens_do_not_see_the_chosen_completion(pairs, tokenizer, monkeypatch):
    """Opening the mask (rejected may attend to chosen) must change the rejected log-probs.

    On the 4-D mask path, which this model would otherwise skip (split attention needs no mask;
    tests/sdpo_core/test_split_attention.py breaks its indexes instead).
    """
    monkeypatch.setattr(attention, "refusal", lambda decoder, width: "the mask is under test")
    model = load_model(MODEL)
    batch = collate(pairs[:2], pad_id(tokenizer), True)
    with torch.no_grad():
        good, _ = completion_logps(model, batch)
        mask = SharedPromptBatch.attention_mask.fget
        monkeypatch.setattr(SharedPromptBatch, "attention_mask", property(lambda b: torch.ones_like(mask(b)).tril()))
        bad, _ = completion_logps(model, batch)
    torch.testing.assert_close(good[:2], bad[:2])  # chosen rows see the same tokens either way
    assert (good[2:] - bad[2:]).abs().max() > 1e-2


def test_score_pairs_layouts_agree(pairs, tokenizer):
    model = load_model(MODEL)
    a = score_pairs(model, pairs, pad_id(tokenizer), 3, shared_prompt=False)
    b = score_pairs(model, pairs, pad_id(tokenizer), 3, shared_prompt=True)
    for key in a:
        torch.testing.assert_close(a[key].double(), b[key].double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_split_by_tokens_respects_the_budget_and_keeps_every_pair(pairs, shared):
    ids = list(range(len(pairs)))
    passes = split_by_tokens(ids, pairs, 200, shared)
    assert sorted(i for p in passes for i in p) == ids
    for piece in passes:
        rows = 1 if shared else 2
        width = max(
            (len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids))
            if shared
            else len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids))
            for i in piece
        )
        assert len(piece) == 1 or rows * len(piece) * width <= 200
    assert split_by_tokens(ids, pairs, None, shared) == [ids]


def test_passes_and_layout_do_not_change_the_update(pairs, tokenizer):
    """One pass of padded rows and many small shared-prompt passes give the same weights."""
    ref = score_pairs(load_model(MODEL), pairs, pad_id(tokenizer), 4)
    weights = []
    for shared, budget in [(False, None), (True, None), (True, 120)]:
        model = load_model(MODEL)
        cfg = TrainConfig(
            micro_batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, shared_prompt=shared, max_pass_tokens=budget
        )
        result = train_dpo(model, pairs, ref, pad_id(tokenizer), cfg, LossConfig(beta=0.5))
        weights.append((result.history, {n: p.detach().clone() for n, p in model.named_parameters()}))
    base_history, base = weights[0]
    for history, other in weights[1:]:
        assert history[0]["loss"] == pytest.approx(base_history[0]["loss"], abs=1e-5)
        # Adam's first step is about lr * sign(gradient): where a gradient is ~0, summation order
        # can flip its sign. Nearly every weight must agree tightly, and none may move further
        # apart than two steps' worth.
        diffs = torch.cat([(other[n] - t).abs().flatten() for n, t in base.items()])
        assert (diffs > 1e-5).float().mean() < 1e-3
        assert diffs.max() <= 2 * 1e-3 * 1.01


def test_an_empty_prompt_scores_the_same_tokens_in_both_layouts(pairs, tokenizer):
    """A tokenizer that adds no BOS gives an empty prompt for an empty prompt string. Nothing then
    predicts a completion's first token: both layouts leave it unscored (the shared layout used to
    read position -1, the row's last column), and the other tokens' log-probs agree."""
    from sdpo_core.logprobs import TokenizedPair

    empty = TokenizedPair([], pairs[0].chosen_ids[:7], pairs[0].rejected_ids[:5])
    batch = [empty, pairs[1]]
    shared = collate(batch, pad_id(tokenizer), True)
    assert int(shared.targets()[2].min()) >= 0, "no token is predicted from position -1"
    model = load_model(MODEL)
    with torch.no_grad():
        padded_logps, padded_tokens = completion_logps(model, collate(batch, pad_id(tokenizer), False), chunk_rows=16)
        shared_logps, shared_tokens = completion_logps(model, shared, chunk_rows=16)
    expected = [6, len(pairs[1].chosen_ids), 4, len(pairs[1].rejected_ids)]
    assert padded_tokens.tolist() == shared_tokens.tolist() == expected
    torch.testing.assert_close(shared_logps, padded_logps, atol=1e-4, rtol=1e-5)
