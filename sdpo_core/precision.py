"""Training precision: master weights, compute dtype, loss scaling (``train.precision``).

Mixed precision keeps fp32 master weights that AdamW updates, and runs the forward and backward in
bf16 or fp16 under ``torch.autocast``. Pure bf16 updates bf16 weights in place, which at DPO
learning rates rounds most updates away: 10 AdamW steps at lr 5e-7 changed 1.2% of a model's bf16
weights against 99.98% in fp32 (shared/DESIGN.md, "Numerics that real models need"). It must be
asked for by name, and warns when the learning rate is small.

The reference is scored in the same precision as the policy trains (sdpo_core.scores), so that
h = gamma_policy - gamma_ref is 0 at the start of every step.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sdpo_core.config import ModelConfig, TrainConfig

BF16_PURE_SMALL_LR = 1e-4
"""Below this learning rate pure bf16 warns: bf16 keeps 8 significant bits, so an update smaller
than about 1/256 of a weight is lost, and AdamW's first updates are about the learning rate."""


@dataclass(frozen=True)
class Precision:
    """A resolved ``train.precision``."""

    name: str
    """fp32, bf16-mixed, fp16-mixed or bf16-pure."""
    master: torch.dtype
    """The dtype of the weights the optimizer updates (and a step model is saved in by default)."""
    compute: torch.dtype | None
    """The autocast dtype of the forward and backward; None: no autocast."""

    @property
    def scaled(self) -> bool:
        """Whether the loss is scaled (fp16's narrow exponent range)."""
        return self.compute == torch.float16

    @contextlib.contextmanager
    def autocast(self, device: torch.device | str) -> Iterator[None]:
        """The compute precision for the block (nothing for fp32 and pure bf16)."""
        if self.compute is None:
            yield
            return
        with torch.autocast(device_type=torch.device(device).type, dtype=self.compute):
            yield


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, None),
    "bf16-mixed": Precision("bf16-mixed", torch.float32, torch.bfloat16),
    "fp16-mixed": Precision("fp16-mixed", torch.float32, torch.float16),
    "bf16-pure": Precision("bf16-pure", torch.bfloat16, None),
}


def resolve_precision(train: TrainConfig, model: ModelConfig, device: torch.device | str) -> Precision:
    """``train.precision``, with ``auto`` resolved: a bfloat16 or float16 ``model.dtype`` gives the
    mixed precision of that dtype; float32 gives bf16-mixed on a GPU that supports bf16 and fp32
    elsewhere."""
    name = train.precision
    if name == "auto":
        if model.dtype == "bfloat16":
            name = "bf16-mixed"
        elif model.dtype == "float16":
            name = "fp16-mixed"
        elif torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
            name = "bf16-mixed"
        else:
            name = "fp32"
    precision = PRECISIONS[name]
    if name == "bf16-pure" and train.learning_rate < BF16_PURE_SMALL_LR:
        warnings.warn(
            f"train.precision=bf16-pure with learning rate {train.learning_rate:g}: bf16 weights round away "
            f"updates this small (below {BF16_PURE_SMALL_LR:g}); bf16-mixed keeps fp32 master weights",
            stacklevel=2,
        )
    return precision


def save_dtype(model: ModelConfig, train: TrainConfig) -> torch.dtype:
    """The dtype a model is saved in: the master weights' unless ``model.save_dtype`` says.

    The master dtype does not depend on the device (``auto`` always resolves to fp32 master
    weights), so no device is needed, and nothing warns a second time."""
    if model.save_dtype != "master":
        return getattr(torch, model.save_dtype)
    return PRECISIONS["fp32" if train.precision == "auto" else train.precision].master
