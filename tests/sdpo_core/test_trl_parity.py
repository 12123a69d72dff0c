"""Parity of our log-probs, DPO-family losses and reward metrics with TRL 1.16's ``DPOTrainer``.

Both sides see the same token ids: six real pairs (orca/openai, llamafactory/sharegpt, hh-rlhf),
tokenized by our ``tokenize_pair``, laid out by our ``collate_pairs`` and, for TRL, by its own
``DataCollatorForPreference`` (``trainer.data_collator``) from ``prompt_ids``/``chosen_ids``/
``rejected_ids`` examples. The policy is models/stories260K; the reference is a frozen copy with
slightly perturbed weights, so the margins h are non-zero and of both signs. Float32 on CPU.

What is compared, and how:

1. The batch TRL's collator builds (input_ids, attention_mask, completion_mask) equals ours, bit for
   bit: given ids, TRL adds no BOS, EOS or padding of its own.
2. Per-token completion log-probs (TRL's fused LM head vs our ``token_logps``): 1e-5 absolute.
3. Per-sequence summed log-probs of policy and reference, ours (``completion_logps``) vs TRL's
   (``DPOTrainer.compute_ref_log_probs``, the code path ``compute_loss`` uses): the per-token values
   agree exactly, but the two sides sum in a different order, and above |logp| = 128 one float32
   ulp is already 1.5e-5; so the tolerance is 1e-5 absolute plus 1e-6 relative (about 8 ulps).
4. Loss and the metrics TRL logs (rewards/chosen, rewards/rejected, rewards/accuracies,
   rewards/margins, logps/chosen, logps/rejected), from ``DPOTrainer.compute_loss`` and the metric
   store it appends to, vs ``pass_losses`` (what our training loop computes for each pass: the
   loss, on length-averaged log-probs where it asks for them, plus the NLL term) and
   ``implicit_rewards``, averaged over the pairs as our training loop does: 1e-5 absolute, fed with
   TRL's per-sequence log-probs and completion lengths (so the check is of what training computes,
   not of float32 summation order; item 3 covers the log-probs).

5. Gradients of the policy through the whole training path (our batch, log-probs, ``pass_losses``)
   against those of TRL's ``compute_loss`` on the same rows, for every loss TRL has: within 1e-5 of
   the largest gradient (the two sides sum the same float32 terms in another order).

TRL 1.16 facts this relies on:

- ``ipo`` divides each sequence's log-ratio by its completion length before the IPO square (TRL's
  comment: confirmed with the IPO authors); so does ``pass_losses`` for ipo (LENGTH_NORMALISED).
- ``sigmoid`` ignores ``label_smoothing`` in 1.16 (only robust, exo_pair, aot, aot_unpaired read
  it). ``aot`` applies conservative DPO, -(1-eps) log s(beta d) - eps log s(-beta d), to the sorted
  policy and reference log-ratios of the batch; on a one-pair batch the sort is the identity and it
  is exactly our sigmoid loss with label smoothing, so that case is checked pair by pair.
- ``sft`` (combined with ``sigmoid`` via ``loss_weights``) is the NLL of the chosen tokens, a mean
  over all chosen tokens of the batch; ours is the same mean over the optimizer step (here one
  batch), so nll_weight (RPO) is checked on the whole multi-pair batch.

Not comparable: ``dpop`` (TRL 1.16 has no DPO-Positive loss type); TRL's ``robust`` (unbiased
robust DPO, divides by 1 - 2 eps and flips the sign of the eps term) is a different loss from our
conservative DPO.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from sdpo_core.config import DataConfig, LossConfig, ModelConfig, SourceConfig  # noqa: E402
from sdpo_core.data import load_source, tokenize_pair  # noqa: E402
from sdpo_core.logprobs import TokenizedPair, collate_pairs, completion_logps, token_logps  # noqa: E402
from sdpo_core.losses import PairLogps, implicit_rewards, pass_losses  # noqa: E402
from sdpo_core.model_io import load_model, load_tokenizer, pad_id  # noqa: E402
from tests.sdpo_core.conftest import no_checkpointing  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
MODEL_CFG = ModelConfig(name_or_path=str(REPO / "models" / "stories260K"))
# Short enough to be fast; long enough that some completions end in EOS and lengths differ.
DATA_CFG = DataConfig(max_length=96, max_prompt_length=40)
ATOL = 1e-5
LOGP_RTOL = 1e-6  # summed log-probs only: float32 summation order differs (see the docstring)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclass(frozen=True)
class Setup:
    tokenizer: Any
    pairs: list[TokenizedPair]
    policy: torch.nn.Module
    ref: torch.nn.Module
    policy_logps: torch.Tensor  # (2B,) ours, chosen rows first
    ref_logps: torch.Tensor  # (2B,)
    tokens: torch.Tensor  # (2B,) completion tokens per row


def _real_pairs(tokenizer: Any) -> list[TokenizedPair]:
    """Six real pairs: the first of orca and of llamafactory (cut at max_length), and the first four
    hh-rlhf pairs with a completion that ends in EOS (uncut, so lengths within a pair differ)."""
    pairs = []
    for name, fmt in [
        ("orca_dpo_pairs_validation_msfoundry.jsonl", "openai"),
        ("llamafactory_dpo_en_demo.json", "sharegpt"),
    ]:
        found, _ = load_source(SourceConfig(path=str(REPO / "data" / name), format=fmt, max_pairs=1, name=fmt))
        pairs.append(tokenize_pair(found[0], tokenizer, DATA_CFG))
    hh, _ = load_source(
        SourceConfig(
            path=str(REPO / "data" / "hh-rlhf_helpful-base_test.jsonl.gz"), format="hh", max_pairs=30, name="hh"
        )
    )
    eos = tokenizer.eos_token_id
    whole = [
        t for t in (tokenize_pair(p, tokenizer, DATA_CFG) for p in hh) if eos in (t.chosen_ids[-1], t.rejected_ids[-1])
    ]
    return pairs + whole[:4]


def _perturbed(model: torch.nn.Module, scale: float = 0.01) -> torch.nn.Module:
    """A frozen copy with every weight moved by ``scale`` of its std in a seeded random direction."""
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return ref.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def setup(one_thread: None) -> Setup:
    tokenizer = load_tokenizer(MODEL_CFG)
    pairs = _real_pairs(tokenizer)
    assert len(pairs) == 6
    policy = load_model(MODEL_CFG).eval()
    ref = _perturbed(policy)
    batch = collate_pairs(pairs, pad_id(tokenizer))
    with torch.no_grad():
        policy_logps, tokens = completion_logps(policy, batch)
        ref_logps, _ = completion_logps(ref, batch)
    b = len(pairs)
    # Preconditions that make the comparison meaningful: lengths differ (padding, IPO's averaging),
    # h is non-zero with both signs (reward accuracy strictly between 0 and 1).
    assert len(set(tokens.tolist())) > 1
    h = PairLogps(policy_logps[:b], policy_logps[b:], ref_logps[:b], ref_logps[b:]).margin()
    assert (h.abs() > 1e-2).all() and (h > 0).any() and (h < 0).any()
    return Setup(tokenizer, pairs, policy, ref, policy_logps, ref_logps, tokens)


def _examples(pairs: list[TokenizedPair]) -> list[dict[str, list[int]]]:
    return [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]


@pytest.fixture(scope="module")
def make_trainer(setup: Setup, tmp_path_factory: pytest.TempPathFactory):
    # TRL needs a train_dataset it can tokenize itself; it is never used, the batches are built from
    # our ids by TRL's collator. (A dataset of prompt_ids/chosen_ids/rejected_ids alone is not
    # accepted by 1.16's dataset preparation, which looks for the text columns.)
    dummy = Dataset.from_dict({"prompt": ["Once upon"], "chosen": [" a time"], "rejected": [" the end"]})

    def make(loss_type: list[str], beta: float, label_smoothing: float = 0.0, loss_weights: list[float] | None = None):
        args = DPOConfig(
            output_dir=str(tmp_path_factory.mktemp("trl")),
            loss_type=loss_type,
            loss_weights=loss_weights,
            beta=beta,
            label_smoothing=label_smoothing,
            max_length=None,  # no truncation by TRL: our pairs are already cut
            padding_free=False,
            precompute_ref_log_probs=False,
            use_weighting=False,
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            bf16=False,
            fp16=False,
            use_cpu=True,
            **no_checkpointing(DPOConfig),
            report_to=[],
            seed=0,
        )
        trainer = DPOTrainer(
            model=copy.deepcopy(setup.policy),  # TRL patches forward; keep ours untouched
            ref_model=copy.deepcopy(setup.ref),
            args=args,
            train_dataset=dummy,
            processing_class=setup.tokenizer,
        )
        trainer.model.eval()
        return trainer

    return make


def _trl_batch(trainer: DPOTrainer, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    return trainer._prepare_inputs(trainer.data_collator(_examples(pairs)))


@torch.no_grad()
def _trl_run(trainer: DPOTrainer, pairs: list[TokenizedPair]) -> dict[str, Any]:
    """TRL's per-sequence log-probs, loss and logged metrics on one batch of ``pairs``."""
    batch = _trl_batch(trainer, pairs)
    policy_c, policy_r = trainer.compute_ref_log_probs(trainer.model, batch)
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    trainer._metrics["eval"].clear()  # the store DPOTrainer.log averages; eval mode, model.eval()
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return {
        "lp": PairLogps(policy_c, policy_r, ref_c, ref_r),
        "completion_tokens": batch["completion_mask"].sum(dim=1),  # (2B,), what TRL's IPO divides by
        "loss": loss,
        "metrics": metrics,
    }


