"""A train step under torchrun: ``python -m torch.distributed.run ... -m sdpo_core.distributed JOB``.

:func:`sdpo_core.stages.train_step` writes a job file (the resolved config and the step's
inputs), launches torchrun with ``train.num_processes`` processes and waits. Each process joins
the process group (NCCL on GPUs, gloo on CPUs), loads M(t-1) and the chunk, and trains its share
of every micro-batch under torch's DDP or FSDP (``train.parallelism``, see
:mod:`sdpo_core.parallel`). Only rank 0 saves the model and writes the per-step metrics for the
caller to log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

HISTORY_FILE = "train_history.json"


def launch(job: dict[str, Any], job_path: Path, num_processes: int) -> list[dict[str, float]]:
    """Run a train step under torchrun; return rank 0's per-step metrics."""
    from sdpo_core.train import TrainingError

    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
        "-m", "sdpo_core.distributed", str(job_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TrainingError(
            f"the train step under torchrun ({num_processes} processes) failed with exit code {proc.returncode}:\n"
            + proc.stderr[-3000:]
        )
    return json.loads((Path(job["out_dir"]) / HISTORY_FILE).read_text())


def max_over_processes(value: int, device: torch.device | str) -> int:
    """The largest ``value`` any process of the default group passed (every process must call)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def backend(name: str) -> str:
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def main(job_path: str) -> int:
    from sdpo_core.config import from_dict
    from sdpo_core.parallel import plain_copy
    from sdpo_core.stages import save_step_model, train_from

    job = json.loads(Path(job_path).read_text())
    cfg = from_dict(job["config"])
    # Rank 0 writes checkpoints while the others wait in the next collective: allow it an hour
    # (the default, 10 minutes with NCCL, is short for a large model's state).
    torch.distributed.init_process_group(backend(cfg.train.distributed_backend), timeout=timedelta(hours=1))
    rank, local_rank = torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        if torch.cuda.is_available() and cfg.train.device != "cpu":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        # Rank 0 saves the checkpoints on this machine's disk; they are not uploaded to
        # storage.uri during the step (the in-process path does that), and only rank 0's random
        # states are saved, which matters only for models with dropout.
        checkpoints = None
        if job.get("checkpoint_dir"):
            from sdpo_core.checkpoint import Checkpoints

            checkpoints = Checkpoints(job["checkpoint_dir"], cfg.train.checkpoint_every)
        policy, tokenizer, result = train_from(
            cfg, job["ref_dir"], job["chunk_path"], job["ref_scores"], device, checkpoints=checkpoints
        )
        policy = plain_copy(policy)  # under FSDP, process 0 gathers the whole model to save it
        if rank == 0:
            out_dir = save_step_model(policy, tokenizer, Path(job["out_dir"]), job["meta"], result)
            (out_dir / HISTORY_FILE).write_text(json.dumps(result.history))
    finally:
        torch.distributed.destroy_process_group()
    return 0


def job_for(
    cfg: Any, ref_dir: str, chunk: Any, ref_scores: str, out_dir: Path, meta: dict[str, Any], checkpoints: Any = None
) -> dict[str, Any]:
    """The job file's content for :func:`main`. Process 0 saves the checkpoints; all resume from them."""
    return {
        "checkpoint_dir": str(checkpoints.root) if checkpoints is not None else None,
        "config": cfg.to_dict(),
        "ref_dir": ref_dir,
        "chunk_path": chunk.path,
        "chunk": asdict(chunk),
        "ref_scores": ref_scores,
        "out_dir": str(out_dir),
        "meta": meta,
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
