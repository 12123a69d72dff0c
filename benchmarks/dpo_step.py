"""One DPO step, sdpo against TRL's DPOTrainer, side by side: ``python -m benchmarks.dpo_step``.

Each variant trains the same model on the same token ids with the same hyperparameters, each in
its own process (so peak memory is the process's own), alternating, after a warm-up pass:

- ``sdpo``: reference log-probs computed once with the frozen model, then the training loop
  (``sdpo_core.logprobs.score_pairs`` + ``sdpo_core.train.train_dpo``); both are timed.
- ``trl``: TRL's DPOTrainer with its reference model held in memory (its default).
- ``trl_precompute``: TRL's DPOTrainer with ``precompute_ref_log_probs=True``; the precompute,
  done when the trainer is built, is timed.
- ``sdpo_mask`` (only when asked for): sdpo with split attention turned off, so a shared-prompt
  layout attends through its 4-D mask; measures what split attention buys.
- ``sdpo_lora`` (only when asked for): sdpo's step with a LoRA adapter (``train.lora``: rank
  ``--lora-r``, alpha 2r, on the attention projections); only the adapter trains, so AdamW keeps
  no moments for the base weights and no gradient of theirs is stored. Its losses differ from the
  others' (another update), so no loss difference is reported against it.

Both get the pairs as token ids (TRL's own text preprocessing is bypassed, so neither side
tokenizes differently) and see the same batches in the same order (TRL reads the pairs in
sdpo's seeded batch order with a sequential sampler), so their losses are comparable.

The clock covers the whole step: for sdpo the reference log-probs and the training loop; for
TRL copying the reference model, building the trainer (and precomputing, where asked) and
training. Libraries are imported, the model built, the pairs tokenized and the warm-up run
before it, on both sides (until 2026-11-27 TRL's ``import trl, datasets``, about a second on the
2-core machine, fell inside TRL's timed window).

Reported per variant: pairs/s and tokens/s of the whole step (tokens as DPO lays them out, the
prompt once per completion); peak resident memory of the process (ru_maxrss) and, on Linux,
"step MiB": the resident-set peak during the timed step (reset through /proc/self/clear_refs)
minus the resident set when it began, that is what the step itself added; the first and last
losses; and model FLOP utilisation: (6 N tokens for the policy + 2 N tokens for the reference
pass) / time, over this machine's measured matrix-multiply rate in the same dtype, with tokens
counted once per pair (prompt + chosen + rejected) for every variant, so sharing the prompt
earns no MFU. The same count gives an estimate of the ceiling: sdpo's FLOPs at the measured rate
with nothing else running, against TRL's time, is about the most speed-up any implementation of
sdpo's computation could show on this machine (about: the output projection runs only on
completion tokens, and the rate is that of one 1024^3 product). Writes JSON (``--out``) and prints a table.

``--gradient-checkpointing`` turns on activation checkpointing on both sides (TRL's
``gradient_checkpointing``, sdpo's ``train.gradient_checkpointing``, both non-reentrant); the
MFU and the ceiling still count 6 N per policy token, not the recomputation. TRL's own
``DPOConfig`` turns checkpointing on by default (TRL 1.16), so without the flag the TRL variants
are TRL with checkpointing off; each variant's ``label`` in the JSON and the table says which.

Issue 19's flags: ``--compile`` (sdpo's ``train.compile``; the whole step runs once before the
clock so that every graph is compiled there, and the JSON's ``compile`` gives the compile time and
the recompiles inside the clock), ``--layout packed`` (``--row-tokens``) and ``--precision
bf16-mixed`` (fp32 weights with bf16 autocast on both sides; the default, ``pure``, trains the
weights in ``--dtype``). TRL runs eagerly in its own padded layout whatever these say.

Fairness (issue 19): TRL's trainer construction (its lazy imports, the reference model's copy)
runs before TRL's clock and is reported beside it as ``trl_setup_s``; only ``trl_precompute``
still builds a trainer inside its clock, because TRL precomputes the reference log-probs there,
and a throwaway trainer built before the clock has paid the imports (its time is its
``trl_setup_s``). The warm-up runs one whole micro-batch group in each layout on both sides.
Steady-state pairs/s leaves out the first optimizer step (allocator growth, first kernels): the
pairs after it over the time after it, plus their share of the work done before the training
loop (sdpo's reference pass, TRL's precompute). ``--repeats`` rounds (3 by default); per variant
the round of median time gives speed, steady speed and MFU alike. MFU is given against the
measured matmul rate and, for a GPU whose datasheet bf16/fp16 dense peak is known, that peak.
Useful FLOPs count each pair's distinct tokens; executed FLOPs count the tokens the layout
computes, padding and a repeated prompt included (per micro-batch, as collated; sdpo's
splitting into passes may pad a little less), plus the recomputed forward under checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("sdpo", "trl", "trl_precompute", "sdpo_mask", "sdpo_lora")
# --layout: sdpo's train.shared_prompt for each ("auto" leaves it to for_device).
LAYOUTS: dict[str, bool | str] = {"auto": "auto", "shared": True, "padded": False, "packed": "packed"}
DEFAULT_VARIANTS = ("sdpo", "trl", "trl_precompute")
PAD_ID = 2  # EOS of the shipped tokenizer, as load_tokenizer sets it
# Model sizes: the shipped model, a ~20M-parameter Llama built from its config (random weights),
# and a ~0.5B one for GPUs. Random weights are fine for speed; the losses still compare.
SIZES: dict[str, dict[str, int] | None] = {
    "tiny": None,
    "20m": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 7,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    # 523M parameters (tied embeddings), the model of benchmarks/results/gpu. Until 2026-11-27
    # this size was hidden 1024, 24 layers, intermediate 2816, 16/8 heads: 316M.
    "0.5b": {
        "hidden_size": 1280,
        "intermediate_size": 3456,
        "num_hidden_layers": 28,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
# Dense bf16/fp16 tensor-core peak (no sparsity), FLOP/s, from the vendor's datasheets; first
# match of the device name wins. None for a CPU or an unlisted card.
DATASHEET_PEAK = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),
)
DATA = [
    ("data/orca_dpo_pairs_validation_msfoundry.jsonl", "openai"),
    ("data/llamafactory_dpo_en_demo.json", "sharegpt"),
    ("data/hh-rlhf_helpful-base_test.jsonl.gz", "hh"),
]


# ---------------------------------------------------------------------------------------------
# Worker: one variant, one size, in its own process


def build_model(size: str, dtype: Any, device: str) -> Any:
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    tiny = REPO / "models" / "stories260K"
    if SIZES[size] is None:
        return LlamaForCausalLM.from_pretrained(tiny, dtype=dtype, use_safetensors=True).to(device)
    config = AutoConfig.from_pretrained(tiny)
    for key, value in SIZES[size].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    # Built where it runs, in its dtype: initialising 0.5B parameters on a GPU takes a blink.
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype=dtype)


def real_pairs(n: int, max_length: int, max_prompt_length: int, vocab_size: int) -> list[Any]:
    """n real pairs, tokenized by the shipped tokenizer, alternating over the three shipped sets.

    For a model with a larger vocabulary the ids are the same (they fit): only speed matters there.
    """
    from sdpo_core.config import DataConfig, ModelConfig, SourceConfig
    from sdpo_core.data import load_source, tokenize_pair
    from sdpo_core.model_io import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(REPO / "models" / "stories260K")))
    cfg = DataConfig(max_length=max_length, max_prompt_length=max_prompt_length)
    per_source = [
        load_source(SourceConfig(path=str(REPO / p), name=f, format=f), skip_bad_rows=True)[0] for p, f in DATA
    ]
    pairs = []
    for i in range(n):
        src = per_source[i % len(per_source)]
        pairs.append(tokenize_pair(src[i // len(per_source)], tok, cfg))
    assert max(max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in pairs) < vocab_size
    return pairs


def datasheet_peak(device_name: str, dtype: str) -> float | None:
    """The card's datasheet dense peak in bf16/fp16, FLOP/s; None on a CPU, in fp32 or if unlisted."""
    if dtype not in ("bfloat16", "float16"):
        return None
    return next((peak for name, peak in DATASHEET_PEAK if name in device_name), None)


