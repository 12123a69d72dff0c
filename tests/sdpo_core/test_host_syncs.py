"""Issue 19: a train step reads the device back once per optimizer step, and computes what it did before.

The scored tokens and token counts of a batch are built on the host at collation; the old code
found them on the device (``nonzero`` on the completion mask, ``bincount`` of the sequences), and
that old computation is the oracle here. A train step's reference log-probs are copied once per
optimizer step and its metrics read in one sync (counted by patching every read-back method of
``torch.Tensor``). The reference pass takes a token budget, runs under ``inference_mode`` and
returns ordinary tensors.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sdpo_core.parallel
import sdpo_core.train
from sdpo_core.config import DataConfig, LossConfig, ModelConfig, SourceConfig, TrainConfig
from sdpo_core.data import load_source, tokenize_pairs
from sdpo_core.layouts import PairBatch, TokenizedPair, collate, collate_pairs, pass_tokens, split_by_tokens
from sdpo_core.logprobs import _forward, completion_logps, score_passes, token_logps
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.passes import PassLayout
from sdpo_core.precision import PRECISIONS
from sdpo_core.train import batch_plan, train_dpo

# The tiny model, a few train steps of 8 pairs each: seconds, no service.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.unit]
REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(name_or_path=str(REPO / "models" / "stories260K"))
BASE = TrainConfig(micro_batch_size=2, grad_accum_steps=1, learning_rate=1e-3, warmup_ratio=0.0, seed=0)
# Every way a tensor's value reaches the host.
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture(scope="module")
def setup() -> tuple[list[TokenizedPair], dict[str, torch.Tensor], int]:
    """8 short real HH pairs of varied lengths, and the initial model's reference log-probs."""
    tokenizer = load_tokenizer(MODEL)
    raw, _ = load_source(
        SourceConfig(path=str(REPO / "data" / "hh-rlhf_helpful-base_test.jsonl.gz"), name="hh", max_pairs=60)
    )
    pairs = tokenize_pairs(
        [raw[i] for i in (6, 11, 18, 19, 22, 26, 37, 53)], tokenizer, DataConfig(max_length=128, max_prompt_length=96)
    )
    pid = pad_id(tokenizer)
    return pairs, _scores(load_model(MODEL), pairs, pid), pid


def _scores(model: torch.nn.Module, pairs: list[TokenizedPair], pid: int, **kwargs) -> dict[str, torch.Tensor]:
    from sdpo_core.logprobs import score_pairs

    return score_pairs(model, pairs, pid, kwargs.pop("batch_size", 3), **kwargs)


def _old_targets(batch: PairBatch) -> tuple[torch.Tensor, ...]:
    """The padded layout's scored tokens and counts as the device used to find them."""
    rows, cols = batch.completion_mask[:, 1:].bool().nonzero(as_tuple=True)  # token t+1 is predicted at t
    tokens = torch.bincount(rows, minlength=batch.input_ids.shape[0])
    return rows, rows, cols, batch.input_ids[rows, cols + 1], tokens


def _old_completion_logps(model: torch.nn.Module, batch, chunk_rows: int = 2048):
    """completion_logps as it was: targets of padded rows and every count found on the device."""
    if isinstance(batch, PairBatch):
        seq, rows, cols, labels, _ = _old_targets(batch)
    else:
        seq, rows, cols, labels = batch.seq, batch.row, batch.pos, batch.labels
    out = _forward(model, model.get_decoder(), batch)
    per_token = token_logps(out.last_hidden_state[rows, cols], labels, model.get_output_embeddings(), chunk_rows)
    num_seqs = 2 * batch.num_pairs
    logps = torch.zeros(num_seqs, dtype=torch.float32).index_add(0, seq, per_token)
    return logps, torch.bincount(seq, minlength=num_seqs)


