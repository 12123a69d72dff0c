"""Sampling completions from a causal LM with fixed seeds, batched, on the CPU or a GPU.

:func:`sample_completions` continues each prompt ``n`` times. Every (prompt, sample index) has its
own ``torch.Generator``, seeded from the run seed, the sample index and the prompt's text, and
draws exactly one uniform number per generated token, whatever else shares its batch. So:

- the samples do not depend on ``batch_size`` nor on the order or company of the prompts, up to
  floating-point rounding: a batch's size can change a logit in its last bits, and that flips a
  draw that falls within that distance of a boundary (in float32, 2 of 1680 48-token samples of
  stories260K differed between batch sizes 5 and 256; none in float64, which cost 10% more time).
  Run the model in float64 where samples must match bit for bit;
- two models sampled with the same seed on the same prompt use the same random numbers (common
  random numbers): where they agree on the next-token distribution they pick the same token, which
  makes a paired comparison of their samples (a win rate) less noisy.

The loop is our own (``model.generate`` takes no per-row generator): a batch holds prompts of one
token length (no padding, see :func:`_batches`), one forward over them, then one token per step
through the model's key/value cache. A row stops at
EOS (or BOS: llama2.c's TinyStories models start the next story with BOS instead of ending the
last one with EOS) or after ``max_new_tokens``.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch


def sample_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of one sample's generator: a hash of the run seed, the sample index and the prompt.

    Args:
        seed: The run's seed.
        prompt: The prompt text.
        index: Which of the prompt's samples (0 .. n-1).

    Returns:
        A 63-bit non-negative integer.
    """
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def next_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Pick one token per row by inverse-CDF sampling with the given uniform numbers.

    Args:
        logits: Next-token logits, (B, V).
        uniforms: One number in [0, 1) per row, (B,).
        temperature: Softmax temperature; 0 picks the most likely token (the uniforms are unused).
        top_k: Sample among the ``top_k`` most likely tokens only; 0 for the whole vocabulary.

    Returns:
        Token ids, (B,).
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, V)
    # The first token whose cumulative probability exceeds u (scaled by the row's total so that
    # rounding in the sum never leaves u past the last token).
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return picks.clamp(max=logits.shape[-1] - 1)


def _check_args(n: int, max_new_tokens: int, temperature: float, top_k: int, batch_size: int) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (no limit) or positive, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


@torch.no_grad()
def _sample_batch(
    model: Any,
    prompt_ids: list[list[int]],
    generators: list[torch.Generator],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    stop_ids: set[int],
) -> list[list[int]]:
    """The new token ids of each row (stop token excluded); the prompts have one length."""
    assert len({len(ids) for ids in prompt_ids}) == 1, "a batch holds prompts of one length"
    device = next(model.parameters()).device
    rows = len(prompt_ids)
    step_ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (B, T), then (B, 1)
    # transformers 5.24 renamed the cache argument and output (past_key_values -> cache).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(max_new_tokens):
        result = model(input_ids=step_ids, use_cache=True, **{cache_arg: past})
        past = result.get("cache", result.get("past_key_values"))
        # One draw per row and step, finished rows included: a row's random stream then depends
        # on nothing but its own seed.
        uniforms = torch.cat([torch.rand(1, generator=g) for g in generators])  # (B,)
        tokens = next_tokens(result.logits[:, -1, :], uniforms.to(device), temperature, top_k).cpu()  # (B,)
        for r, token in enumerate(tokens.tolist()):
            if done[r]:
                continue
            if token in stop_ids:
                done[r] = True
            else:
                out[r].append(token)
        if all(done):
            break
        step_ids = tokens.view(rows, 1).to(device)
    return out


def _batches(encoded: list[list[int]], n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(prompt, sample) rows in batches of at most ``batch_size`` whose prompts have one length.

    No row is ever padded: padding (and the attention over it) changes a row's logits in the last
    bits, enough to flip a draw now and then (measured: 2 of 1680 samples differed between batch
    sizes 100 and 256 with mixed lengths), and then the samples would depend on the batching.
    """
    by_length: dict[int, list[tuple[int, int]]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).extend((i, j) for j in range(n))
    return [rows[k : k + batch_size] for _, rows in sorted(by_length.items()) for k in range(0, len(rows), batch_size)]


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    n: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """Sample ``n`` completions of each prompt.

    Each prompt is tokenized with the tokenizer's special tokens (BOS), as the pipeline tokenizes
    a plain-text prompt; a completion is the decoded new tokens, stripped of surrounding spaces, so
    that ``prompt + " " + completion`` is the text the model wrote (the pipeline joins a prompt and
    its completion with one space).

    Args:
        model: A causal LM (``transformers``) in eval mode; left where it is (CPU or GPU).
        tokenizer: Its tokenizer.
        prompts: Plain-text prompts.
        n: Samples per prompt.
        max_new_tokens: Most new tokens per sample.
        temperature: Softmax temperature; 0 for greedy decoding (all n samples then agree).
        top_k: Sample among the k most likely tokens; 0 for all.
        seed: Run seed; see :func:`sample_seed`.
        batch_size: Rows (prompt, sample) per forward pass. Does not change the results.

    Returns:
        ``n`` completions per prompt, in the prompts' order.

    Raises:
        ValueError: A prompt that is not a string, or an argument out of range.
    """
    _check_args(n, max_new_tokens, temperature, top_k, batch_size)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}")
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    stop_ids = {t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None}
    texts: list[list[str]] = [[""] * n for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(encoded, n, batch_size):
            generators = [torch.Generator().manual_seed(sample_seed(seed, prompts[i], j)) for i, j in batch]
            new = _sample_batch(
                model, [encoded[i] for i, _ in batch], generators, max_new_tokens, temperature, top_k, stop_ids
            )
            for (i, j), ids in zip(batch, new, strict=True):
                texts[i][j] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return texts