def warm_up(model: Any, pairs: list[Any], pad_id: int, device: str, group: int = 2, precision: Any = None) -> None:
    """Forward and backward passes on one micro-batch group (``group`` pairs), gradients dropped:
    once as TRL calls the model (padded rows with their padding mask), and once through sdpo's
    log-probs in each layout, so neither side's clock holds its first kernels or the allocator's
    growth to a full micro-batch. ``precision`` (sdpo_core.precision; None: none) gives the
    autocast both sides train under."""
    import contextlib

    from sdpo_core.logprobs import collate, collate_pairs, completion_logps

    with precision.autocast(device) if precision is not None else contextlib.nullcontext():
        batch = collate_pairs(pairs[:group], pad_id).to(device)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        out.logits.float().mean().backward()
        del out
        for shared_prompt in (False, True):
            logps, _ = completion_logps(model, collate(pairs[:group], pad_id, shared_prompt).to(device))
            logps.sum().backward()
    model.zero_grad(set_to_none=True)


def run_sdpo(
    model: Any,
    pairs: list[Any],
    pad_id: int,
    args: argparse.Namespace,
    train_cfg: Any,
    loss_cfg: Any,
    marks: dict[str, Any] | None = None,
) -> list[float]:
    """sdpo's step, as the pipeline runs it (sdpo_core.scores, sdpo_core.step): the reference
    log-probs in the training precision, then the training loop; ``marks`` (if given) gets when
    the training loop began and when each optimizer step ended."""
    from sdpo_core.logprobs import score_pairs
    from sdpo_core.train import train_dpo

    precision = precision_of(args)
    # As sdpo_core.scores does: the training's layout, token budget and compiled layers, so that
    # h = 0 at the first update in bf16 too.
    with precision.autocast(args.device):
        ref = score_pairs(
            model,
            pairs,
            pad_id,
            args.batch_size,
            train_cfg.logprob_chunk_rows,
            args.device,
            train_cfg.shared_prompt,
            max_tokens=train_cfg.score_pass_tokens,
            row_tokens=train_cfg.packed_row_tokens,
            compiled=train_cfg.compile,
        )
    marks = marks if marks is not None else {"steps": []}
    marks["loop_start"] = now(args.device)
    callback = lambda _step, _metrics: marks["steps"].append(now(args.device))  # noqa: E731
    result = train_dpo(
        model, pairs, ref, pad_id, train_cfg, loss_cfg, args.device, callback=callback, precision=precision
    )
    return [h["loss"] for h in result.history]