def _full_logits_logps(model: torch.nn.Module, pairs: list[TokenizedPair]) -> torch.Tensor:
    """(2B,) summed completion log-probs from the model's own full logits, one sequence at a time."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + getattr(p, side)])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
            picked = logp.gather(1, ids[0, 1:, None])[:, 0]
            out.append(picked[len(p.prompt_ids) - 1 :].sum())
    return torch.stack(out)


def test_host_built_targets_equal_the_device_ones(setup) -> None:
    pairs, _, pid = setup
    empty_prompt = TokenizedPair([], [5, 6, 7], [8, 9])  # nothing predicts a first token: not scored
    for group in (pairs[:3], pairs[3:], [*pairs[:2], empty_prompt]):
        batch = collate_pairs(group, pid)
        seq, row, pos, labels, tokens = _old_targets(batch)
        for new, old in zip((*batch.targets(), batch.tokens), (seq, row, pos, labels, tokens), strict=True):
            assert torch.equal(new, old)
        shared = collate(group, pid, shared_prompt=True)
        assert torch.equal(shared.tokens, torch.bincount(shared.seq, minlength=2 * len(group)))
        assert torch.equal(shared.tokens, batch.tokens)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_completion_logps_equal_the_old_computation_and_full_logits(setup, shared_prompt) -> None:
    pairs, _, pid = setup
    model = load_model(MODEL).eval()
    batch = collate(pairs, pid, shared_prompt)
    with torch.no_grad():
        new, tokens = completion_logps(model, batch, chunk_rows=16)
        old, old_tokens = _old_completion_logps(model, batch, chunk_rows=16)
        full = _full_logits_logps(model, pairs)
    assert torch.equal(new, old) and torch.equal(tokens, old_tokens)
    torch.testing.assert_close(new, full, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_training_equals_training_with_the_old_log_probs(setup, shared_prompt, monkeypatch) -> None:
    """Every metric of every step and the final weights, exactly, with max_pass_tokens cutting the
    micro-batches into passes (the reference log-probs are then taken in pass order)."""
    pairs, ref, pid = setup
    cfg = BASE.model_copy(update=dict(micro_batch_size=4, shared_prompt=shared_prompt, max_pass_tokens=300))
    runs = []
    for patched in (False, True):
        if patched:
            monkeypatch.setattr(sdpo_core.parallel, "completion_logps", _old_completion_logps)
        model = load_model(MODEL)
        result = train_dpo(model, pairs, ref, pid, cfg, LossConfig(name="ipo", nll_weight=0.5))
        runs.append((result.history, model.state_dict()))
    (new_history, new_weights), (old_history, old_weights) = runs
    assert len(new_history) == 2 and new_history == old_history
    assert all(torch.equal(new_weights[k], old_weights[k]) for k in new_weights)


def test_each_pair_meets_its_own_reference(setup) -> None:
    """At step 1 the policy is the initial model, so with reference log-probs moved by a different
    amount for each pair the loss is known; a reference taken for the wrong pair changes it."""
    pairs, ref, pid = setup
    d_chosen = torch.linspace(-20.0, 25.0, len(pairs))
    d_rejected = d_chosen**2 / 30
    moved = {**ref, "chosen": ref["chosen"] + d_chosen, "rejected": ref["rejected"] + d_rejected}
    cfg = BASE.model_copy(update=dict(micro_batch_size=8, max_pass_tokens=300))
    result = train_dpo(load_model(MODEL), pairs, moved, pid, cfg, LossConfig())
    beta = LossConfig().beta
    # h = (policy - reference) of chosen minus that of rejected = d_rejected - d_chosen
    expected = -torch.nn.functional.logsigmoid(beta * (d_rejected - d_chosen)).mean().item()
    assert result.history[0]["loss"] == pytest.approx(expected, abs=1e-5)


def _count_reads(monkeypatch) -> dict[str, int]:
    """Patch every read-back of torch.Tensor to count: under "transformers" the reads made by
    transformers' own code, under "ours" all others."""
    count = {"ours": 0, "transformers": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            count["transformers" if f"{os.sep}transformers{os.sep}" in caller else "ours"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.mark.parametrize(
    ("shared_prompt", "precision", "reads"),
    # fp16: the loss scaler's new scale is read too (get_scale, the loss_scale metric), accepted;
    # with torch's fused AdamW its overflow check stays on the device.
    [(False, "fp32", 1), (True, "fp32", 1), (True, "fp16-mixed", 2)],
)
def test_one_host_sync_per_optimizer_step(setup, shared_prompt, precision, reads, monkeypatch) -> None:
    """4 optimizer steps, each of several passes: sdpo reads the device once per step, counted from
    after the data plan (its shuffle is made on the host) to each step's metrics callback.

    transformers' own code reads nothing either: given no mask under ``sdpa``, it would look for
    packed sequences in the position ids it made, with a read per pass
    (``masking_utils.find_packed_sequence_indices``); padded rows go through sdpo's causal SDPA
    (:mod:`sdpo_core.causal_attention`) and the shared layout's split attention, for which it
    prepares no mask.
    """
    pairs, ref, pid = setup
    cfg = BASE.model_copy(update=dict(micro_batch_size=2, grad_accum_steps=1, shared_prompt=shared_prompt))
    cfg = cfg.model_copy(update=dict(max_pass_tokens=120 if shared_prompt else 200))
    plan = batch_plan(len(pairs), cfg)
    assert len(plan) == 4
    passes = [split_by_tokens(mb, pairs, cfg.max_pass_tokens, shared_prompt) for [mb] in plan]
    assert all(len(p) > 1 for p in passes), "want steps of several passes"
    model = load_model(MODEL)
    count = _count_reads(monkeypatch)
    real_plan = sdpo_core.train.batch_plan

    def plan_then_count(*args, **kwargs):
        out = real_plan(*args, **kwargs)
        count.update(ours=0, transformers=0)
        return out

    monkeypatch.setattr(sdpo_core.train, "batch_plan", plan_then_count)
    per_step: list[tuple[int, int]] = []

    def callback(_step: int, _metrics: dict[str, float]) -> None:
        per_step.append((count["ours"], count["transformers"]))
        count.update(ours=0, transformers=0)

    train_dpo(model, pairs, ref, pid, cfg, LossConfig(), callback=callback, precision=PRECISIONS[precision])
    assert per_step == [(reads, 0)] * len(passes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_cuda_names_one_synchronizing_call_per_optimizer_step(setup, shared_prompt) -> None:
    """On a GPU, torch's sync debug mode warns at every synchronizing call (a read-back, a blocking
    copy, ``nonzero``...): sdpo's own are one per step. Step 1 is left out (it holds the setup's
    copies); transformers' reads are counted apart (there should be none: see the test above)."""
    pairs, ref, pid = setup
    cfg = BASE.model_copy(update=dict(shared_prompt=shared_prompt, max_pass_tokens=None))
    model = load_model(MODEL).to("cuda")
    per_step: list[list[str]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def callback(_step: int, _metrics: dict[str, float]) -> None:
            per_step.append([w.filename for w in caught if "synchronizing CUDA operation" in str(w.message)])
            caught.clear()

        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_dpo(model, pairs, ref, pid, cfg, LossConfig(), device="cuda", callback=callback)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(per_step) == 4
    ours = [[f for f in files if f"{os.sep}transformers{os.sep}" not in f] for files in per_step[1:]]
    assert [len(files) for files in ours] == [1, 1, 1], ours


def test_a_non_finite_loss_still_stops_before_any_update(setup) -> None:
    pairs, ref, pid = setup
    bad = {**ref, "chosen": torch.full_like(ref["chosen"], math.inf)}
    model = load_model(MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sdpo_core.train.TrainingError, match="optimizer step 1"):
        train_dpo(model, pairs, bad, pid, BASE, LossConfig())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_token_budgeted_scoring_equals_pair_batches_in_order(setup, shared_prompt) -> None:
    pairs, _, pid = setup
    model = load_model(MODEL).train()  # scoring puts it in eval mode, and back
    budget = 300
    passes = score_passes(pairs, 3, budget, PassLayout.of(shared_prompt, pairs, 2048))
    assert sorted(i for p in passes for i in p) == list(range(len(pairs)))
    assert 1 < len(passes) < len(pairs), "want passes of a few pairs"
    for ids in passes:
        rows, width = pass_tokens(pairs[ids[-1]], shared_prompt)
        assert len(ids) == 1 or rows * len(ids) * width <= budget
        assert width == max(pass_tokens(pairs[i], shared_prompt)[1] for i in ids)
    seen: list[tuple[int, int]] = []
    budgeted = _scores(
        model, pairs, pid, shared_prompt=shared_prompt, max_tokens=budget, progress=lambda *a: seen.append(a)
    )
    assert seen == [(sum(len(p) for p in passes[: k + 1]), len(pairs)) for k in range(len(passes))]
    one_by_one = [_scores(model, [p], pid, batch_size=1, shared_prompt=shared_prompt) for p in pairs]
    batched = _scores(model, pairs, pid, batch_size=3, shared_prompt=shared_prompt)
    for key in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        expected = torch.cat([s[key] for s in one_by_one])  # the original order
        torch.testing.assert_close(budgeted[key], expected, atol=1e-5, rtol=1e-6)  # rounding of other shapes
        torch.testing.assert_close(budgeted[key], batched[key], atol=1e-5, rtol=1e-6)
        assert budgeted[key].dtype == batched[key].dtype
        assert not budgeted[key].is_inference()
        budgeted[key].add_(0)  # an in-place update: refused on an inference tensor
    assert model.training, "scoring leaves the model's mode as it found it"


def test_training_against_budgeted_scores(setup) -> None:
    """The budgeted scores of the initial model are a reference autograd code can use: at step 1
    the policy is that model, so the loss is log 2."""
    pairs, _, pid = setup
    ref = _scores(load_model(MODEL), pairs, pid, shared_prompt=True, max_tokens=200)
    cfg = BASE.model_copy(update=dict(shared_prompt=True))
    result = train_dpo(load_model(MODEL), pairs, ref, pid, cfg, LossConfig(nll_weight=0.5))
    assert result.history[0]["loss"] == pytest.approx(math.log(2) + 0.5 * result.history[0]["nll_loss"], abs=1e-5)
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in result.history)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_collate_width_pads_without_changing_log_probs(setup, shared_prompt) -> None:
    pairs, _, pid = setup
    model = load_model(MODEL).eval()
    natural = collate(pairs[:4], pid, shared_prompt)
    natural_width = natural.input_ids.shape[1]
    assert collate(pairs[:4], pid, shared_prompt, width=natural_width - 5).input_ids.shape[1] == natural_width
    wide = collate(pairs[:4], pid, shared_prompt, width=natural_width + 13)
    assert wide.input_ids.shape[1] == natural_width + 13
    for a, b in zip((*natural.targets(), natural.tokens), (*wide.targets(), wide.tokens), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        a, _ = completion_logps(model, natural)
        b, _ = completion_logps(model, wide)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)  # float rounding of other shapes only
