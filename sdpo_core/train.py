"""One DPO step: train a policy on a chunk against precomputed reference log-probs.

The reference model is not in memory while the policy trains: its log-probs of every pair are
computed once, before training (:func:`sdpo_core.logprobs.score_pairs`), and passed in. Metrics
leave through a callback, one call per optimizer step, with TRL's names.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from sdpo_core import attention
from sdpo_core.carry import Carry, load_moments, shifted
from sdpo_core.checkpoint import Checkpoints
from sdpo_core.collectives import max_over_processes
from sdpo_core.compiling import compiled_layers
from sdpo_core.config import LossConfig, TrainConfig
from sdpo_core.layouts import TokenizedPair, to_device
from sdpo_core.losses import PairLogps, get_loss, implicit_rewards, pass_losses
from sdpo_core.parallel import gradient_sync, wrap
from sdpo_core.passes import PassLayout
from sdpo_core.precision import PRECISIONS, Precision
from sdpo_core.state import full_state, is_sharded

MetricsCallback = Callable[[int, dict[str, float]], None]
# Per-pair quantities summed over an optimizer step, for its metrics.
METRIC_SUMS = ("loss", "chosen", "rejected", "acc", "logps_c", "logps_r", "nll", "abs_h")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); retrying will not help."""


@dataclass(frozen=True)
class TrainResult:
    optimizer_steps: int
    final_loss: float
    history: list[dict[str, float]]
    resumed_from: int = 0
    """Optimizer steps restored from a checkpoint (0: trained from the start)."""
    optimizer_state: dict[str, Any] | None = None
    """The optimizer's full state at the end, when it is carried to the next step (else None)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batch_plan(num_pairs: int, cfg: TrainConfig) -> list[list[list[int]]]:
    """Pair indices of each micro-batch of each optimizer step, over all epochs.

    The order is a seeded shuffle per epoch, so a step's global batch is the same whatever the
    split into micro-batches (micro_batch_size x grad_accum_steps is what counts).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    global_batch = cfg.micro_batch_size * cfg.grad_accum_steps
    plan = []
    for _ in range(cfg.epochs):
        order = torch.randperm(num_pairs, generator=gen).tolist()
        for start in range(0, num_pairs, global_batch):
            step_ids = order[start : start + global_batch]
            plan.append([step_ids[i : i + cfg.micro_batch_size] for i in range(0, len(step_ids), cfg.micro_batch_size)])
    return plan


def for_device(cfg: TrainConfig, device: torch.device | str) -> TrainConfig:
    """``cfg`` with its ``auto`` layout settings made concrete for ``device``.

    On a CPU: the shared-prompt layout and passes of at most 1024 tokens (less padding and less
    memory). On a GPU: two padded rows per pair, one pass per micro-batch, and scoring passes of
    32768 tokens. Measured on an H100
    (bf16, 523M Llama, 16-pair micro-batches; benchmarks/results/gpu): the shared layout, even
    with split attention, trained 22.9 pairs/s against padded rows' 27.1 and 44.3, and passes of
    4096 tokens 13.9 (too small to keep the GPU busy).
    """
    on_gpu = torch.device(device).type != "cpu"
    changes: dict[str, object] = {}
    if cfg.shared_prompt == "auto":
        changes["shared_prompt"] = not on_gpu
    if cfg.max_pass_tokens == "auto":
        changes["max_pass_tokens"] = None if on_gpu else 1024
    if cfg.score_pass_tokens == "auto":
        # Forward-only passes keep no activations: a large budget fills a GPU; on a CPU,
        # eval_batch_size pairs a pass as before.
        changes["score_pass_tokens"] = 32768 if on_gpu else None
    return cfg.model_copy(update=changes) if changes else cfg


