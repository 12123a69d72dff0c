"""A train step under torchrun with 2 gloo processes on the CPU equals one process.

Same model, pairs, reference log-probs and global batch: the per-step losses and metrics must
agree within float tolerance, under DDP and under FSDP, and only rank 0 writes the model. An
FSDP step's checkpoint holds the whole model and resumes in a single process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo_core import stages
from sdpo_core.checkpoint import Checkpoints
from sdpo_core.config import from_dict
from sdpo_core.data import load_source, tokenize_pairs, write_pairs
from sdpo_core.logprobs import score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.train import train_dpo

REPO = Path(__file__).resolve().parents[2]


def config(processes: int, parallelism: str = "ddp"):
    return from_dict(
        {
            "model": {"name_or_path": str(REPO / "models" / "stories260K")},
            "data": {
                "sources": [{"path": str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl")}],
                "max_length": 96,
                "max_prompt_length": 48,
            },
            "train": {
                "micro_batch_size": 4,
                "grad_accum_steps": 1,
                "learning_rate": 1e-3,
                "warmup_ratio": 0.0,
                "num_processes": processes,
                "parallelism": parallelism,
                "num_threads": 1,
                "device": "cpu",
            },
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, parallelism):
    cfg = config(1)
    pairs, _ = load_source(cfg.data.sources[0].__class__(path=cfg.data.sources[0].path, name="orca", max_pairs=8))
    chunk_path = tmp_path / "chunk.jsonl"
    digest = write_pairs(pairs, chunk_path)
    chunk = stages.ChunkInfo(1, "orca", str(chunk_path), len(pairs), digest, None)
    model_dir = str(REPO / "models" / "stories260K")
    tokenizer = load_tokenizer(cfg.model)
    tokenized = tokenize_pairs(pairs, tokenizer, cfg.data)
    ref = score_pairs(load_model(cfg.model), tokenized, pad_id(tokenizer), 4)
    ref_path = tmp_path / "ref.safetensors"
    stages._save_scores(ref, ref_path)

    results = {}
    for processes in (1, 2):
        seen: list[tuple[int, dict]] = []
        out = tmp_path / f"model-{processes}"
        checkpoints = Checkpoints(tmp_path / f"ckpt-{processes}", every=1)
        saved, result = stages.train_step(
            config(processes, parallelism),
            1,
            model_dir,
            chunk,
            str(ref_path),
            out,
            callback=lambda s, m, seen=seen: seen.append((s, m)),
            checkpoints=checkpoints,
        )
        assert [s for s, _ in seen] == [1, 2]  # 8 pairs, 4 per optimizer step
        results[processes] = (result.history, load_file(str(Path(saved) / "model.safetensors")))
        assert json.loads((Path(saved) / "meta.json").read_text())["step"] == 1
        assert checkpoints.latest_name() == "step-00000002"

    one, two = results[1][0], results[2][0]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    # Adam's early steps are about lr * sign(gradient): compare the weights loosely, the losses tightly.
    diffs = torch.cat([(results[2][1][k] - t).abs().flatten() for k, t in results[1][1].items()])
    assert (diffs > 1e-5).float().mean() < 1e-2
    assert not (tmp_path / "model-2" / "rank1").exists()

    # The 2-process checkpoint (written whole by rank 0) resumes in one process: restored after
    # its last step, nothing is left to train and the weights are those the step saved.
    model = load_model(cfg.model)
    resumed = train_dpo(
        model, tokenized, ref, pad_id(tokenizer), cfg.train, cfg.loss, checkpoints=Checkpoints(tmp_path / "ckpt-2", 1)
    )
    assert resumed.resumed_from == 2
    assert resumed.history == two
    for name, tensor in results[2][1].items():
        assert torch.equal(model.state_dict()[name], tensor), name