def compile_counts() -> dict[str, int] | None:
    """``sdpo_core.compiling.compile_stats()`` (graphs compiled, recompiles so far in this
    process), or None where this sdpo_core has no such module."""
    try:
        from sdpo_core.compiling import compile_stats
    except ImportError:
        return None
    return compile_stats()


def warm_up_step(model: Any, pairs: list[Any], args: argparse.Namespace, train_cfg: Any, loss_cfg: Any) -> float:
    """sdpo's whole step on ``pairs`` before the clock, the weights put back after it; returns its
    seconds.

    Compiled (``--compile``), it runs on every pair of the timed step: the same micro-batches,
    passes and padded widths, in training and in the reference pass, so every graph the timed
    step needs is compiled here and the timed step meets no new shape. In the packed layout
    without compiling, one micro-batch group warms up the layout's own kernels and masks.
    """
    import torch

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = now(args.device)
    run_sdpo(model, pairs, PAD_ID, args, train_cfg, loss_cfg)
    seconds = now(args.device) - start
    with torch.no_grad():
        model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    del state
    return seconds


def now(device: str) -> float:
    """perf_counter once the device's queued work is done (the step times mean finished work)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def prepare_trl(
    model: Any, pairs: list[Any], args: argparse.Namespace, train_cfg: Any, precompute: bool, marks: dict[str, Any]
) -> tuple[Callable[[], list[float]], float]:
    """Everything TRL needs before it trains, done before the clock starts; returns the timed part
    and the seconds its trainer construction took (``trl_setup_s``, outside the clock).

    Outside the timed part: importing ``trl`` and ``datasets``, loading the tokenizer, building
    the dataset and the ``DPOConfig`` (as sdpo's config is built before the clock), copying the
    reference model and building the ``DPOTrainer`` with its lazy imports. For
    ``trl_precompute`` the real trainer is built inside the timed part, because its constructor
    is where TRL precomputes the reference log-probs; a throwaway trainer without the precompute
    is built before it (its time is ``trl_setup_s``), so the lazy imports stay outside.
    """
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from sdpo_core.config import ModelConfig
    from sdpo_core.model_io import load_tokenizer
    from sdpo_core.train import batch_plan

    # TRL reads the pairs in sdpo's batch order, so both see the same batches.
    order = [i for step in batch_plan(len(pairs), train_cfg) for mb in step for i in mb]
    rows = [
        {"prompt_ids": pairs[i].prompt_ids, "chosen_ids": pairs[i].chosen_ids, "rejected_ids": pairs[i].rejected_ids}
        for i in order
    ]
    dataset = datasets.Dataset.from_list(rows)
    # The ids are given: skip TRL's text preprocessing (extract prompt, add EOS, tokenize).
    DPOTrainer._prepare_dataset = lambda self, ds, *a, **k: ds  # type: ignore[method-assign]
    tok = load_tokenizer(ModelConfig(name_or_path=str(REPO / "models" / "stories260K")))
    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **_):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_train_begin(self, *_, **__):
            marks["loop_start"] = now(args.device)

        def on_step_end(self, *_, **__):
            marks["steps"].append(now(args.device))

    # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*: the names this
    # version has.
    known = {f.name for f in dataclasses.fields(DPOConfig)}
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    config = DPOConfig(
        **{name: args.gradient_checkpointing, f"{name}_kwargs": {"use_reentrant": False}},
        output_dir=str(Path(args.scratch) / "trl"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=train_cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=train_cfg.max_grad_norm,
        num_train_epochs=1,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.batch_size,
        bf16=args.dtype == "bfloat16",
        fp16=False,
        padding_free=False,
        use_cpu=args.device == "cpu",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=train_cfg.seed,
        dataloader_num_workers=0,
    )

    def build(cfg: Any, ref_model: Any) -> Any:
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=cfg,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[Record()],
        )
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        return trainer

    start = time.perf_counter()
    if precompute:
        build(dataclasses.replace(config, precompute_ref_log_probs=False), copy.deepcopy(model).eval())
        setup = time.perf_counter() - start
        # The throwaway trainer and its reference copy go before the clock starts.
        import gc

        gc.collect()

        def run() -> list[float]:
            build(config, None).train()
            return losses

        return run, setup
    trainer = build(config, copy.deepcopy(model).eval())
    setup = time.perf_counter() - start

    def run_default() -> list[float]:
        trainer.train()
        return losses

    return run_default, setup


def proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Hand memory that is free inside the process back to the system (glibc's ``malloc_trim``).

    Without it, what the warm-up freed stays resident, the step reuses it, and the step's own
    memory reads too small. No-op where the C library has no ``malloc_trim``.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's resident-set peak (VmHWM) to its current size, as Linux allows.

    Returns whether it was reset: ``/proc/self/clear_refs`` takes "5" for this since Linux 4.0.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def sdpo_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """sdpo's train and loss configs for the benchmark's settings, made concrete for its device."""
    from sdpo_core.config import LossConfig, TrainConfig
    from sdpo_core.train import for_device

    train_cfg = TrainConfig(
        micro_batch_size=args.batch_size,
        grad_accum_steps=1,
        learning_rate=args.lr,
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        seed=0,
        device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if args.chunk_rows:
        train_cfg = train_cfg.model_copy(update=dict(logprob_chunk_rows=args.chunk_rows))
    if args.pass_tokens:
        train_cfg = train_cfg.model_copy(
            update=dict(max_pass_tokens=None if args.pass_tokens < 0 else args.pass_tokens)
        )
    if args.layout != "auto":
        train_cfg = train_cfg.model_copy(update=dict(shared_prompt=LAYOUTS[args.layout]))
    if args.row_tokens:
        train_cfg = train_cfg.model_copy(update=dict(packed_row_tokens=args.row_tokens))
    if args.compile:
        train_cfg = train_cfg.model_copy(update=dict(compile=True))
    return for_device(train_cfg, args.device), LossConfig(name="sigmoid", beta=args.beta)


def precision_of(args: argparse.Namespace) -> Any:
    """sdpo's precision for ``--precision``: bf16 autocast over fp32 weights, or none (the weights'
    own dtype, ``--dtype``)."""
    from sdpo_core.precision import PRECISIONS

    return PRECISIONS["bf16-mixed" if args.precision == "bf16-mixed" else "fp32"]


def weights_dtype(args: argparse.Namespace) -> str:
    """The dtype the model's weights are built and trained in: fp32 master weights under
    bf16-mixed, else ``--dtype`` (which is also the dtype the matmul rate is measured in)."""
    return "float32" if args.precision == "bf16-mixed" else args.dtype


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, weights_dtype(args))
    model = build_model(args.size, dtype, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    pairs = real_pairs(args.pairs, args.max_length, args.max_prompt_length, model.config.vocab_size)
    train_cfg, loss_cfg = sdpo_configs(args)
    if args.variant == "sdpo_mask":
        from sdpo_core.attention import refuse

        refuse(model.get_decoder(), "turned off by the benchmark (variant sdpo_mask)")
    if args.variant == "sdpo_lora":
        from sdpo_core.config import LoraConfig
        from sdpo_core.lora import with_adapter

        model = with_adapter(model, LoraConfig(r=args.lora_r, alpha=2.0 * args.lora_r))
    group = min(args.batch_size, len(pairs))
    warm_up(model, pairs, PAD_ID, args.device, group, precision_of(args))
    sdpo_side = args.variant in ("sdpo", "sdpo_mask", "sdpo_lora")
    # Compiled: the whole step once before the clock (every shape it meets); packed: one group.
    warm_pairs = pairs if args.compile else pairs[:group] if args.layout == "packed" else []
    warmup_step_s = warm_up_step(model, warm_pairs, args, train_cfg, loss_cfg) if sdpo_side and warm_pairs else None
    marks: dict[str, Any] = {"loop_start": None, "steps": []}
    trl_setup_s = None

    def begin_memory_window() -> tuple[float | None, bool]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        release_free_memory()
        return proc_status_mib("VmRSS"), reset_peak_rss()

    if sdpo_side:
        step = lambda: run_sdpo(model, pairs, PAD_ID, args, train_cfg, loss_cfg, marks)  # noqa: E731
        rss_before, step_peak_known = begin_memory_window()
    elif args.variant == "trl":
        # The memory window opens before the trainer is built: its reference copy is the step's memory.
        rss_before, step_peak_known = begin_memory_window()
        step, trl_setup_s = prepare_trl(model, pairs, args, train_cfg, False, marks)
    else:
        # The throwaway trainer built here is garbage before the window opens.
        step, trl_setup_s = prepare_trl(model, pairs, args, train_cfg, True, marks)
        rss_before, step_peak_known = begin_memory_window()
    modules_before = len(sys.modules)
    compiled_before = compile_counts()
    start = now(args.device)
    losses = step()
    seconds = now(args.device) - start
    compiled_after = compile_counts()
    step_peak = proc_status_mib("VmHWM") if step_peak_known else None
    # Tokens as DPO lays them out (the prompt once per completion): what tokens/s counts.
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    # Distinct tokens (the prompt once): the model FLOPs a pair needs, whatever the layout.
    unique_tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    out = {
        "variant": args.variant,
        "size": args.size,
        "params": n_params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "pairs": len(pairs),
        "tokens": tokens,
        "seconds": seconds,
        "pairs_per_s": len(pairs) / seconds,
        "steady_pairs_per_s": steady_rate(len(pairs), min(args.batch_size, len(pairs)), start, marks),
        "tokens_per_s": tokens / seconds,
        "trl_setup_s": trl_setup_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # What the timed step added on top of the process as it stood (libraries, model, data).
        "step_rss_mib": step_peak - rss_before if step_peak is not None and rss_before is not None else None,
        # Modules first imported inside the timed window (what set-up still fell inside it).
        "modules_imported_in_step": len(sys.modules) - modules_before,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "unique_tokens": unique_tokens,
        # Policy: forward and backward (6 N per token); reference: one forward (2 N per token).
        # Counted on distinct tokens, so computing the prompt once earns no extra MFU.
        "train_flops": (6 + 2) * n_params * unique_tokens,
        "useful_flops": (6 + 2) * n_params * unique_tokens,
        # What the layout computes, padding included; checkpointing adds one policy forward.
        "executed_flops": (6 + 2 + 2 * args.gradient_checkpointing)
        * n_params
        * executed_tokens(pairs, args.variant, train_cfg),
        "compile": compile_record(sdpo_side and args.compile, warmup_step_s, seconds, compiled_before, compiled_after),
        "warmup_step_s": warmup_step_s,
        # The weights' dtype after training: fp32 under bf16-mixed on both sides (neither casts).
        "trained_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    if args.device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def compile_record(
    compiled: bool,
    warmup_step_s: float | None,
    seconds: float,
    before: dict[str, int] | None,
    after: dict[str, int] | None,
) -> dict[str, Any] | None:
    """What compiling cost, outside the clock, and whether the timed step compiled anything more;
    None for a variant that does not compile.

    ``compile_s`` is the warm-up step's time less the timed step's (the warm-up runs the same
    step and compiles on the way); ``graphs`` were compiled before the clock;
    ``recompiles_in_step`` and ``graphs_in_step`` happened inside it (both should be 0). A count
    is -1 where sdpo_core.compiling or this torch does not keep it.
    """
    if not compiled:
        return None

    def delta(key: str) -> int:
        if before is None or after is None or before.get(key, -1) < 0 or after.get(key, -1) < 0:
            return -1
        return after[key] - before[key]

    return {
        "warmup_step_s": warmup_step_s,
        "compile_s": max(warmup_step_s - seconds, 0.0) if warmup_step_s is not None else None,
        "graphs": before.get("graphs", -1) if before is not None else -1,
        "recompiles_in_step": delta("recompiles"),
        "graphs_in_step": delta("graphs"),
    }


def steady_rate(n_pairs: int, first_step_pairs: int, start: float, marks: dict[str, Any]) -> float | None:
    """Pairs/s after the first optimizer step: the pairs after it over the time after it plus
    their share of what ran before the training loop (reference pass, precompute); None with
    fewer than two optimizer steps."""
    steps = marks["steps"]
    if len(steps) < 2 or marks["loop_start"] is None:
        return None
    rest = n_pairs - first_step_pairs
    before_loop = (marks["loop_start"] - start) * rest / n_pairs
    return rest / (steps[-1] - steps[0] + before_loop)


def executed_tokens(pairs: list[Any], variant: str, train_cfg: Any) -> int:
    """Token positions the variant's layout computes, padding included, over its micro-batches:
    TRL's and sdpo's padded rows repeat the prompt for each completion; sdpo's shared-prompt rows
    hold it once; packed rows hold several pairs each, at the run's fixed row length, in the passes
    sdpo packs them into. Compiled, sdpo's rows are padded to the bucket of their width
    (sdpo_core.compiling.bucket_width)."""
    from sdpo_core.logprobs import collate, collate_pairs
    from sdpo_core.train import batch_plan

    if not variant.startswith("trl") and train_cfg.shared_prompt == "packed":
        from sdpo_core.packed import collate_packed, pack_passes, run_row_tokens

        row = run_row_tokens(pairs, train_cfg.packed_row_tokens)
        return sum(
            collate_packed([pairs[i] for i in one], PAD_ID, row).input_ids.numel()
            for step in batch_plan(len(pairs), train_cfg)
            for mb in step
            for one in pack_passes(mb, pairs, row, train_cfg.max_pass_tokens)
        )
    total = 0
    for step in batch_plan(len(pairs), train_cfg):
        for mb in step:
            chunk = [pairs[i] for i in mb]
            if variant.startswith("trl"):
                total += collate_pairs(chunk, PAD_ID).input_ids.numel()
                continue
            rows, width = collate(chunk, PAD_ID, train_cfg.shared_prompt).input_ids.shape
            if train_cfg.compile:
                from sdpo_core.compiling import bucket_width

                width = bucket_width(width)
            total += rows * width
    return total


# ---------------------------------------------------------------------------------------------
# Driver


def matmul_rate(device: str, dtype_name: str, seconds: float = 2.0) -> float:
    """This machine's measured dense matrix-multiply rate, FLOP/s, in the given dtype.

    n x n by n x n on random data: n = 1024 on a CPU, 8192 on a GPU (large enough to fill it).
    """
    import torch

    n = 8192 if device.startswith("cuda") else 1024
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def spawn(args: argparse.Namespace, variant: str, size: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.dpo_step",
        "--worker",
        variant,
        "--size",
        size,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--pairs",
        str(args.pairs),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--max-prompt-length",
        str(args.max_prompt_length),
        "--lr",
        str(args.lr),
        "--beta",
        str(args.beta),
        "--scratch",
        args.scratch,
        "--threads",
        str(args.threads or 0),
        "--chunk-rows",
        str(args.chunk_rows or 0),
        "--pass-tokens",
        str(args.pass_tokens or 0),
        "--layout",
        args.layout,
        "--row-tokens",
        str(args.row_tokens or 0),
        "--precision",
        args.precision,
        *(["--compile"] if args.compile else []),
        "--lora-r",
        str(args.lora_r),
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}/{size} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """``data`` as indented JSON at ``path`` (written whole: a reader never sees half of it)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)
    return out


