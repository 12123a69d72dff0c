"""Regional ``torch.compile``: each decoder layer compiled in place, for the length of a block.

Eager Hugging Face decoders launch many small kernels per layer (norms, rotary embeddings,
activations, residual adds); on a GPU a train step is bound by the host that launches them.
Compiling the decoder layers fuses those into few kernels. Only the layers are compiled, not the
whole model: every layer of a decoder runs the same code with the same shapes, so one graph
serves them all and compiles once (dynamo caches graphs by code object, which the layers of one
class share, and treats each layer's parameters as inputs rather than constants: 5 layers of the
tiny Llama give 1 graph), while the embeddings, the log-prob head and sdpo's own indexing stay
eager and free to vary.

Shapes. Graphs are compiled for static shapes by default (each new (rows, width) of the
layers' input compiles once more; :func:`compile_stats` counts them), so rows should be padded
to a few widths (:func:`bucket_width`) for shapes to repeat. Train mode, eval mode, grad mode
and autocast each get graphs of their own too.

Attention. The compiled region holds the attention call, so what it calls must trace without a
graph break: SDPA's causal path does, and so does FlexAttention with its block mask passed in
the attention arguments; sdpo's split attention (:mod:`sdpo_core.attention`) reads its layout
from a context variable, which dynamo cannot trace, and fails here with a :class:`CompileError`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

MIN_BUCKET = 64
"""The narrowest width :func:`bucket_width` pads to."""
RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep for the layers' code within :func:`compiled_layers` (its default, 8,
is soon reached with static shapes: one graph per bucket, per row count, per train/eval mode)."""


