"""torch.distributed helpers shared by the training loop and the log-prob passes."""

from __future__ import annotations

import torch


def max_over_processes(value: int, device: torch.device | str) -> int:
    """The largest ``value`` any process of the default group passed (every process must call)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def backend(name: str) -> str:
    """The process group backend for ``train.distributed_backend``: auto is nccl on GPUs, gloo on CPUs."""
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"