def label(
    variant: str, checkpointing: bool, *, compiled: bool = False, layout: str = "auto", precision: str | None = None
) -> str:
    """What a variant is, in words; TRL's own DPOConfig turns gradient checkpointing on by default.

    ``compiled`` and ``layout`` (``--compile``, ``--layout``) apply to sdpo's variants only (TRL
    runs eagerly, in its own padded layout); ``precision`` (how the weights train) to both.
    """
    ckpt = "gradient checkpointing " + ("on" if checkpointing else "off")
    names = {
        "sdpo": "sdpo",
        "trl": "TRL, reference model in memory",
        "trl_precompute": "TRL, precomputed reference log-probs",
        "sdpo_mask": "sdpo, 4-D mask (no split attention)",
        "sdpo_lora": "sdpo with a LoRA adapter",
    }
    parts = [names[variant]]
    if variant.startswith("trl"):
        parts += ["eager (not compiled)"] if compiled else []
    else:
        parts += ([f"{layout} layout"] if layout != "auto" else []) + (["compiled decoder layers"] if compiled else [])
    parts += [precision] if precision else []
    if variant.startswith("trl"):
        default = "TRL's DPOConfig default" if checkpointing else "TRL's DPOConfig default is on"
        return f"{', '.join(parts)}, {ckpt} ({default})"
    return f"{', '.join(parts)}, {ckpt}"


