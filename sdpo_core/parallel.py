"""Data parallelism for a train step with torch's own engines: DDP, or FSDP (``fully_shard``).

The policy is wrapped in :class:`PolicyLogps`, a module whose forward *is* the completion
log-probs, so the engine's hooks run around the computation that uses the parameters (sdpo's
forward goes through the decoder and the output projection separately, not through the causal
LM's own forward). With ``fsdp`` every decoder layer (the classes a Hugging Face model lists in
``_no_split_modules``) is its own FSDP unit and the wrapper is the root unit holding the
embeddings, the final norm and the output projection.

State (weights and AdamW's moments) is read and written as full, unsharded state dicts keyed by
parameter name, through ``torch.distributed.checkpoint.state_dict``: the same files whether the
step ran in one process, under DDP or under FSDP, so a checkpoint resumes under any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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

from sdpo_core.logprobs import Batch, completion_logps

PARALLELISMS = ("ddp", "fsdp")


class PolicyLogps(torch.nn.Module):
    """The policy as a module whose forward returns each sequence's completion log-probs.

    Args:
        model: a Hugging Face causal LM.
        chunk_rows: completion tokens per chunk of the output projection.
    """

    def __init__(self, model: torch.nn.Module, chunk_rows: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) summed completion log-probs and (2B,) completion token counts."""
        return completion_logps(self.model, batch, self.chunk_rows)


def wrap(
    model: torch.nn.Module, chunk_rows: int, parallelism: str, world: int, device: torch.device
) -> torch.nn.Module:
    """The module a train step runs its passes through.

    One process: :class:`PolicyLogps` as is. Several: under DDP (gradients all-reduced in
    buckets during the backward pass) or FSDP (parameters, gradients and optimizer state
    sharded across the processes). Every process must hold the same weights before the call.
    """
    module = PolicyLogps(model, chunk_rows)
    if world == 1:
        return module
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layer_names = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_names]
        if not layers:
            raise ValueError(
                f"train.parallelism=fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules); "
                "use ddp"
            )
        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    if parallelism != "ddp":
        raise ValueError(f"train.parallelism: {parallelism!r} is not one of {', '.join(PARALLELISMS)}")
    from torch.nn.parallel import DistributedDataParallel

    # Every process builds the same buffers (rotary tables): no need to broadcast them each pass.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP shards."""
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Run a backward pass with or without the cross-process gradient reduction.

    Passes before the last one of an optimizer step only accumulate locally; the last reduces.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


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
    set_optimizer_state_dict(model, optimizer, optim, options=options)


def plain_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """An unsharded copy of an FSDP-trained model, on the CPU, for saving.

    Collective: every process calls it; process 0 gets the copy, the others None. An unsharded
    model is returned as it is.
    """
    if not is_sharded(model):
        return model
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    copy = type(model)(model.config)  # buffers (rotary tables) as the model builds them
    copy.load_state_dict(weights, strict=True, assign=True)  # the trained tensors, in their dtype
    copy.tie_weights()
    return copy.eval()
