"""Attention for packed shared-prompt rows: FlexAttention over a block mask.

A packed row holds several pairs, each as ``[prompt | chosen | rejected]``, then padding (see
:mod:`sdpo_core.packed`). Every token carries its pair's slot in the row (``document``, -1 for
padding) and its segment (:data:`PROMPT`, :data:`CHOSEN`, :data:`REJECTED`, :data:`PAD`). A query
may attend to a key when both are in the same pair, the key is not after the query, and the
query is not a rejected token looking at a chosen one (:func:`packed_mask_mod`). Positions
(rotary) are the layout's ``position_ids``, so both completions continue from their prompt.

The mask reaches the attention as the model's own ``attention_mask`` argument: transformers
returns a 4-D mask or a ``BlockMask`` as it is, and builds none for :data:`PACKED_ATTENTION`,
which is not an attention-mask implementation. The function is registered under that private
name in transformers' ``AttentionInterface`` and selected by swapping the decoder's
``config._attn_implementation`` for sdpo's forward only (:func:`swapped`). Nothing travels through
a context variable, so the function can be traced inside compiled decoder layers.

Two forms of the one mask: a ``BlockMask`` for ``flex_attention`` (blocks of other pairs and of
padding are skipped; compiled once per process on CUDA, where eager flex is dense and slow), and
where torch's flex cannot differentiate (:data:`NO_FLEX_BACKWARD`, CPUs) while gradients are on,
a dense boolean ``(rows, 1, L, L)`` mask for SDPA, computed by the same mask function.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from sdpo_core.attn_swap import call_refusal, decoder_refusal, swapped

PACKED_ATTENTION = "sdpo_packed"
"""Private name of :func:`packed_attention_forward` in transformers' ``AttentionInterface``."""

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
"""Segment of each token of a packed row."""

COMPILED_FLEX_DEVICES = ("cuda",)
"""Device types where the block mask goes to the compiled ``flex_attention`` (eager elsewhere)."""

NO_FLEX_BACKWARD = ("cpu", "mps")
"""Device types where torch's ``flex_attention`` refuses a backward pass (dense SDPA instead)."""

# Implementations whose attention this replaces exactly (the same softmax attention).
_REPLACEABLE = ("sdpa", "eager", "flex_attention")


class PackedUnsupported(ValueError):
    """The model cannot compute packed rows exactly; the message names the model and the feature."""


