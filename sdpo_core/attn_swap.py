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
from collections.abc import Iterator
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
