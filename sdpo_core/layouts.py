"""Batch layouts of preference pairs, built on the host.

Everything a pass needs besides the forward itself is computed here, in collation, on the CPU:
the (sequence, row, position, label) of every scored token and each sequence's token count. The
device then never has to find them (``nonzero`` or ``bincount`` on a GPU read their sizes back to
the host, a sync per pass), and a batch reaches the device in one pinned, non-blocking copy per
tensor (:func:`to_device`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdpo_core.attention import RECTANGLE_DEVICES, SplitLayout


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; completions end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory, without blocking.

    A copy from pageable memory blocks the host until the GPU has done all its queued work; from
    pinned memory it is queued like a kernel (torch keeps the pinned block alive until the copy
    has run).
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _long(values: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@dataclass(frozen=True)
class PairBatch:
    """B pairs laid out as 2B right-padded rows: chosen rows first, then rejected rows. The
    forward relies on the padding being on the right (:meth:`model_inputs`).

    Attributes:
        input_ids: (2B, T) token ids, padded with the pad id.
        attention_mask: (2B, T) 1 for real tokens.
        completion_mask: (2B, T) 1 for completion tokens (the ones that are scored).
        seq, row, pos, labels: (N,) for every scored token: its sequence (the row), its row, the
            position whose hidden state predicts it (the one before it), the token.
        tokens: (2B,) scored completion tokens of each sequence.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    seq: torch.Tensor
    row: torch.Tensor
    pos: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(*(to_device(t, device) for t in dataclasses.astuple(self)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The forward's inputs: the token ids alone. The rows are right-padded, so under causal
        attention no scored token sees a pad, and without a padding mask the model's attention
        can take its plain causal path (on a GPU, SDPA's fused causal kernels, with no mask to
        build and no key/value heads repeated for grouped-query attention). Pads get positions
        past their row's end and outputs that are never read."""
        return {"input_ids": self.input_ids}

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence, row, predicting position, label) of every scored token, each (N,)."""
        return self.seq, self.row, self.pos, self.labels


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
        tokens: (2B,) scored completion tokens of each sequence.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor
    seq: torch.Tensor
    row: torch.Tensor
    pos: torch.Tensor
    labels: torch.Tensor
    split: SplitLayout
    tokens: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        move = lambda t: to_device(t, device)  # noqa: E731
        split = self.split
        if torch.device(device).type not in RECTANGLE_DEVICES:
            split = dataclasses.replace(split, rejected_mask=None)  # not read there: not copied
        tensors = {f.name: getattr(split, f.name) for f in dataclasses.fields(split)}
        moved = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
        # SplitLayout.to is left the last word on what it keeps; its tensors are there already.
        split = SplitLayout(**moved).to(device)
        tensors = (self.input_ids, self.position_ids, self.lengths, self.seq, self.row, self.pos, self.labels)
        return SharedPromptBatch(*(move(t) for t in tensors), split, move(self.tokens))

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


def split_by_tokens(
    ids: list[int], pairs: Sequence[TokenizedPair], max_tokens: int | None, shared_prompt: bool = True
) -> list[list[int]]:
    """Split ``ids`` into length-sorted passes of at most ``max_tokens`` padded tokens.

    A pass pads its rows to its longest row. Sorting by length first means short pairs are not
    padded to long ones, and a token budget bounds the activations of one pass. The loss is a sum
    over pairs, so the gradient of a micro-batch does not change (only the order of
    floating-point additions does). A pair longer than the budget gets a pass of its own.
    """
    if max_tokens is None:
        return [ids]
    ordered = sorted(ids, key=lambda i: pass_tokens(pairs[i], shared_prompt)[1])
    passes: list[list[int]] = []
    current: list[int] = []
    for i in ordered:
        rows, width = pass_tokens(pairs[i], shared_prompt)  # sorted: the newest pair is the widest
        if current and rows * (len(current) + 1) * width > max_tokens:
            passes.append(current)
            current = []
        current.append(i)
    passes.append(current)
    return passes


def _scored(n_p: int, offset: int, n: int) -> list[int]:
    """Positions predicting the n completion tokens at ``offset`` of a row whose prompt has n_p
    tokens: the first is predicted at the last prompt position, token k > 0 at the one before it.
    With an empty prompt (a tokenizer that adds no BOS) nothing predicts a first token: it is not
    scored, in either layout."""
    predictors = [n_p - 1] + list(range(offset, offset + n - 1))
    return predictors[(0 if n_p > 0 else 1) : n]


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, width: int | None = None) -> PairBatch:
    """Lay out pairs as 2B right-padded rows (chosen first, then rejected), at least ``width`` wide.

    Extra padding on the right changes no log-prob: under causal attention no scored token sees it.
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max([len(prompt) + len(completion) for prompt, completion in rows] + [width or 0])
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    seq: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    tokens: list[int] = []
    for i, (prompt, completion) in enumerate(rows):
        n_p, n_c = len(prompt), len(completion)
        input_ids[i, : n_p + n_c] = _long(prompt + completion)
        attention_mask[i, : n_p + n_c] = 1
        completion_mask[i, n_p : n_p + n_c] = 1
        scored = _scored(n_p, n_p, n_c)
        seq.extend([i] * len(scored))
        pos.extend(scored)
        labels.extend(completion[n_c - len(scored) :])
        tokens.append(len(scored))
    seq_t = _long(seq)
    return PairBatch(input_ids, attention_mask, completion_mask, seq_t, seq_t, _long(pos), _long(labels), _long(tokens))


def collate_shared(pairs: Sequence[TokenizedPair], pad_id: int, width: int | None = None) -> SharedPromptBatch:
    """Lay out pairs as B rows ``[prompt | chosen | rejected]`` with a split layout (and a 4-D mask
    on demand), at least ``width`` wide; padding columns are never scored and change no log-prob."""
    b = len(pairs)
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    width = max([n_p + n_c + n_r for n_p, n_c, n_r in lengths] + [width or 0])
    prefix = max(n_p + n_c for n_p, n_c, _ in lengths)  # A: every row's prompt + chosen
    rejected_width = max(n_p + n_r for n_p, _, n_r in lengths)  # L: every row's prompt + rejected
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    most_rejected = max(n_r for _, _, n_r in lengths)  # M
    rejected_index = torch.zeros((b, rejected_width), dtype=torch.long)  # padding slots read column 0
    query_index = torch.zeros((b, most_rejected), dtype=torch.long)
    query_slot = torch.zeros((b, most_rejected), dtype=torch.long)
    output_index = torch.zeros((b, width), dtype=torch.long)  # padding columns read output 0
    seq: list[int] = []
    row: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    tokens = [0] * (2 * b)
    for i, (p, (n_p, n_c, n_r)) in enumerate(zip(pairs, lengths, strict=True)):
        end = n_p + n_c + n_r
        input_ids[i, :end] = _long(p.prompt_ids + p.chosen_ids + p.rejected_ids)
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
        for offset, completion, s in ((n_p, p.chosen_ids, i), (n_p + n_c, p.rejected_ids, b + i)):
            scored = _scored(n_p, offset, len(completion))
            seq.extend([s] * len(scored))
            row.extend([i] * len(scored))
            pos.extend(scored)
            labels.extend(completion[len(completion) - len(scored) :])
            tokens[s] = len(scored)
    # Rejected query j of a row is slot P + j of its gathered prompt + rejected: it sees keys 0 .. P + j.
    prompt_lengths = _long([n_p for n_p, _, _ in lengths])
    last_key = prompt_lengths[:, None, None] + torch.arange(most_rejected)[None, :, None]  # (B, M, 1)
    rejected_mask = (torch.arange(rejected_width)[None, None, :] <= last_key).unsqueeze(1)  # (B, 1, M, L)
    split = SplitLayout(prefix, rejected_index, query_index, query_slot, rejected_mask, output_index)
    return SharedPromptBatch(
        input_ids, position_ids, _long(lengths), _long(seq), _long(row), _long(pos), _long(labels), split, _long(tokens)
    )


def collate(pairs: Sequence[TokenizedPair], pad_id: int, shared_prompt: bool, width: int | None = None) -> Batch:
    """The batch layout for ``shared_prompt``, rows at least ``width`` wide."""
    return collate_shared(pairs, pad_id, width) if shared_prompt else collate_pairs(pairs, pad_id, width)
