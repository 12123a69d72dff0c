"""The packed shared-prompt layout: several pairs per row of a fixed length, under a block mask.

Each pair is laid out once as ``[prompt | chosen | rejected]`` (P, C and R tokens) and pairs
follow one another in rows of exactly ``row_tokens`` tokens, padded at the end. Within a pair,
attention is causal except that rejected tokens do not see the chosen ones; nothing attends
across pairs (:mod:`sdpo_core.packed_attention`). Positions restart for each pair and both
completions continue from their prompt (chosen ``P .. P+C-1``, rejected ``P .. P+R-1``), so each
completion's log-probs are those of ``prompt + completion`` alone, as in the padded layout.

The row length is fixed for a run (:func:`run_row_tokens`), so compiled kernels meet the same
shapes in every pass; only the number of rows varies. Pairs go into rows first-fit, in the order
given: each pair into the first row that still holds it. :func:`pack_passes` orders each pass's
pairs so that this reproduces its first-fit-decreasing packing.

Everything indexed is built on the host at collation (the scored tokens' targets and counts);
the mask is built from per-token pair slots and segments on the batch's device when the batch
runs (:meth:`PackedBatch.forward`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdpo_core.attn_swap import swapped
from sdpo_core.layouts import TokenizedPair, to_device
from sdpo_core.packed_attention import (
    CHOSEN,
    NO_FLEX_BACKWARD,
    PACKED_ATTENTION,
    PAD,
    PROMPT,
    REJECTED,
    PackedUnsupported,
    block_mask,
    dense_mask,
    refusal,
    register,
    replaying,
)

ROW_ALIGN = 128
"""A row grown to hold a long pair is a multiple of this (flex attention's block size)."""


@dataclass(frozen=True)
class PackedBatch:
    """B pairs packed into rows of ``row_tokens`` tokens, several pairs per row.

    Attributes:
        input_ids: (rows, L) token ids, padded at each row's end with the pad id.
        position_ids: (rows, L) positions within each pair's prompt + completion; padding 0.
        document: (rows, L) the slot of each token's pair in its row (0, 1, ...); padding -1.
        segment: (rows, L) PROMPT, CHOSEN, REJECTED or PAD (:mod:`sdpo_core.packed_attention`).
        seq, row, pos, labels: (N,) for every scored token: its sequence (chosen of pair i is i,
            rejected is B + i), its row, the column whose hidden state predicts it, the token.
        tokens: (2B,) scored tokens of each sequence, chosen first.
        num_pairs: B.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    document: torch.Tensor
    segment: torch.Tensor
    seq: torch.Tensor
    row: torch.Tensor
    pos: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor
    num_pairs: int

    @property
    def row_tokens(self) -> int:
        """L, the length of every row."""
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> PackedBatch:
        """The batch on ``device``; to CUDA through pinned memory with non-blocking copies."""
        tensors = (self.input_ids, self.position_ids, self.document, self.segment)
        targets = (self.seq, self.row, self.pos, self.labels, self.tokens)
        return PackedBatch(*(to_device(t, device) for t in tensors + targets), self.num_pairs)

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence, row, predicting column, label) of every scored token, each (N,)."""
        return self.seq, self.row, self.pos, self.labels

    def attention_mask(self) -> Any:
        """The rows' mask on their device: a ``BlockMask`` for flex attention, or (rows, 1, L, L)
        booleans for SDPA where flex has no backward (CPUs) and gradients are on."""
        if self.document.device.type in NO_FLEX_BACKWARD and torch.is_grad_enabled():
            return dense_mask(self.document, self.segment)
        return block_mask(self.document, self.segment)

    def forward(self, net: torch.nn.Module) -> Any:
        """``net``'s output on the packed rows (``last_hidden_state`` or ``logits``).

        Args:
            net: a Hugging Face decoder, or a whole causal LM, on the batch's device.

        Raises:
            PackedUnsupported: a ValueError naming the model and the feature this layout cannot
                reproduce (a sliding window narrower than the rows, softcapping, sinks,
                non-causal attention, attention dropout while training, ...).
        """
        decoder = net.get_decoder() if hasattr(net, "get_decoder") else net
        problem = refusal(decoder, self.row_tokens)
        if problem is not None:
            raise PackedUnsupported(f"the packed shared-prompt layout cannot run {type(net).__name__}: {problem}")
        register()
        mask = self.attention_mask()
        with swapped(decoder.config, PACKED_ATTENTION), replaying(decoder):
            return net(input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=mask, use_cache=False)


def _span(pair: TokenizedPair) -> int:
    """Tokens a pair takes in a packed row."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def _first_fit(spans: Sequence[int], row_tokens: int) -> list[int]:
    """The row of each span under first-fit in the given order (each into the first row with room)."""
    free: list[int] = []
    rows = []
    for span in spans:
        row = next((r for r, room in enumerate(free) if room >= span), len(free))
        if row == len(free):
            free.append(row_tokens)
        free[row] -= span
        rows.append(row)
    return rows


def run_row_tokens(pairs: Sequence[TokenizedPair], configured: int) -> int:
    """The run's row length: ``configured``, or the next multiple of :data:`ROW_ALIGN` that holds
    the longest pair (prompt + chosen + rejected) where one is longer."""
    longest = max((_span(p) for p in pairs), default=0)
    if longest <= configured:
        return configured
    return -(-longest // ROW_ALIGN) * ROW_ALIGN


def pack_passes(
    ids: Sequence[int], pairs: Sequence[TokenizedPair], row_tokens: int, max_tokens: int | None
) -> list[list[int]]:
    """Split a micro-batch's pair ids into passes of at most ``max(1, max_tokens // row_tokens)``
    rows each (``max_tokens`` None: one pass).

    The pairs are packed first-fit-decreasing (longest first, each into the first row with room)
    and consecutive rows make a pass. Each pass lists its pairs row by row, longest first within
    the order they were placed, so that :func:`collate_packed` (first-fit in order) rebuilds the
    same rows: a pair placed in a later row did not fit any earlier row when it was placed, and
    earlier rows only fill up.

    Raises:
        ValueError: a pair is longer than ``row_tokens`` (see :func:`run_row_tokens`).
    """
    ordered = sorted(ids, key=lambda i: -_span(pairs[i]))  # stable: ties keep the micro-batch order
    if ordered and _span(pairs[ordered[0]]) > row_tokens:
        raise ValueError(
            f"pair {ordered[0]} takes {_span(pairs[ordered[0]])} tokens, more than packed rows of {row_tokens}"
        )
    rows_of = _first_fit([_span(pairs[i]) for i in ordered], row_tokens)
    n_rows = max(rows_of, default=-1) + 1
    per_pass = n_rows if max_tokens is None else max(1, max_tokens // row_tokens)
    passes: list[list[int]] = [[] for _ in range(-(-n_rows // max(per_pass, 1)))]
    for row in range(n_rows):  # row by row; within a row, in the order the pairs were placed
        passes[row // per_pass].extend(i for i, r in zip(ordered, rows_of, strict=True) if r == row)
    return passes


def collate_packed(pairs: Sequence[TokenizedPair], pad_id: int, row_tokens: int) -> PackedBatch:
    """Pack pairs into rows of exactly ``row_tokens`` tokens, first-fit in the given order.

    Sequence i is the chosen completion of ``pairs[i]`` and B + i its rejected one. Token k of a
    completion is predicted at the column before it, the first token of either completion at the
    pair's last prompt column; with an empty prompt (a tokenizer that adds no BOS) nothing
    predicts a first token, and it is not scored, as in the padded layout.

    Raises:
        ValueError: no pairs, or a pair longer than ``row_tokens`` (see :func:`run_row_tokens`).
    """
    if not pairs:
        raise ValueError("collate_packed: no pairs to pack")
    spans = [_span(p) for p in pairs]
    for i, span in enumerate(spans):
        if span > row_tokens:
            raise ValueError(
                f"pair {i} takes {span} tokens (prompt + chosen + rejected), more than packed rows of {row_tokens}"
            )
    rows_of = _first_fit(spans, row_tokens)
    n_rows, b = max(rows_of) + 1, len(pairs)
    input_ids = torch.full((n_rows, row_tokens), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, row_tokens), dtype=torch.long)
    document = torch.full((n_rows, row_tokens), -1, dtype=torch.long)
    segment = torch.full((n_rows, row_tokens), PAD, dtype=torch.long)
    fill, slots = [0] * n_rows, [0] * n_rows
    seq: list[int] = []
    row: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    tokens = [0] * (2 * b)
    for i, (p, r) in enumerate(zip(pairs, rows_of, strict=True)):
        start, n_p, n_c, n_r = fill[r], len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        end = start + n_p + n_c + n_r
        input_ids[r, start:end] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids, dtype=torch.long)
        position_ids[r, start:end] = torch.cat([torch.arange(n_p + n_c), torch.arange(n_p, n_p + n_r)])
        document[r, start:end] = slots[r]
        segment[r, start:end] = torch.tensor([PROMPT] * n_p + [CHOSEN] * n_c + [REJECTED] * n_r, dtype=torch.long)
        first = 0 if n_p > 0 else 1
        last_prompt = start + n_p - 1
        for offset, completion, s in ((start + n_p, p.chosen_ids, i), (start + n_p + n_c, p.rejected_ids, b + i)):
            predictors = [last_prompt] + list(range(offset, offset + len(completion) - 1))
            scored = max(len(completion) - first, 0)
            seq.extend([s] * scored)
            row.extend([r] * scored)
            pos.extend(predictors[first : len(completion)])
            labels.extend(completion[first:])
            tokens[s] = scored
        fill[r], slots[r] = end, slots[r] + 1
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedBatch(
        input_ids,
        position_ids,
        document,
        segment,
        as_long(seq),
        as_long(row),
        as_long(pos),
        as_long(labels),
        as_long(tokens),
        b,
    )
