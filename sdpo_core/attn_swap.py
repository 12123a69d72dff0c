"""The attention implementation a model's config names, swapped for the length of sdpo's forward.

sdpo's own attention functions (split attention for shared-prompt rows, causal SDPA for padded
rows, FlexAttention for packed rows) are registered in transformers' ``AttentionInterface`` under
private names, and a decoder uses one by naming it in ``config._attn_implementation`` while
sdpo's forward runs; after it the config names what it did before, so a saved config, generation
and any later forward are as they were.

One registry for all of them: forwards of one model in several threads are counted, so the last
to end restores the config, and a forward that wants another name while the config is swapped
fails loudly rather than running the other thread's attention.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Swapped configs: id -> (config, implementation before, name swapped in, forwards inside).
_SWAPPED: dict[int, tuple[Any, str, str, int]] = {}
_LOCK = threading.Lock()


def implementation_of(cfg: Any) -> str | None:
    """``cfg``'s attention implementation as it is outside sdpo's forwards (which swap it)."""
    with _LOCK:
        entry = _SWAPPED.get(id(cfg))
    return entry[1] if entry is not None else getattr(cfg, "_attn_implementation", None)


@contextmanager
def swapped(cfg: Any, name: str) -> Iterator[None]:
    """``cfg._attn_implementation`` is ``name`` within the block, and what it was after it.

    Raises:
        RuntimeError: another thread's forward has the config swapped to another name.
    """
    with _LOCK:
        _, before, current, depth = _SWAPPED.get(id(cfg), (cfg, cfg._attn_implementation, name, 0))
        if current != name:
            raise RuntimeError(
                f"the model's attention is {current!r} for another forward running now; "
                f"sdpo cannot use {name!r} with the same model at the same time"
            )
        _SWAPPED[id(cfg)] = (cfg, before, name, depth + 1)
        cfg._attn_implementation = name
    try:
        yield
    finally:
        with _LOCK:
            _, before, _, depth = _SWAPPED.pop(id(cfg))
            if depth > 1:
                _SWAPPED[id(cfg)] = (cfg, before, name, depth - 1)
            else:
                cfg._attn_implementation = before


# Config attributes that, when set, mean an attention sdpo's functions do not reproduce (a sliding
# window is checked apart: one at least as wide as the rows restricts nothing).
CONFIG_FEATURES = ("attention_chunk_size", "attn_logit_softcapping")
CONFIG_DROPOUTS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
# Attention-call keyword arguments that, when not None, mean the same.
CALL_FEATURES = ("softcap", "s_aux", "sinks", "position_bias", "alibi", "window_size", "attention_chunk_size")


def decoder_refusal(
    decoder: Any,
    width: int,
    implementations: tuple[str, ...],
    replays: Callable[[Any], bool],
    checkpointing: str,
) -> str | None:
    """Why ``decoder`` cannot swap in one of sdpo's attention functions for rows of ``width``
    tokens (None: it can); the rule split and packed attention share.

    The decoder dispatches attention through transformers' ``AttentionInterface``
    (``_supports_attention_backend``) with one of ``implementations``, every module of it reads
    the one config that is swapped, and no feature the functions do not reproduce is on: a sliding
    window narrower than the rows, chunked attention, attention logit softcapping, attention sinks,
    non-causal attention, layers of other kinds, a sub-config, attention dropout while training,
    or activation checkpointing (while training with gradients) of a layer for which ``replays``
    is false (``checkpointing`` says why that matters).
    """
    import torch

    name = type(decoder).__name__
    if not getattr(decoder, "_supports_attention_backend", False):
        return f"{name} does not dispatch attention through transformers' AttentionInterface"
    cfg = getattr(decoder, "config", None)
    implementation = implementation_of(cfg)  # swapped by a forward in another thread: what it was before counts
    if implementation not in implementations:
        return f"{name} uses attention implementation {implementation!r}, not one of {implementations}"
    if getattr(cfg, "sub_configs", None):
        return f"{name}'s config has sub-configs"
    if not getattr(cfg, "is_causal", True):
        return f"{name} is not causal"
    for attr in CONFIG_FEATURES:
        if getattr(cfg, attr, None) not in (None, False, 0):
            return f"{name}'s config sets {attr}={getattr(cfg, attr)!r}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < width:
        return f"{name}'s config sets sliding_window={window} < {width} columns"
    kinds = set(getattr(cfg, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        return f"{name} has layers other than full or sliding-window attention: {sorted(kinds)}"
    if decoder.training:
        for attr in CONFIG_DROPOUTS:
            if getattr(cfg, attr, None):
                return f"{name} trains with attention dropout ({attr}={getattr(cfg, attr)!r})"
    for module in decoder.modules():
        if getattr(module, "config", cfg) is not cfg:
            return f"{type(module).__name__} in {name} has a config of its own"
        if hasattr(module, "sinks"):
            return f"{type(module).__name__} in {name} has attention sinks"
        checkpointed = getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled()
        if checkpointed and not replays(module):
            return f"{name} recomputes its layers in the backward pass ({checkpointing})"
    return None


def call_refusal(module: Any, width: int, dropout: float, kwargs: dict[str, Any]) -> str | None:
    """Why one attention call (of ``module``, over rows of ``width`` tokens) has a feature sdpo's
    attention functions do not reproduce (None: it has none); each function checks its own
    mask and shapes after this."""
    name = type(module).__name__
    for feature in CALL_FEATURES:
        if kwargs.get(feature) is not None:
            return f"{name} passes {feature}"
    window = kwargs.get("sliding_window")
    if window is not None and window < width:
        return f"{name} has a sliding window of {window} < {width} columns"
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        return f"{name} is not causal"
    if hasattr(module, "sinks"):
        return f"{name} has attention sinks"
    if dropout:
        return f"{name} uses attention dropout {dropout}"
    return None
