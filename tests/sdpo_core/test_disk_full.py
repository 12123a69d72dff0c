"""A disk that fills while a checkpoint is written: one clear error (which tasks.retries does not
retry: tests/tasks/test_retries.py), nothing half-written left, the previous checkpoint still
``latest``."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from sdpo_core import checkpoint
from sdpo_core.checkpoint import LATEST, Checkpoints
from sdpo_core.files import DiskFullError


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_a_full_disk_during_a_checkpoint_is_clear_and_leaves_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler = _trained()
    ckpt = Checkpoints(tmp_path / "ckpt", every=1)
    first = ckpt.save(1, model, optimizer, scheduler, [{"loss": 1.0}])
    real_save_file = checkpoint.save_file

    def fills_the_disk(tensors: dict, filename: str) -> None:
        if Path(filename).name == "optimizer.safetensors":
            Path(filename).write_bytes(b"\0" * 64)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save_file(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    with pytest.raises(DiskFullError, match="the disk is full") as caught:
        ckpt.save(2, model, optimizer, scheduler, [{"loss": 1.0}, {"loss": 0.9}])
    assert str(tmp_path / "ckpt" / "step-00000002") in str(caught.value)
    # No temporary folder, no step-2 folder: only the first checkpoint and its pointer.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [LATEST, first.name]
    assert ckpt.latest() == first