def packed_mask_mod(document: torch.Tensor, segment: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The mask function of packed rows (``flex_attention``'s ``mask_mod`` signature).

    Args:
        document: (rows, L) the pair slot of each token in its row; -1 for padding.
        segment: (rows, L) :data:`PROMPT`, :data:`CHOSEN`, :data:`REJECTED` or :data:`PAD`.

    Returns:
        ``mask_mod(b, h, q, kv)``: True where query column q of row b may attend to key column kv.
        Padding attends causally to the padding before it, so no query row is empty.
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        same_pair = document[b, q] == document[b, kv]
        rejected_sees_chosen = (segment[b, q] == REJECTED) & (segment[b, kv] == CHOSEN)
        return same_pair & (kv <= q) & ~rejected_sees_chosen

    return mask_mod


def block_mask(document: torch.Tensor, segment: torch.Tensor) -> BlockMask:
    """The ``BlockMask`` of packed rows, built on their device (see :func:`packed_mask_mod`)."""
    rows, width = document.shape
    return create_block_mask(packed_mask_mod(document, segment), rows, None, width, width, device=document.device)


def dense_mask(document: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """(rows, 1, L, L) booleans of the same mask function, evaluated on broadcast indices."""
    rows, width = document.shape
    cols = torch.arange(width, device=document.device)
    b = torch.arange(rows, device=document.device)[:, None, None, None]
    return packed_mask_mod(document, segment)(b, 0, cols[None, None, :, None], cols[None, None, None, :])


_COMPILED_FLEX: Callable[..., torch.Tensor] | None = None
_COMPILE_LOCK = threading.Lock()


def _compiled_flex() -> Callable[..., torch.Tensor]:
    """``flex_attention`` compiled once per process, on first use (for :data:`COMPILED_FLEX_DEVICES`
    outside compiled layers: eager flex materializes the whole score matrix). The row length is fixed per
    run; a second row count makes torch mark the batch dimension dynamic, so it compiles about
    twice, not once per count."""
    global _COMPILED_FLEX
    with _COMPILE_LOCK:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def _call_problem(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: Any,
    dropout: float,
    kwargs: dict[str, Any],
) -> str | None:
    """Why this attention call cannot attend over packed rows (None: it can)."""
    name = type(module).__name__
    problem = call_refusal(module, query.shape[2], dropout, kwargs)
    if problem is not None:
        return problem
    rows, width = query.shape[0], query.shape[2]
    if isinstance(attention_mask, BlockMask):
        shape = attention_mask.shape
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        shape = tuple(attention_mask.shape)
    else:
        return f"{name} got attention_mask of type {type(attention_mask).__name__}, not the packed rows' mask"
    if len(shape) != 4 or shape[0] != rows or shape[2:] != (width, key.shape[2]) or query.shape[1] % key.shape[1]:
        return f"{name} attends with shapes {tuple(query.shape)}, {tuple(key.shape)} for a mask of {tuple(shape)}"
    return None


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over packed rows (an ``AttentionInterface`` function).

    Args:
        module: the attention module calling.
        query: (rows, H, L, D) rotated queries.
        key, value: (rows, Hkv, L, D) rotated keys and the values; H is a multiple of Hkv (GQA).
        attention_mask: the rows' ``BlockMask`` (flex) or (rows, 1, L, L) booleans (SDPA).
        dropout: attention dropout probability; must be 0.
        scaling: the softmax scale (None: 1 / sqrt(D)).
        kwargs: the model's other attention arguments; none that changes the attention may be set.

    Returns:
        (rows, L, H, D) attention outputs and None for the weights, as transformers' SDPA gives.

    Raises:
        PackedUnsupported: the call has a feature this does not reproduce, or no packed mask.
    """
    problem = _call_problem(module, query, key, attention_mask, dropout, kwargs)
    if problem is not None:
        raise PackedUnsupported(f"the packed shared-prompt layout cannot run this model: {problem}")
    gqa = query.shape[1] != key.shape[1]
    if isinstance(attention_mask, BlockMask):
        args = (query, key, value)
        if torch.compiler.is_compiling():  # inside compiled layers: traced into their graph
            out = flex_attention(*args, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)
        elif query.device.type in COMPILED_FLEX_DEVICES:
            out = _compiled_flex()(*args, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)
        else:
            with warnings.catch_warnings():  # eager flex is chosen here (tests, CPU scoring): no advice needed
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = flex_attention(*args, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None  # (rows, L, H, D)


def register() -> None:
    """Register :func:`packed_attention_forward` as :data:`PACKED_ATTENTION` (once per process)."""
    from transformers import AttentionInterface

    if PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)


def refusal(decoder: torch.nn.Module, row_tokens: int) -> str | None:
    """Why ``decoder`` cannot compute packed rows of ``row_tokens`` exactly (None: it can).

    The rule: the decoder dispatches attention through transformers' ``AttentionInterface``
    (``_supports_attention_backend``) with ``sdpa``, ``eager`` or ``flex_attention``; every module
    reads the one config that is swapped; no feature this does not reproduce is on: a sliding
    window narrower than the rows, chunked attention, attention logit softcapping, attention sinks,
    non-causal attention, layers of other kinds, a sub-config, attention dropout while training,
    or activation checkpointing other than torch's non-reentrant checkpoint while training with
    gradients (:func:`replaying` needs its ``context_fn``). The attention calls check the rest.
    """
    return decoder_refusal(
        decoder,
        row_tokens,
        _REPLACEABLE,
        lambda module: _checkpoint_settings(module) is not None,
        "with reentrant or custom activation checkpointing: only torch's non-reentrant checkpoint can replay "
        "packed attention",
    )


def _checkpoint_settings(module: torch.nn.Module) -> functools.partial | None:
    """``module``'s checkpoint function where it is torch's non-reentrant checkpoint with settings
    (transformers' ``partial(checkpoint, use_reentrant=False, ...)``), else None."""
    func = getattr(module, "_gradient_checkpointing_func", None)
    if not isinstance(func, functools.partial) or func.keywords.get("use_reentrant") is not False:
        return None
    return func


class _Replay:
    """The recomputation context of one checkpointed layer call: the caller's own recomputation
    context, and the config swapped as in the forward (entered anew each time: a graph kept with
    ``retain_graph`` is recomputed per backward)."""

    def __init__(self, cfg: Any, inner: Any) -> None:
        self.cfg, self.inner = cfg, inner
        self.entered: list[Any] = []

    def __enter__(self) -> None:
        self.inner.__enter__()
        context = swapped(self.cfg, PACKED_ATTENTION)
        context.__enter__()
        self.entered.append(context)

    def __exit__(self, *exc: Any) -> None:
        try:
            self.entered.pop().__exit__(*exc)
        finally:
            self.inner.__exit__(*exc)


@contextmanager
def replaying(decoder: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``decoder``'s checkpointed layers record a recomputation that swaps the
    config again: activation checkpointing runs a layer's forward again in the backward pass,
    after :func:`swapped` has ended; the packed mask is one of the layer's arguments, which the
    checkpoint keeps. Each layer's own ``context_fn`` (e.g. split attention's replay) still runs.
    The layers' checkpoint functions are restored after the block."""
    cfg = decoder.config
    saved = []
    for module in decoder.modules():
        func = _checkpoint_settings(module) if getattr(module, "gradient_checkpointing", False) else None
        if func is None:
            continue
        own = func.keywords.get("context_fn") or (lambda: (nullcontext(), nullcontext()))

        def context_fn(own: Callable[[], tuple[Any, Any]] = own) -> tuple[Any, Any]:
            forward_context, recompute_context = own()
            return forward_context, _Replay(cfg, recompute_context)

        saved.append((module, func))
        module._gradient_checkpointing_func = functools.partial(func, context_fn=context_fn)
    try:
        yield
    finally:
        for module, func in saved:
            module._gradient_checkpointing_func = func
