"""Per-sequence completion log-probabilities without a full copy of the logits.

log m(y|x) sums the log-probabilities of the completion tokens only; the prompt and padding are
masked. Only the hidden states at completion positions go through the output projection, in
chunks of rows, and each chunk's log-prob is ``gather(logits, label) - logsumexp(logits)``
(no log-softmax tensor). While training, each chunk is recomputed in the backward pass
(activation checkpointing), so at most one chunk of logits, ``(chunk_rows, V)``, is ever alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; completions end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class PairBatch:
    """B pairs laid out as 2B right-padded rows: chosen rows first, then rejected rows.

    Attributes:
        input_ids: (2B, T) token ids, padded with the pad id.
        attention_mask: (2B, T) 1 for real tokens.
        completion_mask: (2B, T) 1 for completion tokens (the ones that are scored).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion_mask)))


def pair_length(pair: TokenizedPair) -> int:
    """Width of the pair's longer row."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    """Lay out pairs as 2B right-padded rows (chosen first, then rejected)."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n_p, n_c = len(prompt), len(completion)
        input_ids[i, : n_p + n_c] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, : n_p + n_c] = 1
        completion_mask[i, n_p : n_p + n_c] = 1
    return PairBatch(input_ids, attention_mask, completion_mask)


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
    for start in range(0, hidden.shape[0], chunk_rows):
        h, y = hidden[start : start + chunk_rows], labels[start : start + chunk_rows]
        if torch.is_grad_enabled() and h.requires_grad:
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


def completion_logps(
    model: torch.nn.Module, batch: PairBatch, chunk_rows: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion token counts for each row.

    Args:
        model: a Hugging Face causal LM.
        batch: R rows (2B for B pairs), on the model's device.
        chunk_rows: completion tokens per chunk of the output projection.

    Returns:
        logps: (R,) float32, sum over completion tokens of log p(token | previous tokens).
        tokens: (R,) number of completion tokens per row.
    """
    target = batch.completion_mask[:, 1:].bool()  # (R, T-1): token t+1 is predicted at t
    rows, cols = target.nonzero(as_tuple=True)  # (N,), (N,)
    labels = batch.input_ids[:, 1:][rows, cols]  # (N,)
    if _has_plain_head(model):
        out = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        hidden = out.last_hidden_state[:, :-1][rows, cols]  # (N, D)
        per_token = token_logps(hidden, labels, model.get_output_embeddings(), chunk_rows)
    else:
        # Models that post-process their logits: take them as the model gives them.
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        picked = logits[:, :-1][rows, cols]  # (N, V)
        per_token = token_logps(picked, labels, torch.nn.Identity(), chunk_rows)
    num_rows = batch.input_ids.shape[0]
    logps = torch.zeros(num_rows, dtype=torch.float32, device=per_token.device).index_add(0, rows, per_token)
    tokens = torch.bincount(rows, minlength=num_rows)
    return logps, tokens


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    batch_size: int,
    chunk_rows: int = 2048,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Forward-only log-probs of every pair, in batches (used for reference log-probs and eval).

    Returns:
        ``chosen`` and ``rejected`` (N,) summed log-probs; ``chosen_tokens`` and
        ``rejected_tokens`` (N,) completion lengths.
    """
    if not pairs:
        empty = torch.zeros(0)
        return {"chosen": empty, "rejected": empty, "chosen_tokens": empty.long(), "rejected_tokens": empty.long()}
    was_training = model.training
    model.eval()
    chosen, rejected, n_chosen, n_rejected = [], [], [], []
    # Length-sorted batches pad less; results are put back in the original order.
    order = sorted(range(len(pairs)), key=lambda i: pair_length(pairs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate_pairs([pairs[i] for i in idx], pad_id).to(device)
        logps, tokens = completion_logps(model, batch, chunk_rows)
        b = len(idx)
        chosen.append(logps[:b].cpu())
        rejected.append(logps[b:].cpu())
        n_chosen.append(tokens[:b].cpu())
        n_rejected.append(tokens[b:].cpu())
    model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {
        "chosen": torch.cat(chosen)[inverse],
        "rejected": torch.cat(rejected)[inverse],
        "chosen_tokens": torch.cat(n_chosen)[inverse],
        "rejected_tokens": torch.cat(n_rejected)[inverse],
    }
