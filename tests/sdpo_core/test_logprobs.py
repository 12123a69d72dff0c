"""The chunked completion log-probs against a naive full-logits computation, on the tiny real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from sdpo_core import logprobs as logprobs_mod
from sdpo_core.config import DataConfig, ModelConfig, SourceConfig
from sdpo_core.data import load_source, tokenize_pairs
from sdpo_core.logprobs import (
    PairBatch,
    TokenizedPair,
    collate_pairs,
    completion_logps,
    score_pairs,
)
from sdpo_core.model_io import load_model, load_tokenizer, pad_id

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "stories260K"
DATA = REPO / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path=str(MODEL)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(ModelConfig(name_or_path=str(MODEL))).eval()


@pytest.fixture(scope="module")
def pairs(tokenizer) -> list[TokenizedPair]:
    """Six real pairs: five short HH pairs, whole, and one Orca pair cut to max_length, so rows differ in
    length and are padded."""
    cfg = DataConfig(max_length=160, max_prompt_length=96)
    hh, _ = load_source(SourceConfig(path=str(DATA / "hh-rlhf_helpful-base_test.jsonl.gz"), name="hh", max_pairs=40))
    orca, _ = load_source(
        SourceConfig(path=str(DATA / "orca_dpo_pairs_validation_msfoundry.jsonl"), name="o", max_pairs=1)
    )
    out = tokenize_pairs([hh[i] for i in (6, 11, 19, 22, 37)] + orca, tokenizer, cfg)
    widths = {len(p.prompt_ids) + len(c) for p in out for c in (p.chosen_ids, p.rejected_ids)}
    assert len(widths) > 6, "the fixture should hold rows of different lengths"
    return out


def naive_logps(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits, full log-softmax, gather, masked sum over completion tokens: (R,) and (R,)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (R, T, V)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (R, T-1, V)
    labels = batch.input_ids[:, 1:]  # (R, T-1)
    per_token = logp.gather(2, labels[..., None]).squeeze(2)  # (R, T-1)
    mask = batch.completion_mask[:, 1:].float()
    return (per_token * mask).sum(1), mask.sum(1).long()


@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
def test_matches_naive_forward(model, tokenizer, pairs, chunk_rows: int) -> None:
    batch = collate_pairs(pairs, pad_id(tokenizer))
    with torch.no_grad():
        expected, expected_tokens = naive_logps(model, batch)
        got, tokens = completion_logps(model, batch, chunk_rows=chunk_rows)
    assert got.shape == (2 * len(pairs),) and got.dtype == torch.float32
    assert_close(got, expected, atol=1e-5, rtol=1e-6)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
def test_gradients_match_naive(model, tokenizer, pairs, chunk_rows: int) -> None:
    """In grad mode (checkpointed chunks), d(sum of logps)/d(params) equals the naive gradient.

    The sum is divided by the number of completion tokens N (a constant) so the gradients are O(1):
    the raw sums over a few hundred tokens have entries up to ~200, where float32 summation order alone moves
    them by ~1e-4 (about 1e-6 of their size).
    """
    batch = collate_pairs(pairs[:3], pad_id(tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    n_tokens = int(batch.completion_mask.sum())

    logps, _ = completion_logps(model, batch, chunk_rows=chunk_rows)
    got = torch.autograd.grad(logps.sum() / n_tokens, params)
    naive, _ = naive_logps(model, batch)
    expected = torch.autograd.grad(naive.sum() / n_tokens, params)

    assert_close(logps.detach(), naive.detach(), atol=1e-5, rtol=1e-6)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert all(g.abs().max() > 1e-3 for g in got), "every parameter should get a gradient"


def test_fallback_path_for_scaled_logits(model, tokenizer, pairs, monkeypatch) -> None:
    """Models whose logits are post-processed take the full-logits branch; it gives the same numbers."""
    batch = collate_pairs(pairs, pad_id(tokenizer))
    with torch.no_grad():
        fast, fast_tokens = completion_logps(model, batch, chunk_rows=5)
        monkeypatch.setattr(logprobs_mod, "_has_plain_head", lambda m: False)
        slow, slow_tokens = completion_logps(model, batch, chunk_rows=5)
    assert_close(slow, fast, atol=1e-5, rtol=1e-6)
    assert torch.equal(slow_tokens, fast_tokens)


def test_token_counts_are_completion_lengths(tokenizer, pairs) -> None:
    """Every completion token is scored (the prompt ends with at least BOS), no prompt or pad token is."""
    batch = collate_pairs(pairs, pad_id(tokenizer))
    expected = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert batch.completion_mask.sum(1).tolist() == expected
    for row, (p, completion) in enumerate([(p, p.chosen_ids) for p in pairs] + [(p, p.rejected_ids) for p in pairs]):
        n_p, n_c = len(p.prompt_ids), len(completion)
        assert batch.completion_mask[row, :n_p].sum() == 0
        assert batch.input_ids[row, n_p : n_p + n_c].tolist() == completion
        assert batch.attention_mask[row].sum() == n_p + n_c


def test_counts_from_completion_logps(model, tokenizer, pairs) -> None:
    with torch.no_grad():
        _, tokens = completion_logps(model, collate_pairs(pairs, pad_id(tokenizer)))
    assert tokens.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_padding_does_not_count(model, tokenizer, pairs) -> None:
    """A different pad id changes only padded positions: the log-probs are unchanged, and each row
    scored alone (no padding at all) gives the same log-prob as in the padded batch."""
    with torch.no_grad():
        a, _ = completion_logps(model, collate_pairs(pairs, pad_id(tokenizer)))
        b, _ = completion_logps(model, collate_pairs(pairs, 7))
        alone = [completion_logps(model, collate_pairs([p], pad_id(tokenizer)))[0] for p in pairs]
    assert_close(a, b, atol=1e-5, rtol=0)
    b_pairs = len(pairs)
    assert_close(a[:b_pairs], torch.cat([x[:1] for x in alone]), atol=1e-5, rtol=1e-6)
    assert_close(a[b_pairs:], torch.cat([x[1:] for x in alone]), atol=1e-5, rtol=1e-6)


def test_prompt_tokens_do_not_count(model, tokenizer, pairs) -> None:
    """Moving the first completion token into the prompt removes exactly its log-prob:

    log p(c1..cn | x) - log p(c2..cn | x c1) = log p(c1 | x), read from the naive full logits.
    """
    p = pairs[0]
    moved = TokenizedPair(p.prompt_ids + p.chosen_ids[:1], p.chosen_ids[1:], p.rejected_ids[1:])
    with torch.no_grad():
        full, _ = completion_logps(model, collate_pairs([p], pad_id(tokenizer)))
        shorter, n = completion_logps(model, collate_pairs([moved], pad_id(tokenizer)))
        ids = torch.tensor([p.prompt_ids])
        logits = model(input_ids=ids).logits[0, -1]  # (V,) next-token logits after the prompt
        first = torch.log_softmax(logits.float(), -1)
    expected = torch.stack([first[p.chosen_ids[0]], first[p.rejected_ids[0]]])
    assert n.tolist() == [len(p.chosen_ids) - 1, len(p.rejected_ids) - 1]
    assert_close(full - shorter, expected, atol=1e-5, rtol=1e-5)
    assert (expected < 0).all()


def test_score_pairs_keeps_input_order(model, tokenizer, pairs) -> None:
    """Length-sorted batching puts every result back at its pair's index (compared with one call per pair)."""
    pid = pad_id(tokenizer)
    shuffled = [pairs[i] for i in (3, 0, 5, 1, 4, 2)]
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in shuffled]
    assert lengths != sorted(lengths), "the order must differ from the length order for this test to bite"
    model.train()
    scores = score_pairs(model, shuffled, pid, batch_size=4, chunk_rows=16)
    assert model.training, "score_pairs must restore training mode"
    model.eval()
    for i, p in enumerate(shuffled):
        one = score_pairs(model, [p], pid, batch_size=1)
        for key in ("chosen", "rejected"):
            assert_close(scores[key][i], one[key][0], atol=1e-5, rtol=1e-6)
        assert scores["chosen_tokens"][i] == len(p.chosen_ids)
        assert scores["rejected_tokens"][i] == len(p.rejected_ids)


def test_score_pairs_empty(model) -> None:
    out = score_pairs(model, [], pad_id=0, batch_size=4)
    assert {k: v.numel() for k, v in out.items()} == {
        "chosen": 0,
        "rejected": 0,
        "chosen_tokens": 0,
        "rejected_tokens": 0,
    }


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_padded_rows_need_no_attention_mask(model, tokenizer, pairs, implementation, monkeypatch) -> None:
    """Right-padded rows go to the decoder without a padding mask (causal attention keeps every
    scored token off the pads), and the log-probs equal the masked forward's."""
    batch = collate_pairs(pairs, pad_id(tokenizer))
    decoder = model.get_decoder()
    seen: list[dict] = []
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **kw: seen.append(kw) or forward(*a, **kw))
    monkeypatch.setattr(model.config, "_attn_implementation", implementation)
    with torch.no_grad():
        expected, _ = naive_logps(model, batch)
        got, _ = completion_logps(model, batch)
    assert seen[-1].get("attention_mask") is None
    assert_close(got, expected, atol=1e-5, rtol=1e-6)
