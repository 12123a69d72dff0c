"""fp16-mixed's loss scaler is part of a step's checkpoint: a resumed step goes on with the scale
it had, not with a fresh 65536."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdpo_core.checkpoint import SCALER, Checkpoints
from sdpo_core.config import LossConfig, TrainConfig
from sdpo_core.model_io import load_model
from sdpo_core.precision import PRECISIONS
from sdpo_core.train import train_dpo
from tests.sdpo_core.test_checkpoint import MODEL_CFG, Crash, setup  # noqa: F401  (setup is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = TrainConfig(micro_batch_size=2, learning_rate=2e-3, warmup_ratio=0.3, seed=3)
FRESH_SCALE = 65536.0  # torch's initial scale


@pytest.fixture
def fast_growing_scaler(monkeypatch):
    """A scaler that grows x3 after every step without overflow (torch's waits 2000 steps) and
    halves after one with: the scale moves every step and never comes back to where it started
    (3^a / 2^b is 1 only for a = b = 0)."""
    original = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: original(device, growth_factor=3.0, growth_interval=1))


def _train(setup, checkpoints: Checkpoints | None, crash_after: int | None = None):  # noqa: F811
    pairs, ref, pid = setup
    model = load_model(MODEL_CFG)

    def callback(step: int, metrics: dict[str, float]) -> None:
        if crash_after is not None and step == crash_after + 1:
            raise Crash(f"killed during optimizer step {step}")

    return train_dpo(
        model, pairs, ref, pid, CFG, LossConfig(), callback=callback, checkpoints=checkpoints,
        precision=PRECISIONS["fp16-mixed"],
    )  # fmt: skip


def test_resume_restores_the_loss_scale(setup, fast_growing_scaler, tmp_path: Path) -> None:  # noqa: F811
    whole = _train(setup, None)
    scales = [h["loss_scale"] for h in whole.history]
    print("loss scale after each step:", scales)
    assert scales[3] != FRESH_SCALE, "the scale has moved by the checkpoint (else the test shows nothing)"
    ckpt = Checkpoints(tmp_path / "ckpt", every=2)
    with pytest.raises(Crash):
        _train(setup, ckpt, crash_after=4)
    saved = json.loads((tmp_path / "ckpt" / "step-00000004" / SCALER).read_text())
    assert saved["scale"] == scales[3]
    resumed = _train(setup, ckpt)
    assert resumed.resumed_from == 4
    assert [h["loss_scale"] for h in resumed.history] == scales
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


def test_a_checkpoint_without_scaler_state_warns_and_starts_afresh(setup, tmp_path: Path) -> None:  # noqa: F811
    pairs, ref, pid = setup
    ckpt = Checkpoints(tmp_path / "ckpt", every=2)
    with pytest.raises(Crash):  # an fp32 run writes no scaler state
        pairs_model = load_model(MODEL_CFG)

        def crash(step: int, _metrics: dict[str, float]) -> None:
            if step == 3:
                raise Crash("killed")

        train_dpo(pairs_model, pairs, ref, pid, CFG, LossConfig(), callback=crash, checkpoints=ckpt)
    scaler = torch.amp.GradScaler("cpu")
    model = load_model(MODEL_CFG)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pytest.warns(UserWarning, match="no loss-scaler state"):
        assert ckpt.restore(model, optimizer, scheduler, scaler) is not None
    assert scaler.get_scale() == FRESH_SCALE
