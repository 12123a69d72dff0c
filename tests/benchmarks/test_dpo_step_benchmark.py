"""The DPO step benchmark runs end to end, and sdpo's losses equal TRL's on the same batches.

Speed and memory are not asserted here (shared machines are noisy; the benchmark reports them);
what is asserted is that the three variants compute the same thing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_runs_and_losses_match_trl(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.dpo_step",
            "--sizes",
            "tiny",
            "--pairs",
            "16",
            "--batch-size",
            "4",
            "--max-length",
            "96",
            "--max-prompt-length",
            "48",
            "--out",
            str(out),
            "--scratch",
            str(tmp_path / "scratch"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    tiny = result["sizes"]["tiny"]
    assert set(tiny["variants"]) == {"sdpo", "trl", "trl_precompute"}
    for variant in tiny["variants"].values():
        assert len(variant["losses"]) == 4  # 16 pairs, 4 per optimizer step
        assert variant["pairs_per_s"] > 0 and variant["peak_rss_mib"] > 0 and 0 < variant["mfu"]
        # The step's own memory: measured in the step's window where Linux lets the peak be reset.
        if variant["step_rss_mib"] is not None:
            assert 0 < variant["step_rss_mib"] < variant["peak_rss_mib"]
    ratios = tiny["ratios"]["sdpo"]
    assert ratios["max_loss_diff_vs_trl"] < 1e-4
    assert ratios["max_loss_diff_vs_trl_precompute"] < 1e-4
    assert ratios["speed_bound_vs_trl"] > 0
    # One round: its ratio is the median's.
    assert ratios["speed_vs_trl_by_round"] == [ratios["speed_vs_trl"]]
    # The matmul rate: sampled before the first round and after each (one round here).
    samples = result["machine"]["matmul_flops_samples"]
    assert len(samples) == 2 and result["machine"]["matmul_flops"] == max(samples)
    assert "sdpo" in proc.stdout and "x trl" in proc.stdout  # the table


def test_round_ratios_pair_the_runs_of_each_round():
    from benchmarks.dpo_step import round_ratios

    runs = [
        {"variant": v, "round": i, "pairs_per_s": speed}
        for v, i, speed in [("sdpo", 0, 3.0), ("trl", 0, 2.0), ("trl", 1, 1.0), ("sdpo", 1, 2.5), ("trl", 2, 9.0)]
    ]
    assert round_ratios(runs, "trl") == [1.5, 2.5]  # round 2 has no sdpo run


@pytest.mark.slow
def test_with_gradient_checkpointing_on_both_sides_the_losses_still_match(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.dpo_step", "--sizes", "tiny", "--variants", "sdpo,trl",
            "--pairs", "8", "--batch-size", "4", "--max-length", "96", "--max-prompt-length", "48",
            "--gradient-checkpointing", "--out", str(out), "--scratch", str(tmp_path / "scratch"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["gradient_checkpointing"] is True
    assert result["sizes"]["tiny"]["ratios"]["sdpo"]["max_loss_diff_vs_trl"] < 1e-4


@pytest.mark.slow
def test_the_lora_variant_reports_its_memory_beside_full_training(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.dpo_step", "--sizes", "tiny", "--variants", "sdpo,sdpo_lora",
            "--pairs", "8", "--batch-size", "4", "--max-length", "96", "--max-prompt-length", "48", "--lora-r", "4",
            "--out", str(out), "--scratch", str(tmp_path / "scratch"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["lora_r"] == 4
    tiny = result["sizes"]["tiny"]
    full, lora = tiny["variants"]["sdpo"], tiny["variants"]["sdpo_lora"]
    assert full["trainable_params"] == full["params"]
    assert 0 < lora["trainable_params"] < full["params"] / 10, "only the adapter trains"
    assert lora["pairs_per_s"] > 0 and lora["peak_rss_mib"] > 0 and len(lora["losses"]) == 2
    assert "max_loss_diff_vs_sdpo_lora" not in tiny["ratios"]["sdpo"], "LoRA's losses are its own"
    assert tiny["ratios"]["sdpo"]["memory_vs_sdpo_lora"] > 0
    assert "tiny: LoRA trains" in proc.stdout and "against" in proc.stdout
