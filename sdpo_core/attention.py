"""Shared-prompt attention as two attention calls instead of one over a 4-D mask.

A shared-prompt row is ``[prompt | chosen | rejected | pad]`` (P, C and R tokens). Its two
sequences are each causal on their own:

- A = prompt + chosen is a prefix of the row, so causal attention over the first
  ``max(P + C)`` columns gives every prompt and chosen position its right output.
- The rejected tokens' queries, gathered per row into ``(B, H, max R, D)``, attend to the
  row's prompt + rejected keys and values, gathered into ``(B, Hkv, L, D)`` (``L = max(P + R)``):
  rejected token j of a row sees keys ``0 .. P + j`` of its gathered sequence. The prompt's
  queries are not computed twice: their outputs come from the first call.

Queries and keys reach the attention function already rotated with the layout's position ids
(the rejected tokens' positions continue from the prompt), so both calls see exactly the
sequence that the two-row layout would. The outputs are put back in row order with one row
gather. The first call is square and causal, so it needs no mask (``is_causal``); the second
is ``max R`` queries by L keys, with a small ``(B, 1, max R, L)`` boolean mask, because P
differs between rows. That rectangle is for CPUs, where it measured 1.4x to 2.7x faster than a
square causal call over prompt + rejected, and even with a short prompt and a long rejected
completion (``python -m benchmarks.kernels``; torch's CPU kernel does not skip the masked blocks
of short rows). Elsewhere (:data:`RECTANGLE_DEVICES`) the second call stays square and causal,
so GPUs keep their fused causal kernels (which take no mask with grouped-query attention), and
the rejected outputs are picked from it. Padding at a row's end is seen only by padding queries, and the rejected
columns of a row that fall inside the first call's ``max(P + C)`` columns are seen there only
by queries whose outputs are thrown away.

The function is registered under a private name in transformers' ``AttentionInterface`` and is
selected by swapping ``config._attn_implementation`` of the decoder only while sdpo's own forward
runs (:func:`split_attention`). The layout reaches it through a context variable, not through
the model's keyword arguments: that works whatever a model forwards to its layers, and each
thread (or asyncio task) sees only its own layout. A model that cannot take this path
(:func:`refusal`) keeps the 4-D mask; one that turns out not to during a forward (an attention
call with a feature this does not reproduce, or fewer calls than layers) is recomputed with the
mask by the caller and remembered (under FSDP by every process together, so their parameter
gathers stay paired).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sdpo_core.attn_swap import call_refusal, decoder_refusal, swapped

SPLIT_ATTENTION = "sdpo_shared_prompt"
"""Private name of :func:`split_attention_forward` in transformers' ``AttentionInterface``."""

_REPLACEABLE = ("sdpa", "eager")
RECTANGLE_DEVICES = ("cpu",)
"""Device types on which the rejected queries attend alone (a masked rectangle, see above)."""


@dataclass(frozen=True)
class SplitLayout:
    """Where each shared-prompt row's two sequences lie, for :func:`split_attention_forward`.

    Attributes:
        prefix_width: A = max over rows of P + C: columns [0, A) hold every row's prompt + chosen.
        rejected_index: (B, L) row column of each token of prompt + rejected, L = max(P + R);
            right-padded with column 0 (keys and values of the second call).
        query_index: (B, M) row column of each rejected token, M = max R; right-padded with
            column 0 (queries of the second call).
        query_slot: (B, M) where each rejected token is in its gathered prompt + rejected,
            P + j; padding slots hold 0.
        rejected_mask: (B, 1, M, L) True where rejected query j may attend to gathered key k:
            k <= P + j. Padding query slots see at least the prompt, so no row is all False.
            Only the rectangle of :data:`RECTANGLE_DEVICES` reads it; moving the layout to
            another device drops it (None), as the square call there picks with ``query_slot``.
        output_index: (B, T) for each column, where its output is in the concatenation of the
            prefix outputs and the rejected outputs, (B, A + M, ...): column t < P + C reads t,
            rejected column P + C + j reads A + j, padding reads 0.
    """

    prefix_width: int
    rejected_index: torch.Tensor
    query_index: torch.Tensor
    query_slot: torch.Tensor
    rejected_mask: torch.Tensor | None
    output_index: torch.Tensor

    def to(self, device: torch.device | str) -> SplitLayout:
        mask = self.rejected_mask
        if torch.device(device).type not in RECTANGLE_DEVICES:
            mask = None
        return SplitLayout(
            self.prefix_width,
            self.rejected_index.to(device),
            self.query_index.to(device),
            self.query_slot.to(device),
            None if mask is None else mask.to(device),
            self.output_index.to(device),
        )