def _close(ours: torch.Tensor | float, theirs: torch.Tensor | float, what: str, rtol: float = 0.0) -> float:
    ours_t = torch.as_tensor(ours, dtype=torch.float64)
    theirs_t = torch.as_tensor(theirs, dtype=torch.float64)
    torch.testing.assert_close(ours_t, theirs_t, rtol=rtol, atol=ATOL, msg=lambda m: f"{what}: {m}")
    return (ours_t - theirs_t).abs().max().item()


def test_trl_collator_builds_our_batch(setup: Setup, make_trainer) -> None:
    trainer = make_trainer(["sigmoid"], beta=0.1)
    ours = collate_pairs(setup.pairs, pad_id(setup.tokenizer))
    theirs = _trl_batch(trainer, setup.pairs)
    assert trainer.processing_class.pad_token_id == pad_id(setup.tokenizer)
    assert torch.equal(theirs["input_ids"], ours.input_ids)
    assert torch.equal(theirs["attention_mask"], ours.attention_mask)
    assert torch.equal(theirs["completion_mask"], ours.completion_mask)
    # The ids themselves: one BOS, at the start of each prompt; EOS closes every uncut completion.
    bos, eos = setup.tokenizer.bos_token_id, setup.tokenizer.eos_token_id
    for p in setup.pairs:
        assert p.prompt_ids[0] == bos and bos not in p.prompt_ids[1:]
        assert bos not in p.chosen_ids + p.rejected_ids
        room = DATA_CFG.max_length - len(p.prompt_ids)
        for c in (p.chosen_ids, p.rejected_ids):
            assert c[-1] == eos or len(c) == room


