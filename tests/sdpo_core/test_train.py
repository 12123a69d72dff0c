"""train_dpo on the tiny real model: accumulation invariance, repeatability, metrics, errors, schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from sdpo_core.config import DataConfig, LossConfig, ModelConfig, SourceConfig, TrainConfig
from sdpo_core.data import load_source, tokenize_pairs
from sdpo_core.logprobs import TokenizedPair, score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.train import TrainingError, TrainResult, batch_plan, for_device, lr_lambda, train_dpo

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
MODEL_CFG = ModelConfig(name_or_path=str(REPO / "models" / "stories260K"))
TRL_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# 8 pairs, global batch 4: two optimizer steps.
BASE = TrainConfig(micro_batch_size=4, grad_accum_steps=1, learning_rate=1e-3, warmup_ratio=0.0, seed=0)


@pytest.fixture(scope="module")
def setup() -> tuple[list[TokenizedPair], dict[str, torch.Tensor], int]:
    """8 short real HH pairs, whole and of varied lengths, and the initial model's reference log-probs."""
    tokenizer = load_tokenizer(MODEL_CFG)
    raw, _ = load_source(
        SourceConfig(path=str(REPO / "data" / "hh-rlhf_helpful-base_test.jsonl.gz"), name="hh", max_pairs=60)
    )
    short = [raw[i] for i in (6, 11, 18, 19, 22, 26, 37, 53)]
    pairs = tokenize_pairs(short, tokenizer, DataConfig(max_length=128, max_prompt_length=96))
    assert len({len(p.prompt_ids) + len(p.chosen_ids) for p in pairs}) > 1, "want padded micro-batches"
    ref = score_pairs(load_model(MODEL_CFG), pairs, pad_id(tokenizer), batch_size=3)
    return pairs, ref, pad_id(tokenizer)


def _train(setup, cfg: TrainConfig, loss: LossConfig | None = None, ref=None, calls: list | None = None):
    pairs, ref0, pid = setup
    model = load_model(MODEL_CFG)
    callback = None if calls is None else (lambda step, metrics: calls.append((step, dict(metrics))))
    result = train_dpo(model, pairs, ref0 if ref is None else ref, pid, cfg, loss or LossConfig(), callback=callback)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_accumulation_invariance(setup) -> None:
    """micro 1 x accumulation 4 equals micro 4 x accumulation 1: the same weights and the same metrics.

    grad_norm (taken before clipping) is compared too: Adam's first step is blind to the scale of the
    gradient, so a wrong normalisation of accumulated micro-batches shows there first.
    """
    a, ra = _train(setup, BASE.model_copy(update=dict(micro_batch_size=1, grad_accum_steps=4)))
    b, rb = _train(setup, BASE)
    m0 = load_model(MODEL_CFG).state_dict()
    assert ra.optimizer_steps == rb.optimizer_steps == 2
    assert _max_diff(a, m0) > 1e-4, "training should move the weights"
    # Adam divides by sqrt(v): for a weight whose gradient is near zero, fp32 rounding of the
    # accumulated gradient (summed in another order) moves its update by up to ~1e-5 (1.3e-5 seen
    # on one of 11008 elements with transformers 5.24). A wrong normalisation moves every weight
    # by ~lr = 1e-3.
    for k in a:
        assert_close(a[k], b[k], atol=5e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    for i, (step_a, step_b) in enumerate(zip(ra.history, rb.history, strict=True)):
        assert step_a.keys() == step_b.keys()
        for key in step_a:
            if i == 0 and key == "rewards/accuracies":
                # At the first step the policy is the reference: every reward is rounding noise
                # (about 1e-7), and which of two noise values is larger depends on the layout.
                assert abs(step_a["rewards/margins"]) < 1e-5 and abs(step_b["rewards/margins"]) < 1e-5
                continue
            assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-5), key