@dataclass
class _Run:
    """One forward with split attention: its layout and what the attention calls saw."""

    layout: SplitLayout
    config: Any = None
    calls: int = 0
    problem: str | None = None


_ACTIVE: ContextVar[_Run | None] = ContextVar("sdpo_split_attention", default=None)
# Decoders found unable to take the split path during a forward, with the reason.
_REFUSED: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def _call_problem(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
    layout: SplitLayout,
) -> str | None:
    """Why this attention call cannot be split in two (None: it can)."""
    problem = call_refusal(module, query.shape[2], dropout, kwargs)
    if problem is not None:
        return problem
    if attention_mask is not None:
        return f"{type(module).__name__} got an attention mask of its own"
    b, t = layout.output_index.shape
    if query.shape[0] != b or query.shape[2] != t or key.shape[2] != t or query.shape[1] % key.shape[1]:
        return f"{type(module).__name__} attends with shapes {tuple(query.shape)}, {tuple(key.shape)} for rows of {t}"
    return None


def split_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Shared-prompt attention as two SDPA calls (an ``AttentionInterface`` function).

    Args:
        module: the attention module calling.
        query: (B, H, T, D) rotated queries of the shared-prompt rows.
        key, value: (B, Hkv, T, D) rotated keys and the values; H is a multiple of Hkv (GQA).
        attention_mask: None (no mask is built for this implementation).
        dropout: attention dropout probability; must be 0.
        scaling: the softmax scale (None: 1 / sqrt(D)).
        kwargs: the model's other attention arguments; none that changes the attention may be set.

    Returns:
        (B, T, H, D) attention outputs and None for the weights, as transformers' SDPA gives.
    """
    run = _ACTIVE.get()
    if run is None:
        raise RuntimeError(
            f"sdpo's shared-prompt attention ({SPLIT_ATTENTION!r}) was called outside sdpo's forward: "
            "is the model used by another thread while sdpo computes log-probs with it?"
        )
    layout = run.layout
    problem = _call_problem(module, query, key, attention_mask, dropout, kwargs, layout)
    if problem is not None:
        # This forward is thrown away and recomputed with the 4-D mask: any output of the right shape will do.
        run.problem = run.problem or problem
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    run.calls += 1
    b, h, t, _ = query.shape
    a, m = layout.prefix_width, layout.query_index.shape[1]
    gqa = h != key.shape[1]
    prefix = F.scaled_dot_product_attention(
        query[:, :, :a], key[:, :, :a], value[:, :, :a], is_causal=True, scale=scaling, enable_gqa=gqa
    )  # (B, H, A, D)
    # Row gathers on (B * T, heads * D) views: the projections lay tokens out as rows, so these
    # are copies of whole rows (and their backward adds whole rows), not element-wise indexing.
    offsets = torch.arange(b, device=query.device)[:, None]
    picked = (layout.rejected_index + offsets * t).flatten()  # (B * L,)
    k, v = (_heads(_rows(x).index_select(0, picked), b, x.shape[-1]) for x in (key, value))
    d = query.shape[-1]
    if query.device.type in RECTANGLE_DEVICES and layout.rejected_mask is not None:
        q = _heads(_rows(query).index_select(0, (layout.query_index + offsets * t).flatten()), b, d)
        rejected = _rows(
            F.scaled_dot_product_attention(q, k, v, attn_mask=layout.rejected_mask, scale=scaling, enable_gqa=gqa)
        )  # (B * M, H * D)
    else:
        q = _heads(_rows(query).index_select(0, picked), b, d)
        square = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)  # (B, H, L, D)
        rejected = _rows(square).index_select(0, (layout.query_slot + offsets * k.shape[2]).flatten())
    both = torch.cat([_rows(prefix), rejected])  # (B * A + B * M, H * D)
    # output_index reads [prefix (A) | rejected (M)] of its own row: the same in the stacked rows.
    read = torch.where(layout.output_index < a, offsets * a, b * a + offsets * m - a) + layout.output_index
    return both.index_select(0, read.flatten()).view(b, t, h, -1), None  # (B, T, H, D)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B * T, H * D): one row per token (a view when the heads lie token-major)."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], -1)


def _heads(rows: torch.Tensor, b: int, d: int) -> torch.Tensor:
    """(B * L, H * D) -> (B, H, L, D), the inverse of :func:`_rows`."""
    return rows.view(b, -1, rows.shape[1] // d, d).transpose(1, 2)


def refusal(decoder: torch.nn.Module, width: int) -> str | None:
    """Why ``decoder`` must keep the 4-D mask for rows of ``width`` columns (None: it can split).

    The rule: the decoder dispatches attention through transformers' ``AttentionInterface``
    (``_supports_attention_backend``), with ``sdpa`` or ``eager``, every module of it reads the one
    config that is swapped, and no feature this does not reproduce is on: a sliding window
    narrower than the rows, chunked attention, attention logit softcapping, attention sinks,
    non-causal attention, a sub-config, attention dropout while training, or activation
    checkpointing while training with gradients, unless it recomputes with
    :func:`replay_contexts` (otherwise the backward pass would recompute the layers after the
    config is restored). Nor can compiled layers (``train.compile``): the context variable that
    carries the layout breaks their graph; the 4-D mask compiles. The attention calls check the
    rest during the forward.
    """
    if decoder in _REFUSED:
        return _REFUSED[decoder]
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in decoder.modules()):
        return (
            f"{type(decoder).__name__}'s layers are compiled (train.compile): split attention would break their graph"
        )
    return decoder_refusal(decoder, width, _REPLACEABLE, replays_split_attention, "gradient checkpointing")


def refuse(decoder: torch.nn.Module, reason: str) -> None:
    """Remember that ``decoder`` cannot split attention: :func:`refusal` gives ``reason`` from now on."""
    _REFUSED[decoder] = reason


@contextmanager
def split_attention(decoder: torch.nn.Module, layout: SplitLayout) -> Iterator[_Run]:
    """Within the block, ``decoder``'s attention is :func:`split_attention_forward` over ``layout``.

    ``decoder.config._attn_implementation`` is set to the private name for the block only and
    restored after it (so a saved config, generation and any later forward are as before). The
    name is not an attention-mask implementation, so transformers builds no mask for it. The run
    yielded counts the attention calls and holds the first problem one of them met; the caller
    checks both (:func:`completed`) before it trusts the outputs.

    Thread safety: each thread's layout is its own (a context variable); the config swap is
    counted under a lock, so concurrent sdpo forwards of one model are fine. Another use of the
    same model in another thread during the block meets this function without a layout and fails
    loudly rather than computing something else.
    """
    from transformers import AttentionInterface

    if SPLIT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SPLIT_ATTENTION, split_attention_forward)
    run = _Run(layout, decoder.config)
    with _active(run):
        yield run


@contextmanager
def _active(run: _Run) -> Iterator[None]:
    """Within the block, ``run`` is this context's split-attention run and its config is swapped."""
    token = _ACTIVE.set(run)
    try:
        with swapped(run.config, SPLIT_ATTENTION):
            yield
    finally:
        _ACTIVE.reset(token)


