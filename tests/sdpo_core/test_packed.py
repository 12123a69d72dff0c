"""The packed shared-prompt layout computes what two padded rows per pair do.

Several pairs per row of a fixed length under a block mask (:mod:`sdpo_core.packed`): the layout
worked out by hand, the mask by hand, log-probs and every parameter's gradient against the padded
layout (``collate_pairs`` + ``completion_logps``) on the shipped tiny model and on random small
Llamas with grouped-query attention (dense SDPA while gradients are on, eager flex attention
without them, as on a CPU), no attention across pairs or from rejected to chosen tokens, a pair
longer than the row, the passes of a micro-batch, and the models it refuses.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask
from torch.testing import assert_close
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sdpo_core import attention, packed_attention
from sdpo_core.attn_swap import swapped
from sdpo_core.logprobs import TokenizedPair, collate_pairs, completion_logps
from sdpo_core.packed import PackedBatch, collate_packed, pack_passes, run_row_tokens
from sdpo_core.packed_attention import CHOSEN, PAD, PROMPT, REJECTED, PackedUnsupported, packed_mask_mod

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = Path(__file__).resolve().parents[2] / "models" / "stories260K"
PAD_ID = 0
TOL = {"atol": 1e-5, "rtol": 1e-5}
HAND = [(2, 3, 1), (1, 1, 2), (0, 1, 1), (4, 3, 3)]
"""(prompt, chosen, rejected) lengths of the layout worked out by hand."""


def random_llama(seed: int, kv_heads: int = 2, implementation: str = "sdpa", **extra) -> LlamaForCausalLM:
    """A small random Llama: 4 query heads over ``kv_heads`` key/value heads (GQA below 4)."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        initializer_range=0.2,  # far from uniform attention: a key seen or not matters
        attn_implementation=implementation,
        **extra,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_model() -> LlamaForCausalLM:
    """The shipped model: 8 query heads over 4 key/value heads."""
    return LlamaForCausalLM.from_pretrained(MODEL, use_safetensors=True)


def make_pairs(lengths: list[tuple[int, int, int]], seed: int = 0, vocab: int = 256) -> list[TokenizedPair]:
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in lengths]


