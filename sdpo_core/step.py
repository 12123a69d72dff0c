"""One sDPO train step: M(t) trained on chunk D_t from, and against, M(t-1).

:func:`run_step` takes a :class:`TrainStepSpec` and returns a :class:`TrainStepResult`. With
``train.num_processes`` 1 it trains in this process; above 1 it writes the spec as JSON and runs
:mod:`sdpo_core.torchrun_step` under torchrun, which reads the same spec and writes the same
result. The reference is never held in memory: its log-probs of the chunk were computed before
(``spec.ref_scores``), and the policy starts from its weights (sDPO, section 3.2).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from sdpo_core.carry import Carry, read_moments, save_moments
from sdpo_core.checkpoint import Checkpoints
from sdpo_core.config import RunConfig
from sdpo_core.files import atomic_write_text
from sdpo_core.fingerprint import model_fingerprint, record_fingerprint
from sdpo_core.hashing import sha256_bytes, sha256_json
from sdpo_core.lora import base_record, merged, save_adapter, with_adapter
from sdpo_core.model_io import load_model, load_tokenizer, pad_id, resolve_device, save_model
from sdpo_core.precision import resolve_precision, save_dtype
from sdpo_core.records import ChunkInfo, TrainStepResult, TrainStepSpec
from sdpo_core.scores import load_scores
from sdpo_core.tokenization import tokenized_file
from sdpo_core.train import MetricsCallback, TrainingError, TrainResult, train_dpo

RESULT_FILE = "train_result.json"
"""Written by torchrun's process 0 beside the step model: the TrainStepResult."""

# Settings that change where or how fast a step runs, or what is logged, but not what it learns:
# changing them on a rerun still continues the step from its checkpoint.
OPERATIONAL_TRAIN_KEYS = (
    "checkpoint_every", "device", "num_threads", "eval_batch_size", "deployment", "num_processes",
    "distributed_backend", "parallelism", "gradient_checkpointing", "score_pass_tokens",
)  # fmt: skip


def training_hash(cfg: RunConfig) -> str:
    """A content id of what a train step learns from: the config without tracking, storage and
    the operational train settings."""
    data = cfg.to_dict()
    data.pop("tracking", None)
    data.pop("storage", None)
    data.pop("evaluate", None)  # evaluation runs after training
    for key in OPERATIONAL_TRAIN_KEYS:
        data["train"].pop(key, None)
    return sha256_json(data)


def checkpoint_dir(
    cfg: RunConfig, chunk: ChunkInfo, ref_dir: str | Path, root: str | Path, init_dir: str | Path = ""
) -> Path:
    """The checkpoint folder of a train step: one per run name, training settings, chunk
    content and reference weights.

    A rerun of the same pipeline finds the same folder, so an unfinished step continues; a
    change to what the step learns from (see :func:`training_hash`) gives a new one.
    """
    ids = f"{training_hash(cfg)}|{chunk.content_hash}|{model_fingerprint(ref_dir)}"
    if init_dir:  # a policy that does not start from the reference (train.init: base)
        ids += f"|init:{model_fingerprint(init_dir)}"
    return Path(root) / f"{cfg.run_name}-step-{chunk.step}-{sha256_bytes(ids)[:16]}"


def base_meta(spec: TrainStepSpec) -> dict[str, Any]:
    """What the step model's meta.json records about how it was made."""
    return {"step": spec.step, "chunk": spec.chunk.model_dump(), "config_hash": spec.config.hash(), **spec.meta}


def run_step(
    spec: TrainStepSpec, callback: MetricsCallback | None = None, checkpoints: Checkpoints | None = None
) -> TrainStepResult:
    """Train M(step) from M(step-1) on the chunk; save it (safetensors + meta.json) to out_dir.

    With ``checkpoints`` the step saves checkpoints as it goes and continues from the newest one
    if there is one. Under torchrun the per-step metrics reach ``callback`` when it has finished.
    """
    with checkpoints.exclusive() if checkpoints is not None else contextlib.nullcontext():
        if spec.config.train.num_processes > 1:
            result = launch(spec, spec.config.train.num_processes)
            for i, metrics in enumerate(result.history, start=1):
                if callback is not None:
                    callback(i, metrics)
            return result
        device = resolve_device(spec.config.train.device)
        policy, tokenizer, trained = train_from(spec, device, callback, checkpoints)
        return save_step_model(policy, tokenizer, spec, trained)


