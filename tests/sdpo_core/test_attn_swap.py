"""The attention-implementation swap shared by sdpo's attention functions, and causal SDPA for padded rows."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from sdpo_core import attn_swap, causal_attention
from sdpo_core.layouts import TokenizedPair, collate_pairs
from sdpo_core.logprobs import completion_logps


class Cfg:
    _attn_implementation = "sdpa"


def test_swap_restores_after_nested_and_failed_blocks() -> None:
    cfg = Cfg()
    with attn_swap.swapped(cfg, "mine"):
        assert cfg._attn_implementation == "mine" and attn_swap.implementation_of(cfg) == "sdpa"
        with attn_swap.swapped(cfg, "mine"):
            pass
        assert cfg._attn_implementation == "mine"  # the outer forward still runs
    assert cfg._attn_implementation == "sdpa" and not attn_swap._SWAPPED
    with pytest.raises(KeyError), attn_swap.swapped(cfg, "mine"):
        raise KeyError("boom")
    assert cfg._attn_implementation == "sdpa" and not attn_swap._SWAPPED


def test_another_name_while_swapped_fails_loudly() -> None:
    cfg = Cfg()
    inside, release = threading.Event(), threading.Event()

    def forward() -> None:
        with attn_swap.swapped(cfg, "split"):
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=forward)
    thread.start()
    inside.wait(5)
    try:
        with pytest.raises(RuntimeError, match="'split' for another forward"), attn_swap.swapped(cfg, "causal"):
            pass
    finally:
        release.set()
        thread.join()
    assert cfg._attn_implementation == "sdpa"


def _llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg = LlamaConfig(**settings, num_attention_heads=4, num_key_value_heads=2, **overrides)
    return LlamaForCausalLM(cfg).eval()


def test_causal_sdpa_where_it_applies_and_the_same_numbers() -> None:
    assert causal_attention.applies(_llama().get_decoder(), 64)
    eager = _llama(attn_implementation="eager")
    assert not causal_attention.applies(eager.get_decoder(), 64)  # only sdpa is replaced
    assert not causal_attention.applies(None, 64)
    gen = torch.Generator().manual_seed(1)
    pairs = [
        TokenizedPair(*(torch.randint(1, 64, (n,), generator=gen).tolist() for n in lengths))
        for lengths in ((5, 3, 7), (2, 6, 1), (9, 4, 4))
    ]
    batch = collate_pairs(pairs, 0)
    model = _llama()
    calls = []
    original = causal_attention.causal_attention_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        from transformers import AttentionInterface

        AttentionInterface._global_mapping.pop(causal_attention.CAUSAL_ATTENTION, None)
        mp.setattr(causal_attention, "causal_attention_forward", counted)
        got, _ = completion_logps(model, batch)
        AttentionInterface._global_mapping.pop(causal_attention.CAUSAL_ATTENTION, None)
    assert len(calls) == 2 and model.config._attn_implementation == "sdpa"
    # The model's own forward (transformers' mask path) gives the same log-probs.
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    seq, row, pos, labels = batch.targets()
    per_token = logits[row, pos].log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    expected = torch.zeros(len(pairs) * 2).index_add(0, seq, per_token)
    assert_close(got, expected, rtol=0, atol=1e-5)


def test_causal_sdpa_survives_checkpointing_and_a_split_refusal() -> None:
    # A layer recomputed after the forward attends through sdpa with no mask: causal again, so
    # checkpointing (with or without split attention's replay) does not send padded rows back to
    # transformers' mask preparation, nor does split attention being refused (train.compile).
    from sdpo_core import attention
    from sdpo_core.train import activation_checkpointing

    model = _llama().train()
    decoder = model.get_decoder()
    with torch.enable_grad(), activation_checkpointing(model, True):
        assert causal_attention.applies(decoder, 64)
        for layer in decoder.layers:  # a checkpoint without split attention's replay (as under compile)
            layer._gradient_checkpointing_func = torch.utils.checkpoint.checkpoint
        assert attention.refusal(decoder, 64) is not None and causal_attention.applies(decoder, 64)
    attention.refuse(decoder, "test: split attention refused")
    assert causal_attention.applies(decoder, 64)
    assert not causal_attention.applies(_llama(sliding_window=8).get_decoder(), 64)
