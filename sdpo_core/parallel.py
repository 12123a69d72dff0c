"""Data parallelism for a train step with torch's own engines: DDP, or FSDP (``fully_shard``).

The policy is wrapped in :class:`PolicyLogps`, a module whose forward *is* the completion
log-probs, so the engine's hooks run around the computation that uses the parameters (sdpo's
forward goes through the decoder and the output projection separately, not through the causal
LM's own forward). With ``fsdp`` every decoder layer (the classes a Hugging Face model lists in
``_no_split_modules``) is its own FSDP unit and the wrapper is the root unit holding the
embeddings, the final norm and the output projection.

Checkpoints hold whole state keyed by parameter name (:mod:`sdpo_core.state`), so one written
under any of these resumes under any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from copy import deepcopy

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sdpo_core.config import Parallelism
from sdpo_core.logprobs import Batch, completion_logps
from sdpo_core.state import is_sharded


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
    model: torch.nn.Module, chunk_rows: int, parallelism: Parallelism, world: int, device: torch.device
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
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The shards live on the step's device (fully_shard would pick CUDA whenever there is one).
        mesh = init_device_mesh(device.type, (world,))

        layer_names = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_names]
        if not layers:
            raise ValueError(
                f"train.parallelism=fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules); "
                "use ddp"
            )
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    if parallelism != "ddp":
        raise ValueError(f"train.parallelism: {parallelism!r} is not ddp or fsdp")
    from torch.nn.parallel import DistributedDataParallel

    # Every process builds the same buffers (rotary tables): no need to broadcast them each pass.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Run a backward pass with or without DDP's cross-process gradient reduction.

    Under DDP, passes before the last one of an optimizer step only accumulate locally, and the
    last all-reduces. FSDP reduce-scatters every pass regardless: skipping it would keep each
    process's whole (unsharded) gradient until the last pass, which FSDP is there to avoid.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    else:
        yield


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
    # Built on the meta device (no memory, no random initialisation: for a 7B model that would be
    # minutes and a float32 copy on the CPU), then given the trained tensors in their dtype. The
    # buffers a state dict leaves out (rotary tables) come from the trained model, which holds
    # them whole on every process.
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(weights, strict=True, assign=True)
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = copy.get_submodule(owner)
        if getattr(module, leaf).is_meta:
            setattr(module, leaf, buffer.detach().to("cpu", copy=True))
    copy.tie_weights()
    left = [n for n, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the saved copy of the FSDP model has no values for {left}")
    if getattr(model, "generation_config", None) is not None:
        copy.generation_config = deepcopy(model.generation_config)  # as loaded, not rebuilt
    return copy.eval()
