"""A train step under torchrun with 2 gloo processes on the CPU equals one process.

Same model, pairs, reference log-probs and global batch: the per-step losses and metrics must
agree within float tolerance, under DDP and under FSDP, and only rank 0 writes the model. The
batches are uneven on purpose (7 pairs, 3 per step, passes of one or two pairs): the ranks run
different numbers of passes, and in the last step one rank has no pair at all. Checkpoints cross
over: a 2-process checkpoint resumes in one process, and a one-process run stopped mid-step
resumes under 2 processes (the AdamW moments must map by parameter name for the rest to match).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo_core.checkpoint import Checkpoints
from sdpo_core.config import from_dict
from sdpo_core.data import load_source, tokenize_pairs, write_pairs
from sdpo_core.logprobs import score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.records import ChunkInfo, TrainStepSpec
from sdpo_core.scores import save_scores
from sdpo_core.step import run_step
from sdpo_core.train import train_dpo

REPO = Path(__file__).resolve().parents[2]


def config(processes: int, parallelism: str = "ddp", lora_r: int = 0):
    return from_dict(
        {
            "model": {"name_or_path": str(REPO / "models" / "stories260K")},
            "data": {
                "sources": [{"path": str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl")}],
                "max_length": 96,
                "max_prompt_length": 48,
            },
            "train": {
                "micro_batch_size": 3,
                "max_pass_tokens": 150,
                "grad_accum_steps": 1,
                "learning_rate": 1e-3,
                "warmup_ratio": 0.0,
                "num_processes": processes,
                "parallelism": parallelism,
                "lora": {"r": lora_r},
                "num_threads": 1,
                "device": "cpu",
            },
        }
    )


class Crash(Exception):
    """Stands in for a killed process."""


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp", "ddp-lora"])
def test_two_gloo_processes_match_one(tmp_path, parallelism):
    # ddp-lora: LoRA per step under torchrun data parallelism (a fresh adapter on each process).
    parallelism, lora_r = ("ddp", 4) if parallelism == "ddp-lora" else (parallelism, 0)
    cfg = config(1)
    pairs, _ = load_source(cfg.data.sources[0].__class__(path=cfg.data.sources[0].path, name="orca", max_pairs=7))
    chunk_path = tmp_path / "chunk.jsonl"
    digest = write_pairs(pairs, chunk_path)
    chunk = ChunkInfo(step=1, label="orca", path=str(chunk_path), size=len(pairs), content_hash=digest)
    model_dir = str(REPO / "models" / "stories260K")
    tokenizer = load_tokenizer(cfg.model)
    tokenized = tokenize_pairs(pairs, tokenizer, cfg.data)
    ref = score_pairs(load_model(cfg.model), tokenized, pad_id(tokenizer), 4)
    ref_path = tmp_path / "ref.safetensors"
    save_scores(ref, ref_path)

    def train(processes: int, name: str, checkpoints: Checkpoints, resumed_from: int = 0) -> tuple[list[dict], dict]:
        seen: list[tuple[int, dict]] = []
        spec = TrainStepSpec(
            config=config(processes, parallelism, lora_r),
            chunk=chunk,
            ref_uri="models:/m/1",
            ref_scores=str(ref_path),
            ref_dir=model_dir,
            out_dir=str(tmp_path / name),
            checkpoint_dir=str(checkpoints.root),
        )
        result = run_step(spec, callback=lambda s, m: seen.append((s, m)), checkpoints=checkpoints)
        assert [s for s, _ in seen] == [1, 2, 3]  # 7 pairs, 3 per optimizer step
        assert [m for _, m in seen] == result.history
        assert (result.step, result.optimizer_steps, result.resumed_from) == (1, 3, resumed_from)
        assert result.final_loss == result.history[-1]["loss"]
        assert Path(result.model_dir) == tmp_path / name
        assert json.loads((Path(result.model_dir) / "meta.json").read_text())["step"] == 1
        return result.history, load_file(str(Path(result.model_dir) / "model.safetensors"))

    def assert_same(one: tuple[list[dict], dict], two: tuple[list[dict], dict]) -> None:
        for a, b in zip(one[0], two[0], strict=True):
            for key in (
                "loss",
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "logps/chosen",
                "grad_norm",
            ):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
        # Adam's early steps are about lr * sign(gradient): compare the weights loosely, the losses tightly.
        diffs = torch.cat([(two[1][k] - t).abs().flatten() for k, t in one[1].items()])
        assert (diffs > 1e-5).float().mean() < 1e-2

    one = train(1, "model-1", Checkpoints(tmp_path / "ckpt-1", every=1))
    two = train(2, "model-2", Checkpoints(tmp_path / "ckpt-2", every=1))
    assert_same(one, two)
    assert not (tmp_path / "model-2" / "rank1").exists()
    assert Checkpoints(tmp_path / "ckpt-2", 1).latest_name() == "step-00000003"
    if lora_r:
        return  # the resumes below build the plain model in this process; LoRA's is the step's own

    # The 2-process checkpoint (written whole by rank 0) resumes in one process: restored after
    # its last step, nothing is left to train and the weights are those the step saved.
    model = load_model(cfg.model)
    resumed = train_dpo(
        model, tokenized, ref, pad_id(tokenizer), cfg.train, cfg.loss, checkpoints=Checkpoints(tmp_path / "ckpt-2", 1)
    )
    assert resumed.resumed_from == 3
    assert resumed.history == two[0]
    for name, tensor in two[1].items():
        assert torch.equal(model.state_dict()[name], tensor), name

    # One process stopped during optimizer step 2 (checkpoint after step 1), then resumed under 2
    # processes: steps 2 and 3 continue from its weights and AdamW moments.
    def crash(step: int, _metrics: dict) -> None:
        if step == 2:
            raise Crash("killed during optimizer step 2")

    with pytest.raises(Crash):
        train_dpo(
            load_model(cfg.model), tokenized, ref, pad_id(tokenizer), cfg.train, cfg.loss, callback=crash,
            checkpoints=Checkpoints(tmp_path / "ckpt-crossed", every=1),
        )  # fmt: skip
    assert Checkpoints(tmp_path / "ckpt-crossed", 1).latest_name() == "step-00000001"
    assert_same(one, train(2, "model-crossed", Checkpoints(tmp_path / "ckpt-crossed", every=1), resumed_from=1))
