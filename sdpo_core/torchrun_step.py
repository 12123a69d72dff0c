"""A train step under torchrun: ``python -m torch.distributed.run ... -m sdpo_core.torchrun_step SPEC``.

:func:`sdpo_core.step.launch` writes the step's :class:`TrainStepSpec` as JSON, starts torchrun
with ``train.num_processes`` processes and waits. Each process joins the process group (NCCL on
GPUs, gloo on CPUs), loads M(t-1) and the chunk, and trains its share of every micro-batch under
torch's DDP or FSDP (``train.parallelism``, see :mod:`sdpo_core.parallel`). Only process 0 saves
the model and writes the :class:`TrainStepResult` for the launcher to read.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from sdpo_core.checkpoint import Checkpoints
from sdpo_core.collectives import backend
from sdpo_core.parallel import plain_copy
from sdpo_core.records import TrainStepSpec
from sdpo_core.step import save_step_model, train_from, write_result


def main(spec_path: str) -> int:
    spec = TrainStepSpec.model_validate_json(Path(spec_path).read_text())
    cfg = spec.config
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
        checkpoints = Checkpoints(spec.checkpoint_dir, cfg.train.checkpoint_every) if spec.checkpoint_dir else None
        policy, tokenizer, trained = train_from(spec, device, checkpoints=checkpoints)
        policy = plain_copy(policy)  # under FSDP, process 0 gathers the whole model to save it
        if rank == 0:
            write_result(save_step_model(policy, tokenizer, spec, trained))
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