def world_and_rank() -> tuple[int, int]:
    """(number of processes, this process's rank); (1, 0) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def train_dpo(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    ref: dict[str, torch.Tensor],
    pad_id: int,
    train_cfg: TrainConfig,
    loss_cfg: LossConfig,
    device: torch.device | str = "cpu",
    callback: MetricsCallback | None = None,
    checkpoints: Checkpoints | None = None,
    precision: Precision | None = None,
    carry: Carry | None = None,
) -> TrainResult:
    """Train ``model`` in place with DPO on ``pairs``.

    Args:
        model: the policy, initialised from the reference M(t-1).
        pairs: the step's chunk, tokenized.
        ref: the reference's ``chosen`` and ``rejected`` summed log-probs of each pair, (N,).
        pad_id: padding token id.
        train_cfg: optimisation settings.
        loss_cfg: which loss and its parameters.
        device: where the model is.
        callback: called with (optimizer step, metrics) after each optimizer step; on resume,
            first with every step the checkpoint had done.
        checkpoints: where to save mid-step checkpoints and resume from the latest one. Process
            0 saves; every process resumes from the same checkpoint.
        precision: the forward and backward's autocast, and loss scaling for fp16; the model's
            parameters are the master weights (sdpo_core.precision). None: fp32.
        carry: train.carry_optimizer: the chain's schedule and M(t-1)'s moments (loaded unless a
            checkpoint is restored, which holds its own); the result then holds the final state.

    Returns:
        The number of optimizer steps, the last step's loss and every step's metrics.
    """
    if len(pairs) != len(ref["chosen"]):
        raise ValueError(f"{len(pairs)} pairs but {len(ref['chosen'])} reference log-probs")
    train_cfg = for_device(train_cfg, device)
    precision = precision or PRECISIONS["fp32"]
    # fp16's narrow range needs the loss scaled; a step whose gradients overflow is skipped by the
    # scaler, which then lowers the scale (its state is checkpointed, so a resume keeps the scale).
    scaler = torch.amp.GradScaler(torch.device(device).type) if precision.scaled else None
    layout = PassLayout.of(train_cfg.shared_prompt, pairs, train_cfg.packed_row_tokens, train_cfg.compile)
    # Padded and shared rows come in few bucketed shapes: one static graph each. Packed passes hold
    # a varying number of rows: a shape that changes becomes symbolic instead of compiling per count.
    dynamic = None if layout.kind == "packed" else False
    with (
        activation_checkpointing(model, train_cfg.gradient_checkpointing),
        # after checkpointing: it compiles the checkpointed layers
        compiled_layers(model, train_cfg.compile, dynamic=dynamic),
        dropout_off(model, train_cfg.disable_dropout),
    ):
        seed_everything(train_cfg.seed)
        get_loss(loss_cfg.name)  # an unknown loss fails before any work
        plan = batch_plan(len(pairs), train_cfg)
        world, rank = world_and_rank()
        # Under several processes, DDP or FSDP wraps the policy (FSDP replaces its parameters by
        # shards, so the optimizer is built after).
        module = wrap(model, train_cfg.logprob_chunk_rows, train_cfg.parallelism, world, torch.device(device))
        sharded = is_sharded(model)
        params = [p for p in model.parameters() if p.requires_grad]
        # torch's fused AdamW: one kernel over all parameters (for the 20M benchmark model on the
        # 2-core CPU, 14 ms a step against 78 ms for the default per-parameter loop:
        # python -m benchmarks.kernels). Not for FSDP's sharded parameters.
        fused = not sharded and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(
            params,
            lr=train_cfg.learning_rate,
            betas=train_cfg.adam_betas,
            weight_decay=train_cfg.weight_decay,
            fused=fused or None,
        )
        chain = carry or Carry()
        # With a carried schedule, this step is the slice [offset, offset + len(plan)) of one warmup
        # + cosine over the whole chain; otherwise its own plan is the whole schedule.
        factor = lr_lambda(chain.total or len(plan), train_cfg.warmup_ratio, train_cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, shifted(factor, chain.offset))
        # (2, N) on the host: each optimizer step gathers its pairs' columns from it.
        ref_table = torch.stack([ref["chosen"], ref["rejected"]]).float().to("cpu")
        history: list[dict[str, float]] = []
        done = 0
        resumed = checkpoints.restore(model, optimizer, scheduler, scaler) if checkpoints is not None else None
        if resumed is not None:
            done, history = resumed.step, list(resumed.history)
            for step, metrics in enumerate(history, start=1):
                if callback is not None:
                    callback(step, metrics)
        elif chain.moments is not None:
            load_moments(model, optimizer, chain.moments)
        model.train()
        for step, micro_batches in enumerate(plan, start=1):
            if step <= done:  # trained before the checkpoint; the plan is the same, so skip its pairs
                continue
            n_step = sum(len(mb) for mb in micro_batches)  # pairs in this optimizer step
            # Chosen completion tokens per pair over the step (all processes' pairs): the NLL term
            # is a token mean over the whole step, whatever its split into passes.
            mean_chosen = sum(len(pairs[j].chosen_ids) for mb in micro_batches for j in mb) / n_step
            # Metric sums stay on the model's device until the step ends: one host sync per step.
            step_sums = torch.zeros(len(METRIC_SUMS), dtype=torch.float64, device=device)
            # Data parallel: each process takes every world-th pair of each micro-batch.
            passes: list[tuple[list[int], float]] = [
                (piece, 1.0)
                for mb in micro_batches
                if mb[rank::world]
                for piece in layout.passes(mb[rank::world], pairs, train_cfg.max_pass_tokens)
            ]
            if world > 1:
                # DDP reduces gradients in each process's last pass, so each needs at least one; FSDP
                # gathers parameters and reduce-scatters gradients in every pass, so all processes run
                # as many passes. A process short of passes runs one pair with weight 0 (zero gradient).
                needed = max_over_processes(len(passes), device) if sharded else 1
                passes += [([micro_batches[0][0]], 0.0)] * (needed - len(passes))
            # The step's reference log-probs, gathered on the host in pass order: one copy to the
            # device per step, queued before any forward (not a blocking copy per pass).
            step_ids = torch.tensor([j for ids, _ in passes for j in ids], dtype=torch.long)
            step_ref = to_device(ref_table[:, step_ids], device)  # (2, n): chosen, rejected
            done_pairs = 0
            for i, (ids, weight) in enumerate(passes):
                batch = layout.collate([pairs[j] for j in ids], pad_id).to(device)
                b = len(ids)
                ref_c, ref_r = step_ref[:, done_pairs : done_pairs + b]
                done_pairs += b
                with gradient_sync(module, enabled=i == len(passes) - 1), precision.autocast(device):
                    logps, tokens = module(batch)  # (2b,) each
                    lp = PairLogps(logps[:b], logps[b:], ref_c, ref_r)
                    losses, nll = pass_losses(lp, tokens, loss_cfg, mean_chosen)  # (b,) each
                    # Sum over the pass divided by the optimizer step's pair count: the update is the
                    # same for any split of the step into micro-batches and passes. DDP and FSDP
                    # average gradients over the processes, hence the factor world.
                    scaled = losses.sum() * (weight * world) / n_step
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                if weight == 0.0:
                    continue
                r_chosen, r_rejected = implicit_rewards(lp, loss_cfg.beta)
                step_sums += torch.stack(
                    [
                        losses.detach().sum(),
                        r_chosen.sum(),
                        r_rejected.sum(),
                        (r_chosen > r_rejected).float().sum(),
                        lp.policy_chosen.detach().sum(),
                        lp.policy_rejected.detach().sum(),
                        nll.detach().sum(),
                        lp.margin().detach().abs().sum(),
                    ]
                ).double()
            if world > 1:
                torch.distributed.all_reduce(step_sums)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if train_cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # DTensor under FSDP
            # The step's one host sync: the metric sums and the gradient norm, read together. The
            # update is only queued after it, so a non-finite loss or norm still stops training
            # before any weight changes. (Under fp16 the scaler adds its own, accepted: get_scale
            # reads the new scale, and scaler.step whether the gradients overflowed unless the
            # optimizer is fused, which takes that flag on the device.)
            *values, grad_norm = torch.cat([step_sums, norm.detach().reshape(1).to(step_sums)]).tolist()
            sums = dict(zip(METRIC_SUMS, values, strict=True))
            loss_value = sums["loss"] / n_step
            if not math.isfinite(loss_value):
                raise TrainingError(f"the loss is {loss_value} at optimizer step {step}; stopping")
            if not math.isfinite(grad_norm) and scaler is None:
                raise TrainingError(f"the gradient norm is {grad_norm} at optimizer step {step}; stopping")
            lr = scheduler.get_last_lr()[0]
            if scaler is not None:
                scaler.step(optimizer)  # skipped when the gradients overflowed
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = {
                "loss": loss_value,
                "rewards/chosen": sums["chosen"] / n_step,
                "rewards/rejected": sums["rejected"] / n_step,
                "rewards/accuracies": sums["acc"] / n_step,
                "rewards/margins": (sums["chosen"] - sums["rejected"]) / n_step,
                "logps/chosen": sums["logps_c"] / n_step,
                "logps/rejected": sums["logps_r"] / n_step,
                "nll_loss": sums["nll"] / n_step,
                # Mean |h|: 0 at a step's first update when the reference was scored in the
                # policy's precision; anything else means the two computations differ.
                "abs_margin": sums["abs_h"] / n_step,
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "epoch": step / len(plan) * train_cfg.epochs,
            }
            if scaler is not None:  # fp16: the loss scale after this step's update
                metrics["loss_scale"] = scaler.get_scale()
            history.append(metrics)
            if callback is not None:
                callback(step, metrics)
            # Process 0 writes; under FSDP gathering the state takes every process.
            if checkpoints is not None and (rank == 0 or sharded) and checkpoints.due(step, len(plan)):
                checkpoints.save(step, model, optimizer, scheduler, history, write=rank == 0, scaler=scaler)
        model.eval()
        final_state = full_state(model, optimizer)[1] if carry is not None else None
        return TrainResult(len(plan), history[-1]["loss"] if history else float("nan"), history, done, final_state)


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, every ``torch.nn.Dropout`` of ``model`` has p = 0 (when ``enabled``);
    after it, each has its own p again."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)] if enabled else []
    saved = [m.p for m in layers]
    for m in layers:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in zip(layers, saved, strict=True):
            m.p = p


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, ``model``'s decoder layers are checkpointed when ``enabled``
    (:func:`enable_activation_checkpointing`); after it, whatever happened, they are not."""
    if not enabled:
        yield
        return
    enable_activation_checkpointing(model)
    try:
        yield
    finally:
        disable_activation_checkpointing(model)


def disable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Undo :func:`enable_activation_checkpointing`, including transformers' hook that makes the
    embeddings' output require gradients (its disable removes that hook only for PEFT models)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:  # transformers before the rename (5.17 on the GPU machine; 5.24 has both names)
        model.gradient_checkpointing_disable()
    model.disable_input_require_grads()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Turn on transformers' activation checkpointing of each decoder layer, non-reentrant, with
    split attention's replay (:func:`sdpo_core.attention.replay_contexts`) around recomputation."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support activation checkpointing"
        )
    settings = {"use_reentrant": False, "context_fn": attention.replay_contexts}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