def precision_words(args: argparse.Namespace) -> str:
    """How both sides train, in words, for the labels."""
    if args.precision == "bf16-mixed":
        return "fp32 weights with bf16 autocast (sdpo bf16-mixed, TRL bf16=True)"
    return f"pure {args.dtype} weights" + (" (TRL bf16=True)" if args.dtype == "bfloat16" else "")


def summarise(
    runs: list[dict[str, Any]],
    rate: float,
    peak: float | None = None,
    checkpointing: bool = False,
    described: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per variant: the round of median time (the lower median for an even count) gives speed,
    steady speed and MFU alike; memory is the median over rounds. ``described`` holds
    :func:`label`'s keyword arguments (compiled, layout, precision)."""
    out = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        chosen = next(r for r in mine if r["seconds"] == statistics.median_low(r["seconds"] for r in mine))
        med = {k: chosen[k] for k in ("seconds", "pairs_per_s", "steady_pairs_per_s", "tokens_per_s", "trl_setup_s")}
        med["label"] = label(variant, checkpointing, **(described or {}))
        med["compile"] = chosen.get("compile")
        med["trained_dtype"] = chosen.get("trained_dtype")
        med["median_round"] = chosen.get("round")
        med["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in mine)
        med["final_loss"] = mine[0]["final_loss"]
        med["first_loss"] = mine[0]["first_loss"]
        med["losses"] = mine[0]["losses"]
        med["useful_flops"] = chosen["useful_flops"]
        med["executed_flops"] = chosen["executed_flops"]
        med["mfu"] = chosen["useful_flops"] / chosen["seconds"] / rate
        med["mfu_datasheet"] = chosen["useful_flops"] / chosen["seconds"] / peak if peak else None
        med["executed_fu"] = chosen["executed_flops"] / chosen["seconds"] / rate
        med["params"] = mine[0]["params"]
        med["trainable_params"] = mine[0]["trainable_params"]
        med["tokens"] = mine[0]["tokens"]
        if "peak_gpu_mib" in mine[0]:
            med["peak_gpu_mib"] = statistics.median(r["peak_gpu_mib"] for r in mine)
        med["modules_imported_in_step"] = max(r["modules_imported_in_step"] for r in mine)
        steps = [r["step_rss_mib"] for r in mine if r.get("step_rss_mib") is not None]
        med["step_rss_mib"] = statistics.median(steps) if len(steps) == len(mine) else None
        # The time sdpo's FLOPs would take at the measured matmul rate with nothing else running.
        med["flops_floor_seconds"] = mine[0]["train_flops"] / rate
        out[variant] = med
    return out


def round_ratios(runs: list[dict[str, Any]], other: str) -> list[float]:
    """sdpo's pairs per second over ``other``'s, for each round in which both ran."""
    speed = {(r["variant"], r["round"]): r["pairs_per_s"] for r in runs}
    rounds = sorted({r["round"] for r in runs})
    return [speed["sdpo", i] / speed[other, i] for i in rounds if ("sdpo", i) in speed and (other, i) in speed]


def lora_line(size: str, per: dict[str, Any]) -> str:
    """LoRA's step against full training: trainable parameters, memory and speed ('' without both)."""
    full, lora = per["variants"].get("sdpo"), per["variants"].get("sdpo_lora")
    if full is None or lora is None:
        return ""
    mem = "peak_gpu_mib" if "peak_gpu_mib" in full else "peak_rss_mib"
    step = (
        f", step {lora['step_rss_mib']:.0f} MiB against {full['step_rss_mib']:.0f}"
        if lora.get("step_rss_mib") is not None and full.get("step_rss_mib") is not None
        else ""
    )
    return (
        f"{size}: LoRA trains {lora['trainable_params']:,} of {lora['params']:,} parameters; peak "
        f"{lora[mem]:.0f} MiB against {full[mem]:.0f} (full training){step}; "
        f"{lora['pairs_per_s'] / full['pairs_per_s']:.2f}x its speed"
    )


def table(results: dict[str, Any]) -> str:
    """The results as a text table; ratios are sdpo's against each TRL variant.

    Memory is the process's peak resident set on a CPU, the peak of allocated GPU memory on a GPU.
    """
    gpu = results["machine"]["device"] != "cpu"
    head = (
        f"{'size':<6} {'variant':<16} {'pairs/s':>9} {'steady':>8} {'tokens/s':>10} "
        f"{'peak GPU MiB' if gpu else 'peak RSS MiB':>13} {'step MiB':>9} {'MFU':>7} {'MFU peak':>8} "
        f"{'trl setup s':>11} {'final loss':>11} {'x trl':>6} {'x trl_pre':>9} {'mem x trl':>9} {'step mem x trl':>14}"
    )
    lines = [head, "-" * len(head)]

    def ratio(value: float | None, width: int) -> str:
        return f"{value:>{width}.2f}" if value is not None else f"{'':>{width}}"

    for size, per in results["sizes"].items():
        for variant, r in per["variants"].items():
            ratios = per["ratios"].get(variant, {})
            memory = r["peak_gpu_mib"] if gpu else r["peak_rss_mib"]
            memory_ratio = ratios.get("gpu_memory_vs_trl" if gpu else "memory_vs_trl")
            step = f"{r['step_rss_mib']:>9.0f}" if r.get("step_rss_mib") is not None else f"{'':>9}"
            steady = r["steady_pairs_per_s"]
            sheet = f"{r['mfu_datasheet']:.2%}" if r["mfu_datasheet"] is not None else ""
            lines.append(
                f"{size:<6} {variant:<16} {r['pairs_per_s']:>9.2f} {ratio(steady, 8)} {r['tokens_per_s']:>10.0f} "
                f"{memory:>13.0f} {step} {r['mfu']:>7.2%} "
                f"{sheet:>8} "
                f"{ratio(r['trl_setup_s'], 11)} {r['final_loss']:>11.5f} {ratio(ratios.get('speed_vs_trl'), 6)} "
                f"{ratio(ratios.get('speed_vs_trl_precompute'), 9)} {ratio(memory_ratio, 9)} "
                f"{ratio(ratios.get('step_memory_vs_trl'), 14)}"
            )
    names = {v: r["label"] for per in results["sizes"].values() for v, r in per["variants"].items()}
    lines += [f"{v}: {name}" for v, name in names.items()]
    for size, per in results["sizes"].items():
        for v, r in per["variants"].items():
            lines.append(
                f"{size} {v}: {r['executed_flops'] / 1e12:.3f} TFLOP executed for {r['useful_flops'] / 1e12:.3f} useful "
                f"(median round {r['median_round']})"
            )
        for v, r in per["variants"].items():
            c = r.get("compile")
            if c:
                lines.append(
                    f"{size} {v}: compiled before the clock ({c['compile_s']:.1f} s beyond a step, "
                    f"{c['graphs']} graphs); in the timed step {c['recompiles_in_step']} recompiles, "
                    f"{c['graphs_in_step']} new graphs (-1: not counted)"
                )
        for key, values in per["ratios"].get("sdpo", {}).items():
            if key.endswith("_by_round") and len(values) > 1:
                other = key.removeprefix("speed_vs_").removesuffix("_by_round")
                spread = ", ".join(f"{v:.2f}" for v in values)
                lines.append(f"{size}: sdpo x {other} in each round: {spread}")
        bound = per["ratios"].get("sdpo", {}).get("speed_bound_vs_trl")
        if bound is not None:
            floor = per["variants"]["sdpo"]["flops_floor_seconds"]
            lines.append(
                f"{size}: sdpo's FLOPs alone at the measured matmul rate take {floor:.2f} s: "
                f"about {bound:.2f}x TRL's default at most, on this machine"
            )
    return "\n".join(lines)


def add_step_options(parser: argparse.ArgumentParser) -> None:
    """The options that set the step: device, shape, hyperparameters and sdpo's layout (shared
    with :mod:`benchmarks.profile_step`)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--max-prompt-length", type=int, default=96)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--chunk-rows", type=int, default=0, help="sdpo's logprob_chunk_rows (0: default)")
    parser.add_argument(
        "--pass-tokens", type=int, default=0, help="sdpo's max_pass_tokens (0: default, -1: one pass per micro-batch)"
    )
    parser.add_argument(
        "--layout",
        choices=list(LAYOUTS),
        default="auto",
        help="sdpo's batch layout: auto (per device), shared (one row per pair), padded (two rows per pair), "
        "packed (several pairs per fixed-width row, FlexAttention block masks)",
    )
    parser.add_argument(
        "--row-tokens", type=int, default=0, help="the packed layout's row length (0: train.packed_row_tokens' default)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="sdpo's train.compile (regional torch.compile of the decoder layers); compiled in the warm-up",
    )
    parser.add_argument(
        "--precision",
        choices=["pure", "bf16-mixed"],
        default="pure",
        help="pure: both sides train the weights in --dtype (fp32, or pure bf16); bf16-mixed: fp32 weights "
        "with bf16 autocast on both sides (sdpo's train.precision bf16-mixed, TRL's bf16=True); needs --dtype bfloat16",
    )
    parser.add_argument("--lora-r", type=int, default=8, help="the sdpo_lora variant's adapter rank")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both sides recompute each decoder layer in the backward pass (non-reentrant)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpo_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,20m", help="comma-separated: tiny, 20m, 0.5b")
    add_step_options(parser)
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating rounds; the round of median time is reported"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--out", default="benchmarks/results/dpo_step.json")
    parser.add_argument("--scratch", default="/tmp/sdpo-bench")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.precision == "bf16-mixed" and args.dtype != "bfloat16":
        parser.error(f"--precision bf16-mixed computes in bfloat16: pass --dtype bfloat16, not {args.dtype}")
    if args.worker:
        args.variant = args.worker
        print(json.dumps(worker(args)))
        return 0

    import torch

    # A shared machine's speed drifts over minutes: the rate is sampled before the first round
    # and after every round, and the highest sample is taken as the machine's rate.
    rates = [matmul_rate(args.device, args.dtype)]
    variants = [v for v in args.variants.split(",") if v]
    results: dict[str, Any] = {
        "command": "python -m benchmarks.dpo_step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "matmul_flops": None,  # filled in below: the highest of matmul_flops_samples
            "matmul_flops_samples": rates,
            "dtype": args.dtype,
            "weights_dtype": weights_dtype(args),
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "pairs",
                "batch_size",
                "max_length",
                "max_prompt_length",
                "lr",
                "beta",
                "repeats",
                "threads",
                "gradient_checkpointing",
                "lora_r",
                "layout",
                "row_tokens",
                "pass_tokens",
                "compile",
                "precision",
            )
        },
        "sizes": {},
    }
    runs_by_size: dict[str, list[dict[str, Any]]] = {}
    for size in args.sizes.split(","):
        runs = runs_by_size.setdefault(size, [])
        for rnd in range(args.repeats):
            # Alternate the order each round, so no variant always runs first or last.
            order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
            for variant in order:
                run = spawn(args, variant, size)
                run["round"] = rnd
                print(
                    f"{size} {variant}: {run['pairs_per_s']:.2f} pairs/s, {run['peak_rss_mib']:.0f} MiB, loss {run['final_loss']:.5f}",
                    file=sys.stderr,
                )
                runs.append(run)
                # Every run so far, in case the rest is cut short (a device call's time limit): the
                # finished JSON below replaces it.
                write_json(args.out, {**results, "partial": True, "runs": runs_by_size})
            rates.append(matmul_rate(args.device, args.dtype))
    rate = max(rates)
    results["machine"]["matmul_flops"] = rate
    peak = datasheet_peak(results["machine"]["device"], args.dtype)
    results["machine"]["datasheet_peak_flops"] = peak
    for size, runs in runs_by_size.items():
        described = {"compiled": args.compile, "layout": args.layout, "precision": precision_words(args)}
        per = summarise(runs, rate, peak, args.gradient_checkpointing, described)
        ratios = {}
        if "sdpo" in per:
            ours = per["sdpo"]
            r = {}
            for other, theirs in per.items():
                if other == "sdpo":
                    continue
                r[f"speed_vs_{other}"] = ours["pairs_per_s"] / theirs["pairs_per_s"]
                # The same ratio within each round: how far one round may be from the median's.
                r[f"speed_vs_{other}_by_round"] = round_ratios(runs, other)
                r[f"memory_vs_{other}"] = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
                if "peak_gpu_mib" in ours:
                    r[f"gpu_memory_vs_{other}"] = ours["peak_gpu_mib"] / theirs["peak_gpu_mib"]
                if ours["step_rss_mib"] is not None and theirs["step_rss_mib"] is not None:
                    r[f"step_memory_vs_{other}"] = ours["step_rss_mib"] / theirs["step_rss_mib"]
                if other != "sdpo_lora":  # LoRA trains another update: its losses are its own
                    r[f"max_loss_diff_vs_{other}"] = max(
                        abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=True)
                    )
            if "trl" in per:
                # About the most speed any implementation of sdpo's computation could show here.
                r["speed_bound_vs_trl"] = per["trl"]["seconds"] / ours["flops_floor_seconds"]
            ratios["sdpo"] = r
        results["sizes"][size] = {"variants": per, "ratios": ratios}
    out = write_json(args.out, results)
    print(table(results))
    for size, per in results["sizes"].items():
        print(lora_line(size, per))
        if "speed_vs_sdpo_mask" in per["ratios"].get("sdpo", {}):
            print(f"{size}: split attention {per['ratios']['sdpo']['speed_vs_sdpo_mask']:.2f}x the 4-D mask")
    samples = ", ".join(f"{r / 1e9:.1f}" for r in rates)
    print(
        f"\nmatmul rate {rate / 1e9:.1f} GFLOP/s, the highest of {samples} ({args.dtype}, "
        f"{results['machine']['device']}); JSON: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