def test_same_seed_repeats_exactly_and_other_seed_differs(setup) -> None:
    a, ra = _train(setup, BASE)
    b, rb = _train(setup, BASE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra.history == rb.history

    other = BASE.model_copy(update=dict(seed=1))
    assert batch_plan(8, other) != batch_plan(8, BASE), "seed 1 must shuffle differently for this test to bite"
    c, _ = _train(setup, other)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_metrics_names_and_callback(setup) -> None:
    """One callback per optimizer step, with TRL's names.

    At step 1 the policy is the reference, so every implicit reward is 0 and the sigmoid loss is
    -log sigmoid(0) = log 2 = 0.693147; logps/chosen is the mean reference log-prob of the step's pairs.
    """
    calls: list[tuple[int, dict[str, float]]] = []
    _, result = _train(setup, BASE, calls=calls)
    assert isinstance(result, TrainResult)
    assert [step for step, _ in calls] == [1, 2] == list(range(1, result.optimizer_steps + 1))
    assert [m for _, m in calls] == result.history
    for _, metrics in calls:
        assert set(TRL_NAMES) <= metrics.keys()
        assert all(math.isfinite(metrics[k]) for k in TRL_NAMES)
        assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
        assert 0.0 <= metrics["rewards/accuracies"] <= 1.0
    first = calls[0][1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    _, ref, _ = setup
    step1 = batch_plan(8, BASE)[0][0]
    assert first["logps/chosen"] == pytest.approx(ref["chosen"][step1].mean().item(), rel=1e-5)
    assert first["logps/rejected"] == pytest.approx(ref["rejected"][step1].mean().item(), rel=1e-5)
    # Each step's rewards are beta * (mean policy logp - mean reference logp) over the step's pairs.
    for (_, metrics), step_ids in zip(calls, batch_plan(8, BASE), strict=True):
        ids = step_ids[0]
        beta = LossConfig().beta
        expected_c = beta * (metrics["logps/chosen"] - ref["chosen"][ids].mean().item())
        expected_r = beta * (metrics["logps/rejected"] - ref["rejected"][ids].mean().item())
        assert metrics["rewards/chosen"] == pytest.approx(expected_c, abs=1e-5)
        assert metrics["rewards/rejected"] == pytest.approx(expected_r, abs=1e-5)
    assert calls[1][1]["rewards/chosen"] != pytest.approx(calls[1][1]["rewards/rejected"], abs=1e-3)
    assert result.final_loss == calls[-1][1]["loss"]
    # After one step of DPO the policy should prefer the chosen completions of step 2 less badly
    # than log 2: at least the loss must have moved.
    assert calls[1][1]["loss"] != pytest.approx(math.log(2), abs=1e-4)


def test_learning_rate_follows_schedule(setup) -> None:
    """8 pairs, micro 2 x accumulation 1: 4 steps; warmup_ratio 0.5 -> ceil(2) = 2 warmup steps.

    factors: step 1: 1/2, step 2: 2/2 = 1, step 3: progress 0 -> 1, step 4: progress 1/2 ->
    0.5 (1 + cos(pi/2)) = 0.5; with a peak of 1e-3: 5e-4, 1e-3, 1e-3, 5e-4.
    """
    cfg = BASE.model_copy(update=dict(micro_batch_size=2, warmup_ratio=0.5, learning_rate=1e-3))
    _, result = _train(setup, cfg)
    assert [m["learning_rate"] for m in result.history] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    assert [m["epoch"] for m in result.history] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_nan_reference_names_the_step(setup) -> None:
    """A NaN reference log-prob for a pair of the second optimizer step stops training there."""
    pairs, ref, _ = setup
    victim = batch_plan(len(pairs), BASE)[1][0][0]  # first pair of step 2
    bad = {k: v.clone() for k, v in ref.items()}
    bad["chosen"][victim] = float("nan")
    model = load_model(MODEL_CFG)
    with pytest.raises(TrainingError, match=r"optimizer step 2\b"):
        train_dpo(model, pairs, bad, setup[2], BASE, LossConfig())
    # The bad step never reached the optimizer: the weights are finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_reference_in_first_step(setup) -> None:
    pairs, ref, _ = setup
    victim = batch_plan(len(pairs), BASE)[0][0][0]
    bad = {k: v.clone() for k, v in ref.items()}
    bad["chosen"][victim] = float("nan")
    with pytest.raises(TrainingError, match=r"optimizer step 1\b"):
        _train(setup, BASE, ref=bad)


def test_reference_length_mismatch(setup) -> None:
    pairs, ref, pid = setup
    short = {k: v[:-1] for k, v in ref.items()}
    with pytest.raises(ValueError, match="8 pairs but 7 reference"):
        train_dpo(load_model(MODEL_CFG), pairs, short, pid, BASE, LossConfig())


def test_batch_plan_split_does_not_change_the_steps() -> None:
    """The global batch of each step is the same pairs whatever the split into micro-batches."""
    a = batch_plan(10, BASE.model_copy(update=dict(micro_batch_size=1, grad_accum_steps=4, epochs=2)))
    b = batch_plan(10, BASE.model_copy(update=dict(micro_batch_size=4, grad_accum_steps=1, epochs=2)))
    flat = [[i for mb in step for i in mb] for step in a]
    assert flat == [step[0] for step in b]
    assert [len(s) for s in flat] == [4, 4, 2, 4, 4, 2]
    assert sorted(i for s in flat[:3] for i in s) == list(range(10))  # each epoch covers every pair once
    assert sorted(i for s in flat[3:] for i in s) == list(range(10))
    assert all(len(mb) == 1 for step in a for mb in step)


def test_lr_lambda_by_hand() -> None:
    """total 10, warmup_ratio 0.2 -> warmup = ceil(2) = 2 steps, min_lr_ratio 0.1:

    step 0: 1/2; step 1: 2/2 = 1; step 2: progress 0 -> 1;
    step 6: progress (6 - 2) / 8 = 0.5 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.1 + 0.45 = 0.55;
    step 4: progress 0.25 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/4)) = 0.1 + 0.45 * 1.7071068 = 0.8681981;
    step 10: progress 1 -> 0.1 (and it stays there past the end).
    """
    f = lr_lambda(10, 0.2, 0.1)
    assert f(0) == pytest.approx(0.5)
    assert f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    assert f(4) == pytest.approx(0.8681981)
    assert f(6) == pytest.approx(0.55)
    assert f(10) == pytest.approx(0.1)
    assert f(12) == pytest.approx(0.1)
    values = [f(s) for s in range(2, 11)]
    assert values == sorted(values, reverse=True), "cosine decay is monotone"


def test_lr_lambda_without_warmup() -> None:
    """warmup_ratio 0: full rate at step 0; total 4, min 0: step 2 -> 0.5 (1 + cos(pi/2)) = 0.5."""
    f = lr_lambda(4, 0.0, 0.0)
    assert f(0) == pytest.approx(1.0)
    assert f(2) == pytest.approx(0.5)
    assert f(4) == pytest.approx(0.0, abs=1e-12)


def test_layout_auto_is_concrete_per_device() -> None:
    cpu = for_device(TrainConfig(), "cpu")
    assert (cpu.shared_prompt, cpu.max_pass_tokens, cpu.score_pass_tokens) == (True, 1024, None)
    gpu = for_device(TrainConfig(), "cuda:0")
    assert (gpu.shared_prompt, gpu.max_pass_tokens, gpu.score_pass_tokens) == (False, None, 32768)
    chosen = TrainConfig(shared_prompt=True, max_pass_tokens=4096, score_pass_tokens=None)
    assert for_device(chosen, "cuda") == chosen


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_gradient_checkpointing_trains_the_same(setup, shared_prompt, monkeypatch) -> None:
    """Activation checkpointing recomputes each layer in the backward pass: the same weights and
    metrics, in both layouts. The shared layout keeps split attention under it (the recomputed
    layers replay their layout), and the model is left without checkpointing."""
    from sdpo_core import attention

    split_calls: list[int] = []
    original = attention.completed
    monkeypatch.setattr(attention, "completed", lambda run, dec: split_calls.append(run.calls) or original(run, dec))
    cfg = BASE.model_copy(update=dict(shared_prompt=shared_prompt, max_pass_tokens=None))
    plain, r_plain = _train(setup, cfg)
    seen = len(split_calls)
    pairs, ref, pid = setup
    model = load_model(MODEL_CFG)
    result = train_dpo(model, pairs, ref, pid, cfg.model_copy(update=dict(gradient_checkpointing=True)), LossConfig())
    checkpointed = {k: v.detach() for k, v in model.state_dict().items()}
    # Recomputation repeats the same operations: tighter than the split-versus-mask difference (3e-5).
    for k in plain:
        assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    for a, b in zip(result.history, r_plain.history, strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert (len(split_calls) - seen > 0) == shared_prompt, "the shared layout should still split"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_gradient_checkpointing_on_a_model_without_it_names_the_key() -> None:
    from sdpo_core.train import enable_activation_checkpointing

    with pytest.raises(ValueError, match="train.gradient_checkpointing: Linear does not support"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("names", ["old", "both"])
def test_gradient_checkpointing_method_names(names) -> None:
    """transformers before 5.24 (5.17 on the GPU machine) has only gradient_checkpointing_enable
    and _disable, which take gradient_checkpointing_kwargs; 5.24 has the activation_checkpointing
    names too, which are preferred. Either way the replay goes along."""
    from sdpo_core import attention
    from sdpo_core.train import activation_checkpointing

    calls: list[tuple[str, dict]] = []

    class OldModel(torch.nn.Module):
        supports_gradient_checkpointing = True

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old enable", gradient_checkpointing_kwargs))

        def gradient_checkpointing_disable(self):
            calls.append(("old disable", {}))

        def disable_input_require_grads(self):
            calls.append(("inputs", {}))

    class NewModel(OldModel):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("new enable", activation_checkpointing_kwargs))

        def activation_checkpointing_disable(self):
            calls.append(("new disable", {}))

    kind = "old" if names == "old" else "new"
    with activation_checkpointing(OldModel() if names == "old" else NewModel(), True):
        assert calls == [(f"{kind} enable", {"use_reentrant": False, "context_fn": attention.replay_contexts})]
    assert [c[0] for c in calls] == [f"{kind} enable", f"{kind} disable", "inputs"]
