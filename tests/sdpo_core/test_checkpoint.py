"""Mid-step checkpoints: resume is bit for bit on the CPU, writes are atomic, damage is detected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdpo_core import checkpoint
from sdpo_core.checkpoint import LATEST, Checkpoints
from sdpo_core.config import DataConfig, LossConfig, ModelConfig, SourceConfig, TrainConfig
from sdpo_core.data import load_source, tokenize_pairs
from sdpo_core.logprobs import TokenizedPair, score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.train import train_dpo

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
MODEL_CFG = ModelConfig(name_or_path=str(REPO / "models" / "stories260K"))
# 12 pairs, global batch 2: six optimizer steps, with warmup and cosine decay (the scheduler's
# position matters) and weight decay (AdamW's state and the step count matter).
CFG = TrainConfig(micro_batch_size=2, learning_rate=2e-3, warmup_ratio=0.3, weight_decay=0.01, seed=3)


class Crash(Exception):
    """Stands in for a killed process."""


@pytest.fixture(scope="module")
def setup() -> tuple[list[TokenizedPair], dict[str, torch.Tensor], int]:
    tokenizer = load_tokenizer(MODEL_CFG)
    raw, _ = load_source(
        SourceConfig(path=str(REPO / "data" / "hh-rlhf_helpful-base_test.jsonl.gz"), name="hh", max_pairs=40)
    )
    pairs = tokenize_pairs(raw[:12], tokenizer, DataConfig(max_length=96, max_prompt_length=64))
    ref = score_pairs(load_model(MODEL_CFG), pairs, pad_id(tokenizer), batch_size=4)
    return pairs, ref, pad_id(tokenizer)


def _train(setup, checkpoints: Checkpoints | None, crash_after: int | None = None, calls: list | None = None):
    pairs, ref, pid = setup
    model = load_model(MODEL_CFG)

    def callback(step: int, metrics: dict[str, float]) -> None:
        if calls is not None:
            calls.append((step, metrics["loss"]))
        if crash_after is not None and step == crash_after + 1:
            raise Crash(f"killed during optimizer step {step}")

    result = train_dpo(model, pairs, ref, pid, CFG, LossConfig(), callback=callback, checkpoints=checkpoints)
    return model, result


def test_resume_ends_with_the_same_weights_bit_for_bit(setup, tmp_path: Path) -> None:
    whole, whole_result = _train(setup, None)
    ckpt = Checkpoints(tmp_path / "ckpt", every=2)
    with pytest.raises(Crash):
        _train(setup, ckpt, crash_after=4)  # saved after steps 2 and 4, killed in step 5
    assert (tmp_path / "ckpt" / LATEST).read_text().strip() == "step-00000004"
    calls: list = []
    resumed, result = _train(setup, ckpt, calls=calls)
    assert result.resumed_from == 4
    assert [s for s, _ in calls] == [1, 2, 3, 4, 5, 6], "the restored history is replayed, then training goes on"
    assert [loss for _, loss in calls] == [h["loss"] for h in whole_result.history]
    assert result.history == whole_result.history
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_checkpoint_holds_everything_and_only_the_newest_is_kept(setup, tmp_path: Path) -> None:
    ckpt = Checkpoints(tmp_path / "ckpt", every=4)
    _train(setup, ckpt)
    # Saved after step 4 and after the last (6); the older one is removed once the newer is in place.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [LATEST, "step-00000006"]
    path = ckpt.latest()
    assert path is not None
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.json",
        "rng.safetensors",
        "scheduler.json",
        "state.json",
    ]
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6
    assert json.loads((path / "scheduler.json").read_text())["last_epoch"] == 6
    # Resuming a finished step trains nothing and returns the same model.
    model, result = _train(setup, ckpt)
    assert result.resumed_from == 6 and result.optimizer_steps == 6


def test_damaged_checkpoint_is_ignored_not_loaded(setup, tmp_path: Path) -> None:
    ckpt = Checkpoints(tmp_path / "ckpt", every=2)
    with pytest.raises(Crash):
        _train(setup, ckpt, crash_after=2)
    path = ckpt.latest()
    assert path is not None
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated, as by a disk that filled up
    with pytest.warns(UserWarning, match="model.safetensors does not match"):
        assert ckpt.latest() is None
    with pytest.warns(UserWarning):
        _, result = _train(setup, ckpt)
    assert result.resumed_from == 0


def test_interrupted_write_leaves_the_previous_checkpoint(setup, tmp_path: Path, monkeypatch) -> None:
    ckpt = Checkpoints(tmp_path / "ckpt", every=2)
    with pytest.raises(Crash):
        _train(setup, ckpt, crash_after=2)
    before = ckpt.latest()

    def failing_save(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("sdpo_core.checkpoint.save_file", failing_save)
    with pytest.raises(OSError, match="the disk is full"):  # a DiskFullError naming the checkpoint
        _train(setup, replace_every(ckpt, 1))
    assert ckpt.latest() == before
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [], "a failed write cleans up its temporary folder"


def test_interrupted_pointer_write_keeps_the_previous_latest(setup, tmp_path: Path, monkeypatch) -> None:
    """The ``latest`` pointer is replaced atomically: a failure while writing the new one leaves
    the old pointer whole and no temporary file beside it."""
    ckpt = Checkpoints(tmp_path / "ckpt", every=2)
    with pytest.raises(Crash):
        _train(setup, ckpt, crash_after=2)
    before = ckpt.latest()
    real_fsync = checkpoint._fsync

    def failing_fsync(path: Path) -> None:
        if Path(path).name.startswith(f".{LATEST}."):
            raise OSError("I/O error")
        real_fsync(path)

    monkeypatch.setattr("sdpo_core.checkpoint._fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        _train(setup, replace_every(ckpt, 1))
    assert ckpt.latest() == before
    assert not [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(f".{LATEST}.")]


def replace_every(ckpt: Checkpoints, every: int) -> Checkpoints:
    return Checkpoints(ckpt.root, every, ckpt.on_saved)


def test_due_schedule() -> None:
    ckpt = Checkpoints("unused", every=3)
    assert [s for s in range(1, 8) if ckpt.due(s, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if Checkpoints("unused", every=0).due(s, 7)] == [7]


def test_a_second_process_cannot_train_the_same_step(tmp_path: Path) -> None:
    import subprocess
    import sys

    ckpt = Checkpoints(tmp_path / "ckpt", every=1)
    code = (
        "import sys; from sdpo_core.checkpoint import Checkpoints, CheckpointBusy\n"
        "try:\n    with Checkpoints(sys.argv[1], 1).exclusive(): pass\n"
        "except CheckpointBusy as e:\n    print(e); sys.exit(3)\n"
    )
    with ckpt.exclusive():
        other = subprocess.run([sys.executable, "-c", code, str(ckpt.root)], capture_output=True, text=True, cwd=REPO)
    assert other.returncode == 3 and "another process is training this step" in other.stdout, other.stderr
    free = subprocess.run([sys.executable, "-c", code, str(ckpt.root)], capture_output=True, text=True, cwd=REPO)
    assert free.returncode == 0, "the lock is released when the step ends"


def test_checkpoint_folder_ignores_operational_settings(tmp_path: Path) -> None:
    from sdpo_core.config import load_config
    from sdpo_core.records import ChunkInfo
    from sdpo_core.step import checkpoint_dir

    base = load_config(REPO / "recipes" / "default.yaml")
    chunk = ChunkInfo(step=1, label="orca", path="x.jsonl", size=4, content_hash="abc", m0_accuracy=None)
    ref = REPO / "models" / "stories260K"

    def folder(*overrides: str) -> Path:
        return checkpoint_dir(load_config(REPO / "recipes" / "default.yaml", list(overrides)), chunk, ref, tmp_path)

    same = folder("train.device=cpu", "train.num_threads=1", "train.checkpoint_every=7", "tracking.experiment=x")
    assert same == checkpoint_dir(base, chunk, ref, tmp_path)
    assert folder("train.learning_rate=0.01") != same, "what the step learns from changes the folder"
    assert folder("run_name=other") != same
    other_chunk = chunk.model_copy(update={"content_hash": "abd"})
    assert checkpoint_dir(base, other_chunk, ref, tmp_path) != same, "so does the chunk's content"


def test_turning_gradient_checkpointing_on_keeps_the_step_checkpoints() -> None:
    """It changes the memory a step needs, not what it learns (the same weights, see test_train):
    a step that ran out of memory resumes from its checkpoint with it turned on."""
    from sdpo_core.config import from_dict
    from sdpo_core.step import training_hash

    base = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]}}
    plain = from_dict(base)
    assert training_hash(from_dict({**base, "train": {"gradient_checkpointing": True}})) == training_hash(plain)
    assert training_hash(from_dict({**base, "train": {"learning_rate": 1e-4}})) != training_hash(plain)