@torch.no_grad()
def test_per_token_logps_match(setup: Setup, make_trainer) -> None:
    trainer = make_trainer(["sigmoid"], beta=0.1)
    batch = collate_pairs(setup.pairs, pad_id(setup.tokenizer))
    rows, cols = batch.completion_mask[:, 1:].bool().nonzero(as_tuple=True)  # token t+1 predicted at t
    labels = batch.input_ids[:, 1:][rows, cols]
    hidden = setup.policy.get_decoder()(**batch.model_inputs()).last_hidden_state  # as sdpo's forward calls it
    ours = token_logps(hidden[:, :-1][rows, cols], labels, setup.policy.get_output_embeddings(), chunk_rows=64)
    trl_labels = batch.input_ids.masked_fill(batch.completion_mask == 0, -100)
    out = trainer.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=trl_labels, fused_lm_head=True
    )
    assert out.log_probs[batch.completion_mask[:, 1:] == 0].abs().max() == 0  # only completion tokens scored
    _close(ours, out.log_probs[rows, cols], "per-token log-probs")


def test_summed_logps_match(setup: Setup, make_trainer) -> None:
    trainer = make_trainer(["sigmoid"], beta=0.1)
    run = _trl_run(trainer, setup.pairs)
    b = len(setup.pairs)
    lp = run["lp"]
    _close(setup.policy_logps[:b], lp.policy_chosen, "policy chosen logps", rtol=LOGP_RTOL)
    _close(setup.policy_logps[b:], lp.policy_rejected, "policy rejected logps", rtol=LOGP_RTOL)
    _close(setup.ref_logps[:b], lp.ref_chosen, "ref chosen logps", rtol=LOGP_RTOL)
    _close(setup.ref_logps[b:], lp.ref_rejected, "ref rejected logps", rtol=LOGP_RTOL)
    assert torch.equal(setup.tokens, run["completion_tokens"])
    # TRL's logged logps/* are the batch means of the summed policy log-probs.
    _close(setup.policy_logps[:b].mean(), run["metrics"]["logps/chosen"], "logps/chosen", rtol=LOGP_RTOL)
    _close(setup.policy_logps[b:].mean(), run["metrics"]["logps/rejected"], "logps/rejected", rtol=LOGP_RTOL)
    _close(lp.policy_chosen.mean(), run["metrics"]["logps/chosen"], "logps/chosen vs TRL's own logps")
    _close(lp.policy_rejected.mean(), run["metrics"]["logps/rejected"], "logps/rejected vs TRL's own logps")


