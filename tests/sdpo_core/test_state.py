"""Whole training state loads into an optimizer without changing how that optimizer computes."""

from __future__ import annotations

import copy

import pytest
import torch

from sdpo_core.state import full_state, load_full_state


def trained(fused: bool | None, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    for i in range(steps):
        step(model, optimizer, seed=i)
    return model, optimizer


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize(("saved", "resumed"), [(None, True), (True, None)])
def test_a_resumed_optimizer_keeps_its_own_implementation(saved, resumed) -> None:
    """A checkpoint of an unfused AdamW resumes fused, and the other way round, to the same weights."""
    model, optimizer = trained(saved)
    # Copied, as a checkpoint on disk is: on the CPU the state shares the live tensors' memory.
    weights, optim = copy.deepcopy(full_state(model, optimizer))
    step(model, optimizer, seed=2)  # the run that was not interrupted

    fresh = trained(resumed, steps=0)
    load_full_state(*fresh, weights, optim)
    assert all(g["fused"] is resumed for g in fresh[1].param_groups)
    step(*fresh, seed=2)
    for ours, theirs in zip(fresh[0].parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert all(s["step"].item() == 3 for s in fresh[1].state.values())


def test_train_dpo_uses_fused_adamw_on_plain_parameters(monkeypatch) -> None:
    from sdpo_core.config import LossConfig, TrainConfig
    from sdpo_core.logprobs import TokenizedPair
    from sdpo_core.train import train_dpo

    built: list[dict] = []
    original = torch.optim.AdamW

    def spy(params, **kwargs):
        built.append(kwargs)
        return original(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)

    class Tiny(torch.nn.Module):  # a causal LM in the shape sdpo reads: get_decoder / output embeddings
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.head = torch.nn.Linear(8, 16, bias=False)

        def forward(self, input_ids, **_):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.head(self.embed(input_ids)))

    pairs = [TokenizedPair([1, 2], [3, 4], [5])] * 2
    ref = {"chosen": torch.zeros(2), "rejected": torch.zeros(2)}
    train_dpo(Tiny(), pairs, ref, 0, TrainConfig(micro_batch_size=2, shared_prompt=False), LossConfig(), "cpu")
    assert built and built[0]["fused"] is True
