"""Whole training state, sharded or not: weights and optimizer state keyed by parameter name.

Read and written through ``torch.distributed.checkpoint.state_dict`` as full, unsharded state
dicts, so the same files come out whether a step ran in one process, under DDP or under FSDP,
and a checkpoint of any of them resumes under any other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

# Parameter-group options that choose how the optimizer computes, not what.
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP shards."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied input and output embeddings), in model order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's weights and the optimizer's state, whole, keyed by parameter name, on the CPU.

    Collective under FSDP: every process calls it. A tied parameter appears once, under the
    first of its names.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))
    weights = get_model_state_dict(model, options=options)
    for names in tied_groups(model):
        for name in names[1:]:
            weights.pop(name, None)
    # Plain tensors on the CPU (an unsharded model's own state is on its device).
    weights = {k: v.detach().cpu() for k, v in weights.items()}
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    return weights, optim


def load_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor], optim: dict[str, Any]
) -> None:
    """Load whole state (as :func:`full_state` gives it) into a model and optimizer, sharded or not.

    Every process loads the same state; under FSDP each keeps its own shard.
    """
    weights = dict(weights)
    for names in tied_groups(model):
        present = [n for n in names if n in weights]
        if present:
            for name in names:
                weights.setdefault(name, weights[present[0]])
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, weights, options=options)
    # Loading replaces each parameter group with the saved one, implementation flags included:
    # a step saved unfused (under FSDP, or before fused AdamW) would resume unfused, and one
    # saved fused would run fused on FSDP's shards. The optimizer keeps the flags it was built with.
    built = [{k: g[k] for k in _IMPLEMENTATION if k in g} for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, optim, options=options)
    for group, flags in zip(optimizer.param_groups, built, strict=True):
        group.update(flags)
        # Fused and capturable kernels keep the step count on the parameter's device, the others on the CPU.
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[param]["step"] = step.to(param.device if on_device else "cpu")