class CompileError(RuntimeError):
    """The decoder layers cannot be compiled (``train.compile`` must be off for this model)."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model``: instances of the classes its ``_no_split_modules`` names.

    Raises:
        CompileError: the model names no such class, or has no module of one.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    # By the class's ancestry, not its name: FSDP's fully_shard makes each layer an instance of a
    # subclass of its own (FSDPLlamaDecoderLayer).
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise CompileError(
            f"train.compile: {type(model).__name__} names no decoder layer class (_no_split_modules: "
            f"{sorted(names) or 'none'}) with modules in the model; set train.compile=false"
        )
    return layers


def bucket_width(width: int) -> int:
    """The width to pad a row of ``width`` tokens to, so that few distinct shapes occur.

    Buckets are ``2**k`` and ``1.5 * 2**k`` (64, 96, 128, 192, 256, 384, 512, 768, 1024, ...),
    at least :data:`MIN_BUCKET`: two per doubling, so rows up to 512 tokens take at most 7 shapes
    and 4096 at most 13. Above 64 the padding is under a third of the padded width (worst just
    past a power of two p: p + 1 padded to 1.5p) and under a quarter just past 1.5p; averaged
    over widths spread evenly in a doubling it is about 14.5%. Each bucket is a multiple of 32 (of
    64 from 128 on), which suits the matmul tiles of GPUs.

    Args:
        width: the row's length in tokens, at least 0.

    Returns:
        The smallest bucket at least ``width``.
    """
    if width < 0:
        raise ValueError(f"bucket_width: width {width} < 0")
    if width <= MIN_BUCKET:
        return MIN_BUCKET
    power = 1 << (width - 1).bit_length()  # the smallest power of two >= width
    three_halves = 3 * power // 4  # 1.5 times the power of two below
    return three_halves if width <= three_halves else power


@contextmanager
def compiled_layers(
    model: torch.nn.Module,
    enabled: bool,
    backend: str = "inductor",
    *,
    dynamic: bool | None = False,
    fullgraph: bool = True,
) -> Iterator[None]:
    """Within the block, each decoder layer of ``model`` is compiled (when ``enabled``); after it,
    whatever happened, each is plain again.

    ``nn.Module.compile`` puts a compiled call in each layer; nothing else about the model
    changes (its parameters, state dict, hooks and class stay), so DDP (which wraps the whole
    policy) and FSDP's ``fully_shard`` (which hooks each layer) may be applied before or after
    the block is entered (both orders checked with one-process groups: same log-probs and
    gradients, one graph, no graph break). Activation checkpointing is turned on before the
    block: under transformers 5.17 the checkpoint wraps the compiled call and runs eagerly; from
    5.24 on it is inside the layer's forward and dynamo traces it (see :func:`_drop_context_fn`).

    Args:
        model: the Hugging Face model itself (it names its layer classes), not a wrapper of it.
        enabled: compile (``train.compile``); False makes the block a no-op.
        backend: torch.compile's backend ("inductor"; "aot_eager" traces without generating
            kernels, for tests).
        dynamic: torch.compile's ``dynamic``: False compiles one graph per input shape (pad rows
            with :func:`bucket_width`); None lets a shape that changes become symbolic.
        fullgraph: a graph break in a layer is an error (:class:`CompileError`) rather than a
            silent split into several graphs with eager code between them.

    Raises:
        CompileError: the model has no decoder layers, or compiling one failed in the block.
    """
    if not enabled:
        yield
        return
    layers = decoder_layers(model)
    name = type(layers[0]).__name__
    saved = [(layer._compiled_call_impl, getattr(layer, "_gradient_checkpointing_func", None)) for layer in layers]
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.cache_size_limit)
    try:
        for layer in layers:
            _drop_context_fn(layer)
            layer.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        with torch._dynamo.config.patch(cache_size_limit=limit):
            yield
    except torch._dynamo.exc.TorchDynamoException as exc:
        # A graph break under fullgraph (Unsupported) and a backend's failure alike.
        raise CompileError(
            f"train.compile: torch.compile (backend {backend!r}) failed on {name}: {_reason(exc)}; "
            "set train.compile=false"
        ) from exc
    finally:
        for layer, (call, func) in zip(layers, saved, strict=True):
            layer._compiled_call_impl = call  # nn.Module.compile's only trace: the call __call__ prefers
            if func is not None:
                layer._gradient_checkpointing_func = func


def _drop_context_fn(layer: torch.nn.Module) -> None:
    """Make ``layer``'s activation checkpointing (if any) recompute without a ``context_fn``.

    transformers from 5.24 on checkpoints inside the layer's forward, so dynamo traces
    ``torch.utils.checkpoint`` there, and it takes only a ``context_fn`` that makes torch dispatch
    modes (selective checkpointing). sdpo's (:func:`sdpo_core.attention.replay_contexts`) exists
    for split attention, which never runs in compiled layers (its context variable breaks the
    graph); without it, :func:`sdpo_core.attention.refusal` sends shared-prompt batches to the
    4-D mask. Under 5.17 the checkpoint wraps the compiled call and runs eagerly either way.
    """
    func = getattr(layer, "_gradient_checkpointing_func", None)
    if isinstance(func, functools.partial) and "context_fn" in func.keywords:
        keywords = {key: value for key, value in func.keywords.items() if key != "context_fn"}
        layer._gradient_checkpointing_func = functools.partial(func.func, *func.args, **keywords)


def _reason(exc: BaseException) -> str:
    """The innermost cause of ``exc``: its type and first lines (a backend's failure wraps another)."""
    inner = getattr(exc, "inner_exception", None) or exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    # Dynamo's Unsupported says what in its first line and why in its second ("Explanation: ...").
    return f"{type(inner).__name__}: {' '.join(lines[:2]) if lines else '(no message)'}"


def compile_stats() -> dict[str, int]:
    """Dynamo's counts so far in this process, for a benchmark's record.

    Returns:
        ``graphs``: graphs compiled and ``graph_breaks``: graph breaks met (dynamo's counters,
        which ``torch._dynamo.reset`` keeps); ``recompiles``: graphs that dynamo's caches hold for
        code that had one already (a guard failed: a new shape, train/eval mode, grad mode or
        dtype; emptied by ``torch._dynamo.reset``). A count this version of torch does not keep
        is -1.
    """
    try:
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
    except (ImportError, AttributeError, KeyError, TypeError):
        graphs = breaks = -1
    return {"graphs": graphs, "recompiles": _recompiles(), "graph_breaks": breaks}


def _recompiles() -> int:
    """Cache entries beyond each code object's first, over the code dynamo has compiled (-1: this
    torch does not expose them)."""
    try:
        from torch._dynamo.convert_frame import input_codes
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        codes = [ref() for ref in list(input_codes.seen)]
        return sum(max(len(_debug_get_cache_entry_list(code)) - 1, 0) for code in codes if code is not None)
    except (ImportError, AttributeError, TypeError):
        return -1
