"""How a set of pairs becomes forward passes: the batch layout, its passes and its row widths.

One object, :class:`PassLayout`, made once per run (a train step or a scoring pass), answers the
two questions the training loop and the scorer ask: which pairs go into each pass
(:meth:`PassLayout.passes`) and how a pass's pairs are laid out (:meth:`PassLayout.collate`).

- ``padded``: two right-padded rows per pair (:func:`sdpo_core.layouts.collate_pairs`).
- ``shared``: one row ``[prompt | chosen | rejected]`` per pair, split attention
  (:func:`sdpo_core.layouts.collate_shared`).
- ``packed``: several pairs per row of a length fixed for the run, FlexAttention block masks
  (:mod:`sdpo_core.packed`).

With ``bucketed`` (``train.compile``), rows of the first two layouts are padded to a few fixed
widths (:func:`sdpo_core.compiling.bucket_width`) so that the compiled layers meet few shapes;
packed rows have one width already.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sdpo_core.compiling import bucket_width
from sdpo_core.layouts import PairBatch, SharedPromptBatch, TokenizedPair, collate, pass_tokens, split_by_tokens
from sdpo_core.packed import PackedBatch, collate_packed, pack_passes, run_row_tokens

LayoutKind = Literal["padded", "shared", "packed"]


@dataclass(frozen=True)
class PassLayout:
    """The batch layout of a run.

    Attributes:
        kind: padded, shared or packed.
        row_tokens: packed rows' length, the same for every pass of the run (packed only).
        bucketed: pad rows to :func:`sdpo_core.compiling.bucket_width` widths (padded, shared).
    """

    kind: LayoutKind
    row_tokens: int | None = None
    bucketed: bool = False

    @classmethod
    def of(
        cls, shared_prompt: bool | str, pairs: Sequence[TokenizedPair], packed_row_tokens: int, bucketed: bool = False
    ) -> PassLayout:
        """The layout of ``train.shared_prompt`` (made concrete for the device: not ``auto``) for ``pairs``.

        A packed run's row length is fixed from all its pairs at once (:func:`run_row_tokens`).
        """
        if shared_prompt == "packed":
            return cls("packed", run_row_tokens(pairs, packed_row_tokens))
        if shared_prompt == "auto" or not isinstance(shared_prompt, bool):
            raise ValueError(f"train.shared_prompt: {shared_prompt!r} is not true, false or packed")
        return cls("shared" if shared_prompt else "padded", bucketed=bucketed)

    @property
    def shared(self) -> bool:
        """Whether each prompt is computed once (shared or packed)."""
        return self.kind != "padded"

    def passes(self, ids: Sequence[int], pairs: Sequence[TokenizedPair], max_tokens: int | None) -> list[list[int]]:
        """``ids`` split into passes of at most ``max_tokens`` tokens (None: one pass).

        Padded and shared passes are length-sorted and pay for their widest row; packed passes
        hold ``max_tokens // row_tokens`` rows (at least one), packed first-fit-decreasing.
        """
        if self.kind == "packed":
            assert self.row_tokens is not None
            return pack_passes(ids, pairs, self.row_tokens, max_tokens)
        return split_by_tokens(list(ids), pairs, max_tokens, self.shared)

    def order(self, ids: Sequence[int], pairs: Sequence[TokenizedPair]) -> list[int]:
        """``ids`` shortest first (what pair-count passes are cut from: short pairs are not padded to long ones)."""
        return sorted(ids, key=lambda i: pass_tokens(pairs[i], self.shared)[1])

    def collate(self, pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch | SharedPromptBatch | PackedBatch:
        """One pass's pairs in this layout, on the host."""
        if self.kind == "packed":
            assert self.row_tokens is not None
            return collate_packed(pairs, pad_id, self.row_tokens)
        width = None
        if self.bucketed:
            width = bucket_width(max(pass_tokens(p, self.shared)[1] for p in pairs))
        return collate(pairs, pad_id, self.shared, width)