def launch(spec: TrainStepSpec, num_processes: int) -> TrainStepResult:
    """Run the step under torchrun (``-m sdpo_core.torchrun_step SPEC``); return process 0's result."""
    spec_path = Path(spec.out_dir).with_name(Path(spec.out_dir).name + ".spec.json")
    atomic_write_text(spec_path, spec.model_dump_json())
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
        "-m", "sdpo_core.torchrun_step", str(spec_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TrainingError(
            f"the train step under torchrun ({num_processes} processes) failed with exit code {proc.returncode}:\n"
            + proc.stderr[-3000:]
        )
    result = Path(spec.out_dir) / RESULT_FILE
    if not result.is_file():
        raise TrainingError(f"the train step under torchrun exited cleanly but wrote no {result}")
    return TrainStepResult.model_validate_json(result.read_text())


def train_from(
    spec: TrainStepSpec,
    device: torch.device,
    callback: MetricsCallback | None = None,
    checkpoints: Checkpoints | None = None,
) -> tuple[Any, Any, TrainResult]:
    """Load M(t-1) as the policy (sDPO: it starts from the reference) and train it on the chunk.

    Used in-process and by each torchrun process.
    """
    cfg = spec.config
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    precision = resolve_precision(cfg.train, cfg.model, device)
    tokenizer = load_tokenizer(cfg.model, spec.ref_dir)
    # sDPO starts the policy from the reference; train.init=base starts it from M0 (init_dir).
    start = spec.init_dir or spec.ref_dir
    policy = with_adapter(load_model(cfg.model, start, device, precision.master), cfg.train.lora, cfg.train.seed)
    pairs = tokenized_file(spec.chunk.path, tokenizer, cfg.data)
    ref = load_scores(spec.ref_scores)
    # train.carry_optimizer: M(t-1)'s moments (none for M0) and this step's slice of the chain's schedule.
    carry = (
        Carry(spec.schedule_offset, spec.schedule_total, read_moments(spec.ref_dir))
        if cfg.train.carry_optimizer
        else None
    )
    result = train_dpo(
        policy, pairs, ref, pad_id(tokenizer), cfg.train, cfg.loss, device, callback, checkpoints, precision, carry
    )
    return policy, tokenizer, result


def save_step_model(policy: Any, tokenizer: Any, spec: TrainStepSpec, trained: TrainResult) -> TrainStepResult:
    """Save a trained step model with its meta.json (including the weights' sha256)."""
    meta = base_meta(spec) | {"optimizer_steps": trained.optimizer_steps, "final_loss": trained.final_loss}
    # The master weights' dtype unless model.save_dtype says otherwise: this model is the next
    # step's reference and start, and an update rounded away here is lost for every later step.
    dtype = save_dtype(spec.config.model, spec.config.train)
    meta |= {"dtype": str(dtype)}
    lora = spec.config.train.lora
    if lora.r > 0 and lora.registered_as == "adapter":
        # Only the adapter, over the model the policy started from; loading it merges it there.
        base = base_record(spec.init_uri or spec.ref_uri, spec.init_dir or spec.ref_dir)
        saved = save_adapter(policy.to(dtype), tokenizer, Path(spec.out_dir), meta, base)
    else:
        policy = merged(policy)  # a LoRA step registers full weights: the next step's reference
        saved = save_model(policy.to(dtype), tokenizer, Path(spec.out_dir), meta)
    if trained.optimizer_state is not None:  # train.carry_optimizer: the next step starts from it
        save_moments(saved, trained.optimizer_state)
    record_fingerprint(saved)
    return TrainStepResult(
        step=spec.step,
        model_dir=str(saved),
        optimizer_steps=trained.optimizer_steps,
        final_loss=trained.final_loss,
        history=trained.history,
        resumed_from=trained.resumed_from,
    )


def write_result(result: TrainStepResult) -> Path:
    """Write the result beside the step model (what :func:`launch` reads back)."""
    return atomic_write_text(Path(result.model_dir) / RESULT_FILE, json.dumps(result.model_dump()))