def _ours(lp: PairLogps, tokens: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Our loss and metrics on a batch (one optimizer step), as sdpo_core.train computes them."""
    b = lp.policy_chosen.shape[0]
    losses, _ = pass_losses(lp, tokens, cfg, float(tokens[:b].float().mean()))  # (b,)
    chosen, rejected = implicit_rewards(lp, cfg.beta)
    return {
        "loss": losses.mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": lp.policy_chosen.mean(),
        "logps/rejected": lp.policy_rejected.mean(),
    }


@dataclass(frozen=True)
class Case:
    id: str
    ours: LossConfig
    trl_loss_type: list[str]
    trl_loss_weights: list[float] | None = None
    per_pair: bool = False  # compare on one-pair batches (see the module docstring)


CASES = [
    Case("sigmoid", LossConfig(name="sigmoid", beta=0.5), ["sigmoid"]),
    Case("ipo", LossConfig(name="ipo", beta=0.5), ["ipo"]),
    Case("hinge", LossConfig(name="hinge", beta=1.0), ["hinge"]),  # beta h > 1 for one pair: relu clips
    # Conservative DPO: TRL 1.16's sigmoid ignores label_smoothing; its aot is cDPO on one-pair batches.
    Case("sigmoid-label-smoothing", LossConfig(name="sigmoid", beta=0.5, label_smoothing=0.2), ["aot"], per_pair=True),
    # RPO-style NLL term: TRL's sft is a token mean over the batch, as ours is over the step.
    Case("sigmoid-nll", LossConfig(name="sigmoid", beta=0.5, nll_weight=0.3), ["sigmoid", "sft"], [1.0, 0.3]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_and_metrics_match(setup: Setup, make_trainer, case: Case) -> None:
    trainer = make_trainer(
        case.trl_loss_type,
        beta=case.ours.beta,
        label_smoothing=case.ours.label_smoothing,
        loss_weights=case.trl_loss_weights,
    )
    batches = [[p] for p in setup.pairs] if case.per_pair else [setup.pairs]
    for i, pairs in enumerate(batches):
        run = _trl_run(trainer, pairs)
        ours = _ours(run["lp"], run["completion_tokens"], case.ours)
        _close(ours["loss"], run["loss"], f"batch {i}: loss")
        for key in (*METRICS, "logps/chosen", "logps/rejected"):
            _close(ours[key], run["metrics"][key], f"batch {i}: {key}")
    if not case.per_pair:
        # The metrics are non-trivial on this batch.
        assert 0.0 < run["metrics"]["rewards/accuracies"] < 1.0


@pytest.mark.parametrize("case", [c for c in CASES if not c.per_pair], ids=lambda c: c.id)
def test_gradients_match(setup: Setup, make_trainer, case: Case) -> None:
    """The training path end to end: our batch -> log-probs -> pass_losses -> gradients of the
    policy, against the gradients of TRL's compute_loss on the same rows and weights."""
    trainer = make_trainer(case.trl_loss_type, beta=case.ours.beta, loss_weights=case.trl_loss_weights)
    batch = _trl_batch(trainer, setup.pairs)
    trainer.model.zero_grad(set_to_none=True)
    trainer.compute_loss(trainer.model, batch).backward()
    theirs = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    policy = copy.deepcopy(setup.policy).train()
    logps, tokens = completion_logps(policy, collate_pairs(setup.pairs, pad_id(setup.tokenizer)))
    b = len(setup.pairs)
    lp = PairLogps(logps[:b], logps[b:], setup.ref_logps[:b], setup.ref_logps[b:])
    losses, _ = pass_losses(lp, tokens, case.ours, float(tokens[:b].float().mean()))
    losses.mean().backward()
    ours = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and ours
    largest = max(g.abs().max().item() for g in theirs.values())
    assert largest > 1e-3, "the gradients are not trivially zero"
    worst = max(((ours[n] - g).abs().max().item(), n) for n, g in theirs.items())
    print(f"{case.id}: largest gradient {largest:.3e}, largest difference {worst[0]:.3e} ({worst[1]})")
    # Both sides sum the same float32 terms in another order (TRL's fused LM head against our
    # chunked gather - logsumexp): differences of a few float32 ulps of the largest gradient.
    assert worst[0] <= 1e-5 * max(1.0, largest), worst
