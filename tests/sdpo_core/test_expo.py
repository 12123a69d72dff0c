"""ExPO's arithmetic (sdpo_core.expo): theta_T + alpha (theta_T - theta_0), alpha choice, the split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdpo_core.expo import choose_alpha, extrapolate, validation_mask


def test_extrapolate_by_hand() -> None:
    final = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5], dtype=torch.bfloat16), "n": torch.tensor([3])}
    base = {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor([0.25], dtype=torch.bfloat16), "n": torch.tensor([7])}
    out = extrapolate(final, base, 0.5)
    assert torch.equal(out["w"], torch.tensor([1.5, 1.0]))  # 1 + .5 (1 - 0), 2 + .5 (2 - 4)
    assert out["b"].dtype == torch.bfloat16 and out["b"].item() == 0.625
    assert torch.equal(out["n"], torch.tensor([3]))  # integer buffers kept from theta_T
    assert torch.equal(extrapolate(final, base, 0.0)["w"], final["w"])
    assert torch.equal(extrapolate(final, base, -1.0)["w"], base["w"])  # alpha = -1 is back at M0


def test_extrapolate_refuses_other_architectures() -> None:
    with pytest.raises(ValueError, match="keys differ"):
        extrapolate({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        extrapolate({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.5)


def test_choose_alpha_prefers_the_smaller_on_ties() -> None:
    assert choose_alpha([0.0, 0.5, 1.0], [0.6, 0.7, 0.7]) == 0.5
    assert choose_alpha([1.0, 0.0], [0.5, 0.5]) == 0.0
    with pytest.raises(ValueError):
        choose_alpha([0.0], [float("nan")])


def test_validation_mask_is_by_prompt_and_deterministic() -> None:
    keys = [f"{i:016x}" for i in range(0, 2**64 - 1, 2**58)] * 2  # each prompt twice
    mask = validation_mask(keys, 0.5)
    half = len(keys) // 2
    assert np.array_equal(mask[:half], mask[half:])  # a prompt's pairs are on one side
    assert 0.3 < mask.mean() < 0.7
    assert np.array_equal(mask, validation_mask(keys, 0.5))
