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
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from sdpo_core import attention
from sdpo_core.attention import SplitLayout
from sdpo_core.collectives import max_over_processes


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; completions end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class PairBatch:
    """B pairs laid out as 2B right-padded rows: chosen rows first, then rejected rows. The
    forward relies on the padding being on the right (:meth:`model_inputs`).

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

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The forward's inputs: the token ids alone. The rows are right-padded, so under causal
        attention no scored token sees a pad, and without a padding mask the model's attention
        can take its plain causal path (on a GPU, SDPA's fused causal kernels, with no mask to
        build and no key/value heads repeated for grouped-query attention). Pads get positions
        past their row's end and outputs that are never read."""
        return {"input_ids": self.input_ids}

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence, row, predicting position, label) of every scored token, each (N,)."""
        rows, cols = self.completion_mask[:, 1:].bool().nonzero(as_tuple=True)  # token t+1 is predicted at t
        return rows, rows, cols, self.input_ids[rows, cols + 1]


@dataclass(frozen=True)
class SharedPromptBatch:
    """B pairs as B rows ``[prompt | chosen | rejected | pad]``: the prompt is computed once.

    The rejected tokens see the prompt and themselves but not the chosen tokens, and their
    positions continue from the prompt, so each completion's log-probs are those of
    ``prompt + completion`` alone; the first rejected token is predicted from the last prompt
    position, like the first chosen one. Models that go through transformers' attention interface
    compute this as two attention calls (``split``, see :mod:`sdpo_core.attention`); others
    get the 4-D ``attention_mask``, which is built only for them: (B, T, T) booleans would
    otherwise be made for every pass and thrown away.

    Attributes:
        input_ids: (B, T) token ids, padded with the pad id.
        position_ids: (B, T) positions within prompt + completion.
        lengths: (B, 3) prompt, chosen and rejected lengths of each row.
        seq, row, pos, labels: (N,) for every scored token: its sequence (chosen of pair i is i,
            rejected is B + i), its row, the position whose hidden state predicts it, the token.
        split: where prompt + chosen and prompt + rejected lie in each row, for split attention.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor
    seq: torch.Tensor
    row: torch.Tensor
    pos: torch.Tensor
    labels: torch.Tensor
    split: SplitLayout

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        tensors = (self.input_ids, self.position_ids, self.lengths, self.seq, self.row, self.pos, self.labels)
        return SharedPromptBatch(*(t.to(device) for t in tensors), self.split.to(device))

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, 1, T, T) True where a query position may attend to a key position, built on the batch's device.

        Causal, except that rejected queries do not see the chosen keys; padding queries (never
        scored) attend causally.
        """
        width = self.input_ids.shape[1]
        cols = torch.arange(width, device=self.input_ids.device)
        query, key = cols[None, :, None], cols[None, None, :]  # (1, T, 1), (1, 1, T)
        n_p, n_c, n_r = (self.lengths[:, i, None, None] for i in range(3))  # (B, 1, 1) each
        rejected_query = (query >= n_p + n_c) & (query < n_p + n_c + n_r)
        chosen_key = (key >= n_p) & (key < n_p + n_c)
        return ((key <= query) & ~(rejected_query & chosen_key)).unsqueeze(1)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.seq, self.row, self.pos, self.labels


Batch = PairBatch | SharedPromptBatch


def pair_length(pair: TokenizedPair) -> int:
    """Width of the pair's longer row."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def pass_tokens(pair: TokenizedPair, shared_prompt: bool) -> tuple[int, int]:
    """(rows, row width) a pair takes in a batch of either layout."""
    if shared_prompt:
        return 1, len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    return 2, pair_length(pair)


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


