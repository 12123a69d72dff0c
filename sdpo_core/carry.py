"""AdamW's state and the learning-rate schedule carried across sDPO steps (``train.carry_optimizer``).

The paper restarts the optimizer at every step: fresh AdamW moments and a new warmup + cosine.
TR-DPO's hard update does the same when it swaps the reference. Carrying both tells the two
effects apart: step t starts from the moments M(t-1) ended with, and one schedule runs over the
whole chain, so the only thing that changes between steps is the reference.

The moments are saved beside the step model, in a sub-folder ``optimizer/`` (safetensors and
JSON, the checkpoints' format), so they are registered with it; a sub-folder keeps them out of
the weights' sha256 (:func:`sdpo_core.fingerprint.weights_sha256` reads the top level only).
"""

from __future__ import annotations

import itertools
import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sdpo_core.checkpoint import _optimizer_state, _optimizer_tensors
from sdpo_core.state import load_full_state

MOMENTS_DIR = "optimizer"
"""The step model's sub-folder holding the optimizer state it ended with."""


@dataclass(frozen=True)
class Carry:
    """What a train step takes over from the chain before it.

    Attributes:
        offset: optimizer steps of the chain before this step: where its schedule starts.
        total: optimizer steps of the whole chain; 0: the step's own plan (a schedule per step).
        moments: the optimizer state M(t-1) was saved with (:func:`read_moments`); None: fresh.
    """

    offset: int = 0
    total: int = 0
    moments: dict[str, Any] | None = None


def chain_schedule(plan_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, total) of each step, given each step's optimizer steps in chain order."""
    total = sum(plan_lengths)
    offsets = itertools.accumulate([0, *plan_lengths[:-1]])
    return [(offset, total) for offset in offsets]


def shifted(factor: Callable[[int], float], offset: int) -> Callable[[int], float]:
    """``factor`` seen from ``offset`` optimizer steps on: this step's slice of the chain's schedule."""
    if offset == 0:
        return factor
    return lambda step: factor(step + offset)


def save_moments(model_dir: str | Path, optim: dict[str, Any]) -> Path:
    """Write a full optimizer state (:func:`sdpo_core.state.full_state`) into ``model_dir``.

    Written to a temporary folder and renamed into place: a crash leaves no half-written state.
    """
    final = Path(model_dir) / MOMENTS_DIR
    tmp = Path(model_dir) / f".{MOMENTS_DIR}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        tensors, rest = _optimizer_tensors(optim)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(rest, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_moments(model_dir: str | Path) -> dict[str, Any] | None:
    """The optimizer state saved in ``model_dir`` by :func:`save_moments`; None if it has none."""
    folder = Path(model_dir) / MOMENTS_DIR
    if not (folder / "optimizer.json").is_file():
        return None
    try:
        rest = json.loads((folder / "optimizer.json").read_text())
        return _optimizer_state(load_file(str(folder / "optimizer.safetensors")), rest)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{folder}: unreadable optimizer state: {exc}") from exc


def load_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer, moments: dict[str, Any]) -> None:
    """Load carried moments into a fresh ``optimizer`` (after the model is wrapped, as
    :meth:`sdpo_core.checkpoint.Checkpoints.restore` does); the weights stay as they are.

    The learning rate, betas, eps and weight decay stay this step's (its config and schedule);
    only the per-parameter state (moments, step counts) comes from M(t-1).
    """
    if len(moments["param_groups"]) != len(optimizer.param_groups):
        raise RuntimeError(
            f"the carried optimizer state has {len(moments['param_groups'])} parameter groups, this step's "
            f"optimizer {len(optimizer.param_groups)}"
        )
    # Each group's settings from this optimizer, its parameters (by name) from the saved state.
    groups = [
        {k: v for k, v in group.items() if k != "params"} | {"params": saved["params"]}
        for group, saved in zip(optimizer.param_groups, moments["param_groups"], strict=True)
    ]
    # The policy's own weights, whole in every process (full_state's CPU offload leaves them on
    # process 0 only under FSDP): loading them back changes nothing.
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    try:
        load_full_state(model, optimizer, weights, {"state": moments["state"], "param_groups": groups})
    except (KeyError, RuntimeError, ValueError) as exc:
        raise RuntimeError(f"the carried optimizer state does not fit this model: {exc}") from exc