def replay_contexts() -> tuple[Any, Any]:
    """``context_fn`` for ``torch.utils.checkpoint``: a recomputed layer attends as it did.

    Activation checkpointing runs a layer's forward again in the backward pass, after
    :func:`split_attention` has ended. Called when the layer first runs, this captures the
    forward's layout (if any); the second context, entered around the recomputation, puts that
    layout and the swapped config back for its duration. Outside split attention both contexts do
    nothing. :func:`refusal` accepts checkpointed layers only with this function as their
    ``context_fn`` (:func:`sdpo_core.train.enable_activation_checkpointing`).
    """
    run = _ACTIVE.get()
    if run is None:
        return nullcontext(), nullcontext()
    return nullcontext(), _Replay(run)


class _Replay:
    """The recomputation context of one checkpointed layer call: ``run``'s layout and the swapped
    config, entered anew each time (a graph kept with ``retain_graph`` is recomputed per backward)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.entered: list[Any] = []

    def __enter__(self) -> None:
        context = _active(_Run(self.run.layout, self.run.config))
        context.__enter__()
        self.entered.append(context)

    def __exit__(self, *exc: Any) -> None:
        self.entered.pop().__exit__(*exc)


def replays_split_attention(module: torch.nn.Module) -> bool:
    """Whether ``module``'s activation checkpointing recomputes with :func:`replay_contexts`."""
    func = getattr(module, "_gradient_checkpointing_func", None)
    return getattr(func, "keywords", {}).get("context_fn") is replay_contexts


def completed(run: _Run, decoder: torch.nn.Module) -> str | None:
    """Why the outputs of ``run`` cannot be trusted (None: they can).

    Every layer must have called :func:`split_attention_forward` (a model that attends some other
    way would have run with no mask at all) and no call may have met a problem.
    """
    if run.problem is not None:
        return run.problem
    layers = getattr(decoder.config, "num_hidden_layers", None)
    if run.calls == 0 or (layers is not None and run.calls != layers):
        return f"{type(decoder).__name__} called the attention interface {run.calls} times for {layers} layers"
    return None
