"""Padded rows' attention as plain causal SDPA, with no mask for transformers to build.

Padded rows (:class:`sdpo_core.layouts.PairBatch`) reach the model without a padding mask: they
are right-padded, so causal attention alone gives every scored token its right output. Given no
mask, transformers (5.x) still prepares one: it makes position ids and looks in them for packed
sequences (``masking_utils.find_packed_sequence_indices``), which reads a tensor back to the host
once per pass, a GPU sync. For an attention implementation that is not a mask implementation it
prepares nothing. So padded rows go through :func:`causal_attention_forward`, registered under a
private name, which is transformers' own SDPA function called with no mask (causal): the same
kernels and numbers as ``sdpa`` skipping its all-ones mask, without the read.

The name is set on the decoder's config for the forward only (:func:`sdpo_core.attn_swap.swapped`,
counted across threads). A layer recomputed by activation checkpointing after the forward meets
``sdpa`` again with the mask it was given, None: causal SDPA, the same thing. Decoders that
:func:`sdpo_core.attn_swap.decoder_refusal` turns away (a sliding window narrower than the rows, softcapping,
sinks, ...) and implementations other than ``sdpa`` keep transformers' own path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from sdpo_core.attn_swap import decoder_refusal, swapped

CAUSAL_ATTENTION = "sdpo_causal"
"""Private name of :func:`causal_attention_forward` in transformers' ``AttentionInterface``."""


def causal_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with no mask: causal (an ``AttentionInterface`` function)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None:  # transformers builds none for this name: someone passed one
        raise RuntimeError(f"sdpo's causal attention ({CAUSAL_ATTENTION!r}) got an attention mask")
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)


def applies(decoder: torch.nn.Module | None, width: int) -> bool:
    """Whether rows of ``width`` columns may take :func:`causal_attention_forward` in ``decoder``.

    The rule of :func:`sdpo_core.attn_swap.decoder_refusal` for ``sdpa`` decoders, with any
    activation checkpointing: a layer recomputed after the forward attends through ``sdpa`` with
    the mask it was given, None, which is causal SDPA again (no replay is needed, unlike split
    attention; a decoder split attention refused, e.g. under ``train.compile``, is not refused here).
    """
    if decoder is None:
        return False
    return decoder_refusal(decoder, width, ("sdpa",), lambda _layer: True, "") is None


def causal_attention(decoder: torch.nn.Module | None, width: int) -> Any:
    """A context in which ``decoder`` attends with :func:`causal_attention_forward` where it
    :func:`applies`; a context that changes nothing otherwise."""
    if not applies(decoder, width):
        return nullcontext()
    return _causal(decoder)


@contextmanager
def _causal(decoder: torch.nn.Module) -> Iterator[None]:
    from transformers import AttentionInterface

    if CAUSAL_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(CAUSAL_ATTENTION, causal_attention_forward)
    with swapped(decoder.config, CAUSAL_ATTENTION):
        yield
