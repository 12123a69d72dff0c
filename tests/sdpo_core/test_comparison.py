"""Experiment comparison pieces on hand-made scores: outcomes, the gamma matrix, the report, plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdpo_core.comparison import compare_arms, comparison_markdown, gamma_matrix, pair_outcomes, source_order_report


def _scores(chosen: list[float], rejected: list[float]) -> dict[str, torch.Tensor]:
    n = len(chosen)
    return {
        "chosen": torch.tensor(chosen),
        "rejected": torch.tensor(rejected),
        "chosen_tokens": torch.full((n,), 4),
        "rejected_tokens": torch.full((n,), 4),
    }


def test_pair_outcomes_by_hand() -> None:
    m0 = _scores([-10.0, -10.0, -8.0], [-12.0, -9.0, -8.0])  # gamma_0 = 2, -1, 0
    final = _scores([-9.0, -11.0, -7.0], [-12.0, -9.5, -9.0])  # gamma_t = 3, -1.5, 2
    out = pair_outcomes(final, m0, beta=0.5)
    np.testing.assert_allclose(out["reward_margin_vs_m0"], [0.5, -0.25, 1.0])
    np.testing.assert_array_equal(out["reward_accuracy_vs_m0"], [1, 0, 1])
    np.testing.assert_array_equal(out["reference_free_accuracy"], [1, 0, 1])
    np.testing.assert_allclose(out["chosen_logp_drift"], [1.0, -1.0, 1.0])


def test_gamma_matrix_scores_every_model_on_the_same_columns() -> None:
    matrix = gamma_matrix(
        {
            "M0": {"chunk-a": _scores([-1.0, -2.0], [-3.0, -2.0]), "eval": _scores([-5.0], [-1.0])},
            "M1": {"chunk-a": _scores([0.0, 0.0], [-4.0, -6.0]), "eval": _scores([-1.0], [-2.0])},
        }
    )
    assert matrix == {"M0": {"chunk-a": 1.0, "eval": -4.0}, "M1": {"chunk-a": 5.0, "eval": 1.0}}


def test_compare_arms_and_its_report(tmp_path) -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, size=(3, 80))
    outcomes = {
        "sdpo": {"reward_margin_vs_m0": base + 1.0, "reward_accuracy_vs_m0": (base + 1.0 > 0).astype(float)},
        "dpo": {"reward_margin_vs_m0": base + 0.999, "reward_accuracy_vs_m0": (base + 0.999 > 0).astype(float)},
        "worse": {"reward_margin_vs_m0": base - 1.0, "reward_accuracy_vs_m0": (base - 1.0 > 0).astype(float)},
    }
    c = compare_arms(outcomes, "sdpo", replicates=300, confidence=0.95, seed=0)
    assert c["arms"]["sdpo"]["reward_margin_vs_m0"]["mean"] == pytest.approx(base.mean() + 1.0)
    assert c["differences"]["worse"]["reward_margin_vs_m0"]["distinguishable"] is True
    assert c["differences"]["worse"]["reward_margin_vs_m0"]["mean"] == pytest.approx(2.0)
    assert c["differences"]["dpo"]["reward_margin_vs_m0"]["mean"] == pytest.approx(0.001)
    assert "sdpo" not in c["differences"]
    order = source_order_report(
        {"easy": np.r_[np.ones(60), np.zeros(40)], "hard": np.r_[np.ones(58), np.zeros(42)]},
        ["easy", "hard"],
        replicates=300,
        confidence=0.95,
        seed=0,
    )
    assert order["neighbours"][0]["near_tie"] is True  # 0.60 against 0.58 on 100 pairs each
    record = {
        "name": "t",
        "budgets": {"sdpo": {"seeds": 3, "optimizer_steps": 10, "pairs": 160}},
        "comparison": c,
        "gamma_matrix": {"M0": {"eval": 1.0}},
        "source_order": order,
    }
    text = comparison_markdown(record)
    assert "| worse | reward_margin_vs_m0 | 2.000" in text and "| yes |" in text
    assert "near-tie" in text

    from sdpo_core import plots

    files = [
        plots.arms_plot(c, tmp_path / "arms.png"),
        plots.gamma_matrix_plot({"M0": {"a": 1.0, "eval": -2.0}, "M1": {"a": 3.0, "eval": 0.5}}, tmp_path / "g.png"),
        plots.loss_overlay_plot(
            {"sdpo": [(1, 0.69), (2, 0.5)], "init_base": [(1, 0.8), (2, 0.6)]}, tmp_path / "l.png", 2
        ),
    ]
    for f in files:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_mean_scores_is_the_multi_reference() -> None:
    from sdpo_core.scores import mean_scores

    a, b = _scores([-10.0, -4.0], [-12.0, -6.0]), _scores([-8.0, -2.0], [-9.0, -9.0])
    m = mean_scores([a, b])
    assert m["chosen"].tolist() == [-9.0, -3.0] and m["rejected"].tolist() == [-10.5, -7.5]
    assert torch.equal(m["chosen_tokens"], a["chosen_tokens"])
    other = _scores([-1.0, -1.0], [-1.0, -1.0]) | {"chosen_tokens": torch.tensor([4, 5])}
    with pytest.raises(ValueError, match="different pairs"):
        mean_scores([a, other])
    with pytest.raises(ValueError, match="at least one"):
        mean_scores([])