def collate_shared(pairs: Sequence[TokenizedPair], pad_id: int) -> SharedPromptBatch:
    """Lay out pairs as B rows ``[prompt | chosen | rejected]`` with a split layout (and a 4-D mask on demand)."""
    b = len(pairs)
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    width = max(n_p + n_c + n_r for n_p, n_c, n_r in lengths)
    prefix = max(n_p + n_c for n_p, n_c, _ in lengths)  # A: every row's prompt + chosen
    rejected_width = max(n_p + n_r for n_p, _, n_r in lengths)  # L: every row's prompt + rejected
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    most_rejected = max(n_r for _, _, n_r in lengths)  # M
    rejected_index = torch.zeros((b, rejected_width), dtype=torch.long)  # padding slots read column 0
    query_index = torch.zeros((b, most_rejected), dtype=torch.long)
    query_slot = torch.zeros((b, most_rejected), dtype=torch.long)
    output_index = torch.zeros((b, width), dtype=torch.long)  # padding columns read output 0
    seq, row, pos, labels = [], [], [], []
    for i, (p, (n_p, n_c, n_r)) in enumerate(zip(pairs, lengths, strict=True)):
        end = n_p + n_c + n_r
        input_ids[i, :end] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids, dtype=torch.long)
        position_ids[i, : n_p + n_c] = torch.arange(n_p + n_c)
        position_ids[i, n_p + n_c : end] = torch.arange(n_p, n_p + n_r)
        position_ids[i, end:] = torch.arange(width - end)  # padding: any valid position
        # Split attention: prompt + rejected (keys, values) and the rejected tokens (queries)
        # gathered from the row; outputs read back from [prefix outputs (A) | rejected outputs (M)].
        rejected_index[i, :n_p] = torch.arange(n_p)
        rejected_index[i, n_p : n_p + n_r] = torch.arange(n_p + n_c, end)
        query_index[i, :n_r] = torch.arange(n_p + n_c, end)
        query_slot[i, :n_r] = torch.arange(n_p, n_p + n_r)
        output_index[i, : n_p + n_c] = torch.arange(n_p + n_c)
        output_index[i, n_p + n_c : end] = torch.arange(prefix, prefix + n_r)
        # Token k of a completion is predicted at the position before it; the first token of
        # either completion at the last prompt position. With an empty prompt (a tokenizer that
        # adds no BOS) nothing predicts a first token: it is not scored, as in the padded layout.
        first = 0 if n_p > 0 else 1
        for offset, n, s in ((n_p, n_c, i), (n_p + n_c, n_r, b + i)):
            predictors = [n_p - 1] + list(range(offset, offset + n - 1))
            seq.extend([s] * max(n - first, 0))
            row.extend([i] * max(n - first, 0))
            pos.extend(predictors[first:n])
            labels.extend(input_ids[i, offset + first : offset + n].tolist())
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    # Rejected query j of a row is slot P + j of its gathered prompt + rejected: it sees keys 0 .. P + j.
    prompt_lengths = torch.tensor([n_p for n_p, _, _ in lengths], dtype=torch.long)
    last_key = prompt_lengths[:, None, None] + torch.arange(most_rejected)[None, :, None]  # (B, M, 1)
    rejected_mask = (torch.arange(rejected_width)[None, None, :] <= last_key).unsqueeze(1)  # (B, 1, M, L)
    split = SplitLayout(prefix, rejected_index, query_index, query_slot, rejected_mask, output_index)
    return SharedPromptBatch(
        input_ids, position_ids, as_long(lengths), as_long(seq), as_long(row), as_long(pos), as_long(labels), split
    )


def collate(pairs: Sequence[TokenizedPair], pad_id: int, shared_prompt: bool) -> Batch:
    """The batch layout for ``shared_prompt``."""
    return collate_shared(pairs, pad_id) if shared_prompt else collate_pairs(pairs, pad_id)


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


def _forward(model: torch.nn.Module, net: torch.nn.Module, batch: Batch) -> Any:
    """``net``'s output on ``batch`` (``net`` is ``model`` or its decoder).

    A shared-prompt batch takes split attention (two calls, no (B, 1, T, T) mask) where the decoder
    allows it, and the 4-D mask otherwise; a forward in which split attention turned out not to
    apply is done again with the mask, and the decoder is not tried again.
    """
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


def completion_logps(model: torch.nn.Module, batch: Batch, chunk_rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion token counts for each sequence.

    Args:
        model: a Hugging Face causal LM.
        batch: B pairs in either layout, on the model's device.
        chunk_rows: completion tokens per chunk of the output projection.

    Returns:
        logps: (2B,) float32, sum over completion tokens of log p(token | prompt, earlier
            tokens); chosen sequences first, then rejected.
        tokens: (2B,) number of completion tokens per sequence.
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
    tokens = torch.bincount(seq, minlength=num_seqs)
    return logps, tokens


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    batch_size: int,
    chunk_rows: int = 2048,
    device: torch.device | str = "cpu",
    shared_prompt: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Forward-only log-probs of every pair, in batches (used for reference log-probs and eval).

    ``shared_prompt`` picks the batch layout (:class:`SharedPromptBatch` or :class:`PairBatch`).
    ``progress(done, total)`` is called with the pairs scored so far after each batch.

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
    order = sorted(range(len(pairs)), key=lambda i: pass_tokens(pairs[i], shared_prompt)[1])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([pairs[i] for i in idx], pad_id, shared_prompt).to(device)
        logps, tokens = completion_logps(model, batch, chunk_rows)
        b = len(idx)
        chosen.append(logps[:b].cpu())
        rejected.append(logps[b:].cpu())
        n_chosen.append(tokens[:b].cpu())
        n_rejected.append(tokens[b:].cpu())
        if progress is not None:
            progress(start + b, len(order))
    model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {
        "chosen": torch.cat(chosen)[inverse],
        "rejected": torch.cat(rejected)[inverse],
        "chosen_tokens": torch.cat(n_chosen)[inverse],
        "rejected_tokens": torch.cat(n_rejected)[inverse],
    }
