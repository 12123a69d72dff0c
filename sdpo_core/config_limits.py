"""Bounds of a run config's values that types alone accept (used by sdpo_core.config_rules):
every optimiser and LoRA number finite and in range, the device one torch knows, names within
what MLflow stores; and how an offending value is shown, cut short (a hostile recipe must not make
the message itself huge)."""

from __future__ import annotations

import re
from typing import Any

MAX_SHOWN = 60
"""Characters of an offending value shown in a message: a hostile recipe (a YAML alias bomb) must
not make the message itself huge."""


def shown(value: Any) -> str:
    """``value``'s type and repr, cut to MAX_SHOWN characters."""
    text = reprlib_repr(value)
    return f"{type(value).__name__} {text}"


def reprlib_repr(value: Any) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = MAX_SHOWN
    r.maxlist = r.maxdict = r.maxtuple = 6
    r.maxlevel = 2
    text = r.repr(value)
    return text if len(text) <= 2 * MAX_SHOWN else text[: 2 * MAX_SHOWN] + "..."


DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")
"""The devices train.device may name (torch's spelling)."""

MAX_SOURCE_NAME = 100
"""A source's name becomes an MLflow dataset name (at most 500 characters), a step's chunk label,
tags and task run names: kept short and printable."""

MAX_EXPERIMENT_NAME = 200
"""MLflow keeps experiment names in a 256-character column."""


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def train_problems(cfg: Any) -> list[str]:
    """Optimiser, device, LoRA and naming values of a RunConfig that types alone accept."""
    problems: list[str] = []
    t, loss = cfg.train, cfg.loss
    if not DEVICE.fullmatch(t.device):
        problems.append(f"train.device: must be auto, cpu, mps, cuda or cuda:N, got {shown(t.device)}")
    for i, beta in enumerate(t.adam_betas):
        if not (_finite(beta) and 0.0 <= beta < 1.0):
            problems.append(f"train.adam_betas.{i}: must be in [0, 1), got {beta}")
    for key, value in (
        ("train.weight_decay", t.weight_decay),
        ("train.max_grad_norm", t.max_grad_norm),
        ("loss.dpop_lambda", loss.dpop_lambda),
        ("loss.nll_weight", loss.nll_weight),
    ):
        if not (_finite(value) and value >= 0):
            problems.append(f"{key}: must be a finite number, 0 or more, got {value}")
    if not (_finite(t.min_lr_ratio) and 0.0 <= t.min_lr_ratio <= 1.0):
        problems.append(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if not (_finite(t.lora.alpha) and t.lora.alpha > 0):
        problems.append(f"train.lora.alpha: must be a positive finite number, got {t.lora.alpha}")
    if not (_finite(t.lora.dropout) and 0.0 <= t.lora.dropout < 1.0):
        problems.append(f"train.lora.dropout: must be in [0, 1), got {t.lora.dropout}")
    if t.carry_optimizer and t.lora.r > 0:  # a fresh adapter each step: no moments to carry
        problems.append(f"train.carry_optimizer: needs full fine-tuning (train.lora.r = 0), got r = {t.lora.r}")
    if t.carry_optimizer and t.init == "base":  # M(t-1)'s moments do not belong to a policy started from M0
        problems.append(
            "train.carry_optimizer: carries M(t-1)'s moments, so the policy must start there (train.init=previous)"
        )
    for i, source in enumerate(cfg.data.sources):
        if len(source.name) > MAX_SOURCE_NAME or not source.name.isprintable() or not source.name.strip():
            problems.append(
                f"data.sources.{i}.name: 1-{MAX_SOURCE_NAME} printable characters, got {shown(source.name)}"
            )
    name = cfg.tracking.experiment
    if len(name) > MAX_EXPERIMENT_NAME or not name.isprintable() or not name.strip():
        problems.append(f"tracking.experiment: 1-{MAX_EXPERIMENT_NAME} printable characters, got {shown(name)}")
    return problems
