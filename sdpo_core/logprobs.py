"""Per-sequence completion log-probabilities without a full copy of the logits.

log m(y|x) sums the log-probabilities of the completion tokens only; the prompt and padding are
masked. Only the hidden states at completion positions go through the output projection, in
chunks of rows, and each chunk's log-prob is ``gather(logits, label) - logsumexp(logits)``
(no log-softmax tensor). While training, each chunk is recomputed in the backward pass
(activation checkpointing), so at most one chunk of logits, ``(chunk_rows, V)``, is ever alive.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from sdpo_core import attention
from sdpo_core.causal_attention import causal_attention
from sdpo_core.collectives import max_over_processes
from sdpo_core.compiling import compiled_layers

# The batch layouts live in sdpo_core.layouts; they are importable from here as before.
from sdpo_core.layouts import (  # noqa: F401
    Batch,
    PairBatch,
    SharedPromptBatch,
    TokenizedPair,
    collate,
    collate_pairs,
    collate_shared,
    pair_length,
    pass_tokens,
    split_by_tokens,
    to_device,
)
from sdpo_core.packed import PackedBatch
from sdpo_core.passes import PassLayout


def token_logps(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_rows: int) -> torch.Tensor:
    """Log-prob of each label under ``head(hidden)``, computed in row chunks.

    Args:
        hidden: (N, D) hidden states at the positions that predict ``labels``.
        labels: (N,) target token ids.
        head: the output projection, D -> V.
        chunk_rows: rows per chunk; bounds the live logits to (chunk_rows, V).

    Returns:
        (N,) float32 log-probs.
    """

    def chunk_logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()  # (n, V)
        return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    outs = []
    # With a single chunk the logits are as small as a chunk anyway: no need to recompute them.
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk_rows
    for start in range(0, hidden.shape[0], chunk_rows):
        h, y = hidden[start : start + chunk_rows], labels[start : start + chunk_rows]
        if recompute:
            outs.append(checkpoint(chunk_logps, h, y, use_reentrant=False))
        else:
            outs.append(chunk_logps(h, y))
    if not outs:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(outs)


def _has_plain_head(model: torch.nn.Module) -> bool:
    """Whether logits are exactly ``output_embeddings(last_hidden_state)`` (no scaling or capping)."""
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def _forward(model: torch.nn.Module, net: torch.nn.Module, batch: Batch | PackedBatch) -> Any:
    """``net``'s output on ``batch`` (``net`` is ``model`` or its decoder).

    A shared-prompt batch takes split attention (two calls, no (B, 1, T, T) mask) where the decoder
    allows it, and the 4-D mask otherwise; a forward in which split attention turned out not to
    apply is done again with the mask, and the decoder is not tried again. A packed batch runs
    its own forward, with its block mask (:meth:`~sdpo_core.packed.PackedBatch.forward`); padded
    rows take causal SDPA with no mask prepared (:mod:`sdpo_core.causal_attention`).
    """
    if isinstance(batch, PackedBatch):
        return batch.forward(net)
    if isinstance(batch, SharedPromptBatch):
        out = _split_forward(model, net, batch)
        if out is not None:
            return out
    inputs = batch.model_inputs()
    implementation = getattr(getattr(net, "config", None), "_attn_implementation", None)
    if isinstance(batch, SharedPromptBatch) and implementation == "eager":
        # Eager attention adds the mask to the scores as it is: a boolean mask would add 0 or 1.
        dtype = getattr(net, "dtype", torch.float32)
        allowed = inputs["attention_mask"]
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        inputs["attention_mask"] = blocked.masked_fill(~allowed, torch.finfo(dtype).min)
    attend = nullcontext()
    if isinstance(batch, PairBatch):  # causal SDPA with no mask prepared (and no host read) where it applies
        attend = causal_attention(
            model.get_decoder() if hasattr(model, "get_decoder") else None, batch.input_ids.shape[1]
        )
    with attend:
        return net(**inputs, use_cache=False)


def _split_forward(model: torch.nn.Module, net: torch.nn.Module, batch: SharedPromptBatch) -> Any | None:
    """``net``'s output with split attention; None where the decoder cannot take it.

    Under FSDP every process must take the same path in each pass: each FSDP unit gathers its
    parameters in every forward, so a process that did its forward again with the mask alone
    would pair its gathers with the other processes' next collectives (a hang). So the processes
    judge the pass by its widest row in any process (a sliding window narrower than that refuses
    everywhere), and a problem met during one process's forward sends all of them to the mask.
    All processes run as many passes (see :func:`sdpo_core.train.train_dpo`), so these two small
    all-reduces pair up. DDP and one process have no collective in the forward and need neither.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        return None
    device = batch.input_ids.device
    sharded = _fsdp_units(decoder)
    width = max_over_processes(batch.input_ids.shape[1], device) if sharded else batch.input_ids.shape[1]
    if attention.refusal(decoder, width) is not None:
        return None
    with attention.split_attention(decoder, batch.split) as run:
        out = net(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    problem = attention.completed(run, decoder)
    if sharded and max_over_processes(int(problem is not None), device) and problem is None:
        problem = "another process's forward could not split attention in the same pass"
    if problem is None:
        return out
    warnings.warn(f"shared-prompt batches fall back to a 4-D attention mask: {problem}", stacklevel=4)
    attention.refuse(decoder, problem)
    return None


def _fsdp_units(decoder: torch.nn.Module) -> bool:
    """Whether ``decoder`` holds FSDP units (its processes gather parameters in each forward)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in decoder.modules())


def completion_logps(
    model: torch.nn.Module, batch: Batch | PackedBatch, chunk_rows: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion token counts for each sequence.

    Nothing here reads a value back to the host: the scored tokens and the counts come with the
    batch, built at collation (:mod:`sdpo_core.layouts`).

    Args:
        model: a Hugging Face causal LM.
        batch: B pairs in either layout, on the model's device.
        chunk_rows: completion tokens per chunk of the output projection.

    Returns:
        logps: (2B,) float32, sum over completion tokens of log p(token | prompt, earlier
            tokens); chosen sequences first, then rejected.
        tokens: (2B,) number of completion tokens per sequence (the batch's own).
    """
    seq, rows, cols, labels = batch.targets()  # (N,) each
    if _has_plain_head(model):
        out = _forward(model, model.get_decoder(), batch)
        hidden = out.last_hidden_state[rows, cols]  # (N, D)
        per_token = token_logps(hidden, labels, model.get_output_embeddings(), chunk_rows)
    else:
        # Models that post-process their logits: take them as the model gives them.
        logits = _forward(model, model, batch).logits
        per_token = token_logps(logits[rows, cols], labels, torch.nn.Identity(), chunk_rows)  # (N, V) in
    num_seqs = 2 * batch.num_pairs
    logps = torch.zeros(num_seqs, dtype=torch.float32, device=per_token.device).index_add(0, seq, per_token)
    return logps, batch.tokens


def score_passes(
    pairs: Sequence[TokenizedPair], batch_size: int, max_tokens: int | None, layout: PassLayout
) -> list[list[int]]:
    """Pair indices of each forward-only pass, length-sorted (short pairs are not padded to long ones).

    With ``max_tokens``, a pass takes pairs while its rows times its widest row stay within the
    budget (a pair over it goes alone; packed: ``max_tokens // row_tokens`` rows), whatever
    ``batch_size``; else ``batch_size`` pairs a pass.
    """
    order = layout.order(range(len(pairs)), pairs)
    if max_tokens is not None:
        return layout.passes(order, pairs, max_tokens)
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [piece for chunk in chunks for piece in layout.passes(chunk, pairs, None)]


def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    batch_size: int,
    chunk_rows: int = 2048,
    device: torch.device | str = "cpu",
    shared_prompt: bool | str = False,
    progress: Callable[[int, int], None] | None = None,
    max_tokens: int | None = None,
    row_tokens: int = 2048,
    compiled: bool = False,
) -> dict[str, torch.Tensor]:
    """Forward-only log-probs of every pair, in passes (used for reference log-probs and eval).

    ``shared_prompt`` picks the batch layout (true: :class:`SharedPromptBatch`, false:
    :class:`PairBatch`, ``"packed"``: :class:`~sdpo_core.packed.PackedBatch` in rows of at least
    ``row_tokens``); ``max_tokens`` (else ``batch_size`` pairs) sizes the passes (:func:`score_passes`).
    ``compiled`` (``train.compile``) runs the decoder layers compiled, on bucketed widths, as the
    policy trains: in bf16 the compiled kernels round otherwise than eager ones, and a reference
    scored eagerly would not give h = 0 at the start of a step.
    ``progress(done, total)`` is called with the pairs scored so far after each pass is queued.
    The passes run under ``inference_mode``; their log-probs stay on the device and reach the
    host in one copy at the end.

    Returns:
        ``chosen`` and ``rejected`` (N,) summed log-probs; ``chosen_tokens`` and
        ``rejected_tokens`` (N,) completion lengths; ordinary tensors (not inference tensors:
        autograd code may use them), in the order of ``pairs``.
    """
    if not pairs:
        empty = torch.zeros(0)
        return {"chosen": empty, "rejected": empty, "chosen_tokens": empty.long(), "rejected_tokens": empty.long()}
    was_training = model.training
    model.eval()
    layout = PassLayout.of(shared_prompt, pairs, row_tokens, bucketed=compiled)
    passes = score_passes(pairs, batch_size, max_tokens, layout)
    n = len(pairs)
    order = torch.tensor([i for ids in passes for i in ids], dtype=torch.long)  # pass order -> pair
    tokens = torch.empty(2, n, dtype=torch.long)  # (chosen, rejected) x pass order, from the host batches
    try:
        # Scoring passes are cut by a token budget, so their row counts vary: a shape that changes
        # becomes symbolic (dynamic=None) instead of compiling once per (rows, width).
        with torch.inference_mode(), compiled_layers(model, compiled, dynamic=None):
            logps = torch.empty(2, n, dtype=torch.float32, device=device)  # (chosen, rejected) x pass order
            done = 0
            for ids in passes:
                b = len(ids)
                host = layout.collate([pairs[i] for i in ids], pad_id)
                tokens[:, done : done + b] = host.tokens.view(2, b)
                logps[:, done : done + b] = completion_logps(model, host.to(device), chunk_rows)[0].view(2, b)
                done += b
                if progress is not None:
                    progress(done, n)
            on_host = logps.cpu()  # the one device -> host copy
    finally:
        model.train(was_training)
    # Written outside inference mode, these are ordinary tensors (each its own storage, as a
    # safetensors file wants), in the order of ``pairs``.
    out = {}
    for key, rows, dtype in (("", on_host, torch.float32), ("_tokens", tokens, torch.long)):
        for k, name in enumerate(("chosen", "rejected")):
            out[name + key] = torch.empty(n, dtype=dtype)
            out[name + key][order] = rows[k]
    return out