def random_lengths(seed: int, n: int = 7) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths of ``n`` pairs, the first with an empty prompt."""
    rng = random.Random(seed)
    lengths = [(rng.randint(1, 9), rng.randint(1, 8), rng.randint(1, 8)) for _ in range(n)]
    return [(0, *lengths[0][1:])] + lengths[1:]


def packed_logps(model: torch.nn.Module, batch: PackedBatch, whole_model: bool = False) -> torch.Tensor:
    """(2B,) summed completion log-probs, as completion_logps computes them from the hidden
    states (or from the whole model's logits)."""
    seq, row, pos, labels = batch.targets()
    if whole_model:
        logits = batch.forward(model).logits[row, pos].float()
    else:
        hidden = batch.forward(model.get_decoder()).last_hidden_state[row, pos]
        logits = model.get_output_embeddings()(hidden).float()
    per_token = logits.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros(2 * batch.num_pairs).index_add(0, seq, per_token)


def logps_and_grads(model, compute, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs and d(weighted mean log-prob)/d(params); distinct weights per sequence, so a
    sequence scored under another's index shows."""
    model.zero_grad(set_to_none=True)
    logps = compute()
    ((logps * weights).sum() / 20).backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_matches_padded(model, pairs, row_tokens: int, whole_model: bool = False) -> None:
    """Packed log-probs and gradients (training mode) equal the padded layout's; so do the
    log-probs without gradients (flex attention on the block mask)."""
    model.train()  # these models have no dropout
    batch = collate_packed(pairs, PAD_ID, row_tokens)
    weights = torch.linspace(0.5, 1.5, 2 * len(pairs))
    tokens = []

    def padded() -> torch.Tensor:
        logps, counts = completion_logps(model, collate_pairs(pairs, PAD_ID))
        tokens.append(counts)
        return logps

    expected = logps_and_grads(model, padded, weights)
    assert torch.equal(batch.tokens, tokens[0])
    got = logps_and_grads(model, lambda: packed_logps(model, batch, whole_model), weights)
    assert_close(got[0], expected[0], **TOL)
    for name, grad in expected[1].items():
        assert_close(got[1][name], grad, **TOL, msg=name)
    assert all(g.abs().max() > 1e-4 for g in got[1].values()), "every parameter should get a gradient"
    with torch.no_grad():
        assert isinstance(batch.attention_mask(), BlockMask)
        assert_close(packed_logps(model, batch, whole_model), expected[0], **TOL)


def test_the_layout_worked_out_by_hand() -> None:
    """Pairs (P, C, R) = (2, 3, 1), (1, 1, 2), (0, 1, 1), (4, 3, 3) in rows of 12, first-fit in order:
    row 0 holds pair 0 (columns 0..5), pair 1 (6..9) and pair 2 (10, 11); pair 3 (10 tokens)
    opens row 1 and leaves 2 columns of padding."""
    pairs = make_pairs(HAND)
    batch = collate_packed(pairs, PAD_ID, 12)
    flat = lambda p: p.prompt_ids + p.chosen_ids + p.rejected_ids  # noqa: E731
    ids = batch.input_ids
    assert ids.tolist() == [flat(pairs[0]) + flat(pairs[1]) + flat(pairs[2]), flat(pairs[3]) + [PAD_ID] * 2]
    # Each pair's positions restart; both completions continue from the prompt; padding is 0.
    assert batch.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 2, 0, 1, 1, 2, 0, 0],
        [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 0, 0],
    ]
    assert batch.document.tolist() == [[0] * 6 + [1] * 4 + [2] * 2, [0] * 10 + [-1] * 2]
    p, c, r, x = PROMPT, CHOSEN, REJECTED, PAD
    assert batch.segment.tolist() == [[p, p, c, c, c, r, p, c, r, r, c, r], [p] * 4 + [c] * 3 + [r] * 3 + [x] * 2]
    # Sequences 0..3 chosen, 4..7 rejected. First tokens are predicted at the last prompt column;
    # pair 2 has no prompt, so neither of its tokens is scored.
    seq, row, pos, labels = (t.tolist() for t in batch.targets())
    assert seq == [0, 0, 0, 4, 1, 5, 5, 3, 3, 3, 7, 7, 7]
    assert row == [0] * 7 + [1] * 6
    assert pos == [1, 2, 3, 1, 6, 6, 8, 3, 4, 5, 3, 7, 8]
    assert labels == [ids[0, k].item() for k in (2, 3, 4, 5, 7, 8, 9)] + [ids[1, k].item() for k in range(4, 10)]
    assert batch.tokens.tolist() == [3, 1, 0, 3, 1, 2, 0, 3]
    assert batch.num_pairs == 4 and batch.row_tokens == 12


def test_the_mask_worked_out_by_hand() -> None:
    """Row 0 above: within each pair causal, the rejected column 5 not seeing chosen 2..4,
    pair 1's rejected 8, 9 not seeing chosen 7, pair 2's rejected 11 not seeing chosen 10; nothing
    across pairs. The block mask's own
    evaluation of the mask function (torch's create_mask) gives the same booleans."""
    batch = collate_packed(make_pairs(HAND), PAD_ID, 12)
    expected = torch.zeros(12, 12, dtype=torch.bool)
    for start, end in ((0, 6), (6, 10), (10, 12)):
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    expected[5, 2:5] = False
    expected[8:10, 7] = False
    expected[11, 10] = False
    dense = packed_attention.dense_mask(batch.document, batch.segment)
    assert dense.shape == (2, 1, 12, 12)
    assert torch.equal(dense[0, 0], expected)
    assert torch.equal(dense[1, 0, 10:, 10:], torch.ones(2, 2, dtype=torch.bool).tril())  # padding sees padding
    assert not dense[1, 0, 10:, :10].any() and not dense[1, 0, :10, 10:].any()
    by_torch = create_mask(packed_mask_mod(batch.document, batch.segment), 2, 1, 12, 12, device="cpu")
    assert torch.equal(by_torch, dense)
    assert packed_attention.block_mask(batch.document, batch.segment).shape == (2, 1, 12, 12)


