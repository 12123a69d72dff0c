"""Sampling with fixed seeds (sdpo_core.sampling) on the shipped tiny model.

The model runs in float64 here, as the gold-task tools run it: the samples then match bit for bit
whatever the batching (see the module's docstring).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sdpo_core.config import ModelConfig
from sdpo_core.model_io import load_model, load_tokenizer
from sdpo_core.sampling import next_tokens, sample_completions, sample_seed

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(name_or_path=str(REPO / "models" / "stories260K"))
# Prompts of different token lengths, so that batches split by length.
PROMPTS = [
    "Once upon a time, there was a little dog named",
    "One day, Lily went to the park.",
    "Tom had a big red ball. He",
    "The cat",
]
KW = {"n": 3, "max_new_tokens": 12, "seed": 7}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    # One thread: this model's forward is per-op overhead, which a second thread on a busy
    # machine makes many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(MODEL, dtype=torch.float64).eval(), load_tokenizer(MODEL)
    torch.set_num_threads(threads)


def test_next_tokens_inverse_cdf_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(5, 1)  # cdf .1 .3 .6 1.0
    u = torch.tensor([0.05, 0.15, 0.35, 0.65, 0.999])
    assert next_tokens(logits, u, 1.0, 0).tolist() == [0, 1, 2, 3, 3]
    # top_k=2 keeps tokens 2 and 3, renormalised: cdf 3/7, 1.0.
    assert next_tokens(logits, u, 1.0, 2).tolist() == [2, 2, 2, 3, 3]
    # temperature 0 is greedy, whatever the uniforms.
    assert next_tokens(logits, u, 0.0, 0).tolist() == [3] * 5
    # A high temperature flattens toward uniform: cdf ~ .25 .5 .75 1.
    assert next_tokens(logits[:2], torch.tensor([0.26, 0.74]), 1e6, 0).tolist() == [1, 2]


def test_sample_seed_depends_on_seed_prompt_and_index() -> None:
    seeds = {sample_seed(s, p, i) for s in (0, 1) for p in ("a", "b") for i in (0, 1)}
    assert len(seeds) == 8
    assert sample_seed(3, "x", 2) == sample_seed(3, "x", 2)
    assert 0 <= sample_seed(3, "x", 2) < 2**63


def test_sampling_is_deterministic_and_seeded(model_and_tokenizer, reference) -> None:
    model, tok = model_and_tokenizer
    first = reference
    assert [len(s) for s in first] == [3] * len(PROMPTS)
    assert all(isinstance(t, str) and t for s in first for t in s)
    assert sample_completions(model, tok, PROMPTS, **KW) == first
    # The n samples of a prompt differ from each other, and another seed gives others.
    assert all(len(set(s)) > 1 for s in first)
    assert sample_completions(model, tok, PROMPTS, **{**KW, "seed": 8}) != first


@pytest.fixture(scope="module")
def reference(model_and_tokenizer) -> list[list[str]]:
    model, tok = model_and_tokenizer
    return sample_completions(model, tok, PROMPTS, batch_size=3, **KW)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_samples_do_not_depend_on_batch_size(model_and_tokenizer, reference, batch_size: int) -> None:
    model, tok = model_and_tokenizer
    assert sample_completions(model, tok, PROMPTS, batch_size=batch_size, **KW) == reference


def test_samples_do_not_depend_on_the_other_prompts(model_and_tokenizer, reference) -> None:
    model, tok = model_and_tokenizer
    together = reference
    assert sample_completions(model, tok, PROMPTS[::-1], **KW) == together[::-1]
    assert sample_completions(model, tok, PROMPTS[1:2], **KW) == together[1:2]


def test_greedy_matches_transformers_generate(model_and_tokenizer) -> None:
    # Checks the cached decoding loop against transformers' own, token for token.
    model, tok = model_and_tokenizer
    ours = sample_completions(model, tok, PROMPTS, n=2, max_new_tokens=10, temperature=0.0, batch_size=8)
    for prompt, samples in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=2
            )
        expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert samples == [expected, expected]


def test_first_token_frequencies_follow_the_model(model_and_tokenizer) -> None:
    # 400 one-token samples of one prompt: the share of the most likely first token is its
    # probability under the model, within 4 standard errors.
    model, tok = model_and_tokenizer
    prompt = "Once upon a time, there was a little dog named"
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1], -1)
    top = int(probs.argmax())
    samples = sample_completions(model, tok, [prompt], n=400, max_new_tokens=1, seed=1)[0]
    share = sum(tok(prompt + " " + s)["input_ids"][-1] == top for s in samples) / len(samples)
    p = float(probs[top])
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / len(samples)), (share, p)


def test_model_mode_is_restored(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    model.train()
    try:
        sample_completions(model, tok, PROMPTS[:1], n=1, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be at least 1"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_are_refused(model_and_tokenizer, kwargs: dict, message: str) -> None:
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match=message):
        sample_completions(model, tok, PROMPTS, **kwargs)


def test_a_prompt_that_is_not_a_string_is_named(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="prompt 1 must be a string, got list"):
        sample_completions(model, tok, ["ok", [{"role": "user", "content": "hi"}]])  # type: ignore[list-item]
