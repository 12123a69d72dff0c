"""Sample generations: each step's model continues the same few eval prompts, for reading side by side.

The prompts are the first distinct prompts of the eval split (its order is fixed by the data seed).
A conversational prompt is rendered as training renders it (:func:`sdpo_core.tokenization.render_prompt`:
the tokenizer's chat template with the generation prompt, else the plain ``User: ... Assistant:``
template), so every prompt can be sampled. Each model draws with the same seed per prompt
(:func:`sdpo_core.sampling.sample_completions`), so where two step models agree on the next token
they write the same text, and the columns differ only where the models do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdpo_core.pairs import Message, PreferencePair
from sdpo_core.sampling import sample_completions
from sdpo_core.tokenization import render_prompt


def eval_prompts(pairs: Sequence[PreferencePair], n: int) -> list[str | tuple[Message, ...]]:
    """The first ``n`` distinct prompts of ``pairs``, in file order.

    Args:
        pairs: The eval split.
        n: How many prompts (fewer when the split has fewer distinct prompts).

    Returns:
        Prompts as stored: plain strings or message tuples.
    """
    seen: set[str] = set()
    out: list[str | tuple[Message, ...]] = []
    for pair in pairs:
        if len(out) >= n:
            break
        if pair.prompt_key not in seen:
            seen.add(pair.prompt_key)
            out.append(pair.prompt)
    return out


def prompt_text(prompt: str | Sequence[Message], tokenizer: Any) -> str:
    """The text a model continues: plain text as is, a conversation rendered for generation.

    A chat template's text usually begins with the BOS token; :func:`sample_completions` adds BOS
    when it tokenizes, so a leading BOS is taken off here rather than doubled.
    """
    text, has_special = render_prompt(prompt, tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    if has_special and isinstance(bos, str) and bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


def continue_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str | Sequence[Message]], max_new_tokens: int, seed: int
) -> list[str]:
    """One seeded continuation of each prompt by ``model`` (temperature 1, whole vocabulary).

    Args:
        model: A causal LM, left on its device.
        tokenizer: Its tokenizer.
        prompts: Plain strings or message lists.
        max_new_tokens: Most new tokens per continuation.
        seed: The run seed; each prompt's generator is seeded from it and the prompt's text.

    Returns:
        The continuations, in the prompts' order.
    """
    texts = [prompt_text(p, tokenizer) for p in prompts]
    samples = sample_completions(model, tokenizer, texts, n=1, max_new_tokens=max_new_tokens, seed=seed)
    return [s[0] for s in samples]


def generations_table(prompts: Sequence[str], columns: dict[str, list[str]]) -> dict[str, list[str]]:
    """The side-by-side table: a ``prompt`` column, then one column per model, in the given order.

    Raises:
        ValueError: a column whose length is not the number of prompts, or one named ``prompt``.
    """
    if "prompt" in columns:
        raise ValueError("a model column may not be named 'prompt'")
    for name, texts in columns.items():
        if len(texts) != len(prompts):
            raise ValueError(f"column {name!r} has {len(texts)} texts for {len(prompts)} prompts")
    return {"prompt": list(prompts), **{name: list(texts) for name, texts in columns.items()}}