def test_the_shipped_model_matches_the_padded_layout() -> None:
    pairs = make_pairs(random_lengths(0, n=6), vocab=512)
    assert_matches_padded(tiny_model(), pairs, row_tokens=40)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_gqa_llamas_match_the_padded_layout(seed: int) -> None:
    """Grouped-query Llamas, several rows of several pairs each, an empty prompt among them."""
    pairs = make_pairs(random_lengths(seed), seed=seed)
    batch = collate_packed(pairs, PAD_ID, 32)
    assert batch.input_ids.shape[0] >= 2 and batch.input_ids.shape[0] < len(pairs)
    assert_matches_padded(random_llama(seed, kv_heads=2 if seed else 1), pairs, row_tokens=32)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_whole_model_logits_match_and_the_config_is_restored(implementation: str) -> None:
    """Through the whole causal LM (logits), for models set up with either implementation; the
    config names its own implementation again after each forward."""
    model = random_llama(3, kv_heads=2, implementation=implementation)
    assert_matches_padded(model, make_pairs(random_lengths(3), seed=3), row_tokens=48, whole_model=True)
    assert model.config._attn_implementation == implementation


def checkpointing(model: LlamaForCausalLM, **settings) -> None:
    """Activation checkpointing of each decoder layer, with ``settings`` for torch's checkpoint."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; 5.17 has the older name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def test_activation_checkpointing_recomputes_with_packed_attention(monkeypatch) -> None:
    """Checkpointed layers (non-reentrant, with split attention's replay as sdpo trains) attend
    over the packed mask again when the backward pass recomputes them, after the forward has
    restored the config: an eager model would otherwise add the boolean mask to its scores. The
    layers' checkpoint functions are restored after the forward."""
    calls: list[int] = []
    registered = packed_attention.packed_attention_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return registered(*args, **kwargs)

    packed_attention.register()
    monkeypatch.setitem(AttentionInterface._global_mapping, packed_attention.PACKED_ATTENTION, counted)
    model = random_llama(5, implementation="eager")
    checkpointing(model, use_reentrant=False, context_fn=attention.replay_contexts)
    before = [layer._gradient_checkpointing_func for layer in model.model.layers]
    assert_matches_padded(model, make_pairs(random_lengths(5), seed=5), row_tokens=32)
    # Training: a forward and a recomputation of each layer; then a forward without gradients.
    assert len(calls) == 3 * model.config.num_hidden_layers
    assert [layer._gradient_checkpointing_func for layer in model.model.layers] == before
    assert model.config._attn_implementation == "eager"


def test_compiled_flex_matches_the_padded_layout(monkeypatch) -> None:
    """The compiled flex attention that CUDA gets, run here on the CPU (forward only: torch's
    flex has no CPU backward), over passes of different row counts. Integration tier: compiles."""
    monkeypatch.setattr(packed_attention, "COMPILED_FLEX_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(packed_attention, "_COMPILED_FLEX", None)
    model = random_llama(7).eval()
    for seed, rows in ((7, 1), (8, 3)):
        pairs = make_pairs(random_lengths(seed, n=3 * rows), seed=seed)
        batch = collate_packed(pairs, PAD_ID, 64)
        assert batch.input_ids.shape[0] == rows
        with torch.no_grad():
            expected, _ = completion_logps(model, collate_pairs(pairs, PAD_ID))
            assert_close(packed_logps(model, batch), expected, **TOL)
    assert packed_attention._COMPILED_FLEX is not None


def test_pairs_do_not_attend_to_each_other_nor_rejected_to_chosen(monkeypatch) -> None:
    """Changing pair 1's tokens (same row) leaves pair 0's and pair 2's log-probs unchanged;
    changing pair 0's chosen tokens leaves its rejected log-prob unchanged. Without either part
    of the mask (a deliberately broken mask function), both would change."""
    model = random_llama(4).eval()
    pairs = make_pairs([(3, 4, 5), (2, 3, 3), (4, 2, 2)], seed=4)
    other = make_pairs([(3, 4, 5), (2, 3, 3), (4, 2, 2)], seed=5)
    changed_pair1 = [pairs[0], other[1], pairs[2]]
    changed_chosen0 = [TokenizedPair(pairs[0].prompt_ids, other[0].chosen_ids, pairs[0].rejected_ids), *pairs[1:]]
    assert collate_packed(pairs, PAD_ID, 32).input_ids.shape[0] == 1

    def logps(pairs_: list[TokenizedPair]) -> torch.Tensor:
        with torch.no_grad():
            return packed_logps(model, collate_packed(pairs_, PAD_ID, 32))

    base, a, b = logps(pairs), logps(changed_pair1), logps(changed_chosen0)
    unchanged = [0, 2, 3, 5]  # chosen and rejected of pairs 0 and 2
    assert_close(a[unchanged], base[unchanged], **TOL)
    assert not torch.allclose(a[[1, 4]], base[[1, 4]])
    assert_close(b[3], base[3], **TOL)  # pair 0's rejected
    assert not torch.allclose(b[0], base[0])

    original = packed_mask_mod
    across = lambda d, s: lambda b_, h, q, kv: original(d, torch.full_like(s, PROMPT))(b_, h, q, kv) | (kv <= q)  # noqa: E731
    monkeypatch.setattr(packed_attention, "packed_mask_mod", across)
    broken_a, broken_b = logps(changed_pair1), logps(changed_chosen0)
    broken_base = logps(pairs)
    assert not torch.allclose(broken_a[[2, 5]], broken_base[[2, 5]]), "pair 2 should see pair 1 with a broken mask"
    assert not torch.allclose(broken_b[3], broken_base[3]), "rejected should see chosen with a broken mask"


def test_a_pair_longer_than_the_row() -> None:
    """The run's row grows to the next multiple of 128 that holds the longest pair; a row too
    short for a pair is refused with the pair's index."""
    pairs = make_pairs([(5, 5, 5), (60, 50, 40), (2, 2, 2)])
    assert run_row_tokens(pairs, 200) == 200
    assert run_row_tokens(pairs, 150) == 150
    assert run_row_tokens(pairs, 149) == 256
    assert run_row_tokens(make_pairs([(64, 32, 32)]), 100) == 128
    with pytest.raises(ValueError, match="pair 1 takes 150 tokens .* rows of 64"):
        collate_packed(pairs, PAD_ID, 64)
    with pytest.raises(ValueError, match="pair 1 takes 150 tokens"):
        pack_passes([0, 1, 2], pairs, 64, None)
    batch = collate_packed(pairs, PAD_ID, run_row_tokens(pairs, 64))
    assert batch.input_ids.shape == (1, 256)
    assert batch.document[0].tolist() == [0] * 15 + [1] * 150 + [2] * 6 + [-1] * 85


@pytest.mark.parametrize("seed", range(5))
def test_pack_passes_bounds(seed: int) -> None:
    """Every id once; each pass packs into at most max(1, max_tokens // row_tokens) rows, as
    collate_packed lays it out; rows are first-fit-decreasing (no more rows in all than that)."""
    rng = random.Random(seed)
    lengths = [(rng.randint(0, 20), rng.randint(1, 20), rng.randint(1, 20)) for _ in range(rng.randint(1, 30))]
    pairs = make_pairs(lengths, seed=seed)
    ids = rng.sample(range(len(pairs)), len(pairs))
    row_tokens = 64
    spans = sorted((sum(x) for x in lengths), reverse=True)
    ffd_rows = []
    for span in spans:
        fit = next((k for k, used in enumerate(ffd_rows) if used + span <= row_tokens), None)
        if fit is None:
            ffd_rows.append(span)
        else:
            ffd_rows[fit] += span
    for max_tokens, limit in ((None, None), (64, 1), (10, 1), (200, 3), (1000, 15)):
        passes = pack_passes(ids, pairs, row_tokens, max_tokens)
        assert sorted(i for p in passes for i in p) == sorted(ids)
        rows = [collate_packed([pairs[i] for i in p], PAD_ID, row_tokens).input_ids.shape[0] for p in passes]
        assert all(p for p in passes)
        if limit is None:
            assert len(passes) == 1
        else:
            assert max(rows) <= limit
        assert sum(rows) == len(ffd_rows)
    assert pack_passes([], pairs, row_tokens, 128) == []


def test_refusals_name_the_model_and_the_feature(monkeypatch) -> None:
    """Models this layout cannot reproduce are refused before the forward, with the model class
    and the feature named, and their config is left as it was."""
    pairs = make_pairs([(3, 3, 3)])
    batch = collate_packed(pairs, PAD_ID, 32)
    cases = [
        (random_llama(0, sliding_window=16), "LlamaModel's config sets sliding_window=16 < 32 columns"),
        (random_llama(0, attention_dropout=0.1).train(), r"LlamaModel trains with attention dropout"),
    ]
    checkpointed = random_llama(0).train()
    checkpointing(checkpointed, use_reentrant=True)
    cases.append((checkpointed, "LlamaModel recomputes its layers in the backward pass .with reentrant"))
    capped = random_llama(0)
    capped.config.attn_logit_softcapping = 50.0
    cases.append((capped, r"LlamaModel's config sets attn_logit_softcapping=50.0"))
    not_causal = random_llama(0)
    not_causal.config.is_causal = False
    cases.append((not_causal, "LlamaModel is not causal"))
    custom = random_llama(0)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpo_test_custom", sdpa_attention_forward)
    custom.config._attn_implementation = "sdpo_test_custom"
    cases.append((custom, "LlamaModel uses attention implementation 'sdpo_test_custom'"))
    for model, message in cases:
        before = model.config._attn_implementation
        with pytest.raises(PackedUnsupported, match=f"cannot run LlamaModel: {message}"):
            packed_logps(model, batch)
        assert model.config._attn_implementation == before
    # The same model without the feature, or evaluated (no dropout), runs.
    with torch.no_grad():
        packed_logps(random_llama(0, attention_dropout=0.1).eval(), batch)
    sliding_wide = random_llama(0, sliding_window=32)
    with torch.no_grad():
        packed_logps(sliding_wide, batch)


def test_attention_calls_with_features_are_refused() -> None:
    """A call passing a feature this does not reproduce, or without the packed mask, fails
    with the attention module's class named."""
    attn = random_llama(0).model.layers[0].self_attn
    q, kv = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(PackedUnsupported, match="LlamaAttention passes softcap"):
        packed_attention.packed_attention_forward(attn, q, kv, kv, mask, softcap=30.0)
    with pytest.raises(PackedUnsupported, match="LlamaAttention has a sliding window of 4 < 8 columns"):
        packed_attention.packed_attention_forward(attn, q, kv, kv, mask, sliding_window=4)
    with pytest.raises(PackedUnsupported, match="LlamaAttention uses attention dropout 0.1"):
        packed_attention.packed_attention_forward(attn, q, kv, kv, mask, dropout=0.1)
    with pytest.raises(PackedUnsupported, match="got attention_mask of type NoneType"):
        packed_attention.packed_attention_forward(attn, q, kv, kv, None)
    out, weights = packed_attention.packed_attention_forward(attn, q, kv, kv, mask)
    assert out.shape == (1, 8, 4, 16) and weights is None


@pytest.mark.parametrize("grad", [True, False], ids=["dense-sdpa", "flex"])
def test_a_decoder_layer_traces_without_graph_breaks(grad: bool) -> None:
    """Compiled decoder layers (train.compile) trace the packed attention into one graph, with
    either form of the mask (it is an argument of the layer, not a context variable)."""
    model = random_llama(0)
    batch = collate_packed(make_pairs(HAND), PAD_ID, 12)
    layer, hidden = model.model.layers[0], torch.randn(2, 12, 64)
    rotary = model.model.rotary_emb(hidden, batch.position_ids)
    packed_attention.register()
    with torch.set_grad_enabled(grad), swapped(model.config, packed_attention.PACKED_ATTENTION):
        mask = batch.attention_mask()
        assert isinstance(mask, torch.Tensor if grad else BlockMask)
        run = lambda x, m: layer(x, attention_mask=m, position_embeddings=rotary, position_ids=batch.position_ids)  # noqa: E731
        explained = torch._dynamo.explain(run)(hidden, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_concurrent_forwards_restore_the_config_once() -> None:
    """Packed forwards of one model in several threads: each gets its own mask (an argument),
    the same log-probs as alone, and the config is restored after the last one."""
    model = random_llama(6).eval()
    batches = [collate_packed(make_pairs(random_lengths(seed), seed=seed), PAD_ID, 32) for seed in range(4)]
    with torch.no_grad():
        alone = [packed_logps(model, b) for b in batches]
    results: dict[int, torch.Tensor] = {}

    def work(k: int) -> None:
        with torch.no_grad():
            for _ in range(2):
                results[k] = packed_logps(model, batches[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, expected in enumerate(alone):
        assert_close(results[k], expected, **TOL)
    assert model.config._attn_implementation == "sdpa"


def test_to_keeps_the_batch() -> None:
    batch = collate_packed(make_pairs([(2, 2, 2), (1, 3, 1)]), PAD_ID, 16)
    moved = batch.to("cpu")
    assert moved.num_pairs == 2
    for name in ("input_ids", "position_ids", "document", "segment", "seq", "row", "pos", "labels", "tokens"):
        assert torch.equal(getattr(moved, name), getattr(batch, name)), name
