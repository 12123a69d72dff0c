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
            "--repeats",
            "1",
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
    for name, variant in tiny["variants"].items():
        assert len(variant["losses"]) == 4  # 16 pairs, 4 per optimizer step
        assert variant["pairs_per_s"] > 0 and variant["peak_rss_mib"] > 0 and 0 < variant["mfu"]
        assert variant["steady_pairs_per_s"] > 0 and variant["median_round"] == 0
        assert variant["mfu_datasheet"] is None  # no datasheet peak for a CPU
        # Padded rows repeat the prompt and pad: more executed than useful; sdpo shares the prompt.
        assert variant["executed_flops"] > variant["useful_flops"] > 0
        # TRL's construction is timed outside its clock; sdpo builds no trainer.
        assert (variant["trl_setup_s"] > 0) if name.startswith("trl") else variant["trl_setup_s"] is None
        assert ("gradient checkpointing off" in variant["label"]) and (
            ("DPOConfig default is on" in variant["label"]) == name.startswith("trl")
        )
        # The step's own memory: measured in the step's window where Linux lets the peak be reset.
        if variant["step_rss_mib"] is not None:
            assert 0 < variant["step_rss_mib"] < variant["peak_rss_mib"]
    assert tiny["variants"]["sdpo"]["executed_flops"] < tiny["variants"]["trl"]["executed_flops"]
    ratios = tiny["ratios"]["sdpo"]
    assert ratios["max_loss_diff_vs_trl"] < 1e-4
    assert ratios["max_loss_diff_vs_trl_precompute"] < 1e-4
    assert ratios["speed_bound_vs_trl"] > 0
    # One round: its ratio is the median's.
    assert ratios["speed_vs_trl_by_round"] == [ratios["speed_vs_trl"]]
    # The matmul rate: sampled before the first round and after each (one round here).
    samples = result["machine"]["matmul_flops_samples"]
    assert len(samples) == 2 and result["machine"]["matmul_flops"] == max(samples)
    assert result["machine"]["datasheet_peak_flops"] is None
    assert "sdpo" in proc.stdout and "x trl" in proc.stdout and "steady" in proc.stdout  # the table


def _run(variant, rnd, seconds, useful=8.0):
    return {
        "variant": variant, "round": rnd, "seconds": seconds, "pairs_per_s": 16 / seconds, "tokens_per_s": 1.0,
        "steady_pairs_per_s": 20 / seconds, "trl_setup_s": None, "peak_rss_mib": 100.0 + rnd, "first_loss": 0.7,
        "final_loss": 0.6, "losses": [0.7, 0.6], "useful_flops": useful, "executed_flops": 2 * useful,
        "train_flops": useful, "params": 1, "trainable_params": 1, "tokens": 1, "modules_imported_in_step": 0,
        "step_rss_mib": None,
    }  # fmt: skip


def test_speed_and_mfu_come_from_the_same_median_time_round():
    from benchmarks.dpo_step import summarise

    # Times 1, 4, 2: the median time is round 2's; a median of rates (16, 4, 8) would also give 8,
    # but with 4 rounds the lower median must still be one round's own figures.
    sdpo = summarise([_run("sdpo", 0, 1.0), _run("sdpo", 1, 4.0), _run("sdpo", 2, 2.0)], rate=4.0)["sdpo"]
    assert sdpo["median_round"] == 2 and sdpo["seconds"] == 2.0
    assert sdpo["pairs_per_s"] == 8.0 and sdpo["steady_pairs_per_s"] == 10.0
    assert sdpo["mfu"] == 8.0 / 2.0 / 4.0 and sdpo["executed_fu"] == 2 * sdpo["mfu"]
    assert sdpo["mfu_datasheet"] is None
    runs = [_run("sdpo", i, s) for i, s in enumerate([1.0, 8.0, 2.0, 4.0])]
    even = summarise(runs, rate=4.0, peak=8.0)["sdpo"]
    assert even["median_round"] == 2 and even["pairs_per_s"] == 16 / 2.0  # the lower median round
    assert even["mfu_datasheet"] == 8.0 / 2.0 / 8.0


def test_datasheet_peak_is_known_for_h100_and_h200_in_bf16_only():
    from benchmarks.dpo_step import datasheet_peak

    assert datasheet_peak("NVIDIA H200", "bfloat16") == datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") > 9e14
    assert datasheet_peak("NVIDIA H100 PCIe", "bfloat16") < datasheet_peak("NVIDIA H200", "bfloat16")
    assert datasheet_peak("NVIDIA H200", "float32") is None
    assert datasheet_peak("cpu", "bfloat16") is None


def test_the_labels_say_which_checkpointing_trl_ran_with():
    from benchmarks.dpo_step import label

    assert label("trl", False) == (
        "TRL, reference model in memory, gradient checkpointing off (TRL's DPOConfig default is on)"
    )
    assert label("trl_precompute", True).endswith("gradient checkpointing on (TRL's DPOConfig default)")
    assert label("sdpo", True) == "sdpo, gradient checkpointing on"


def test_steady_rate_leaves_out_the_first_step_and_shares_the_work_before_the_loop():
    from benchmarks.dpo_step import steady_rate

    # 16 pairs, 4 per step; 2 s before the loop (reference pass), steps end at 4, 5, 6, 7.
    marks = {"loop_start": 2.0, "steps": [4.0, 5.0, 6.0, 7.0]}
    assert steady_rate(16, 4, 0.0, marks) == 12 / (3.0 + 2.0 * 12 / 16)
    assert steady_rate(16, 16, 0.0, {"loop_start": 2.0, "steps": [4.0]}) is None


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
            "--gradient-checkpointing", "--repeats", "1", "--out", str(out), "--scratch", str(tmp_path / "scratch"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["gradient_checkpointing"] is True
    trl = result["sizes"]["tiny"]["variants"]["trl"]
    assert trl["label"].endswith("gradient checkpointing on (TRL's DPOConfig default)")
    # The recomputed forward is executed work.
    assert trl["executed_flops"] > trl["useful_flops"] * 10 / 8
    assert result["sizes"]["tiny"]["ratios"]["sdpo"]["max_loss_diff_vs_trl"] < 1e-4


@pytest.mark.slow
def test_the_lora_variant_reports_its_memory_beside_full_training(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.dpo_step", "--sizes", "tiny", "--variants", "sdpo,sdpo_lora",
            "--pairs", "8", "--batch-size", "4", "--max-length", "96", "--max-prompt-length", "48", "--lora-r", "4",
            "--repeats", "1", "--out", str(out), "--scratch", str(tmp_path / "scratch"),
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


def test_compile_record_says_what_compiled_before_and_inside_the_clock():
    from benchmarks.dpo_step import compile_record

    before, after = {"graphs": 6, "recompiles": 5}, {"graphs": 7, "recompiles": 6}
    record = compile_record(True, 12.5, 2.5, before, after)
    assert record == {
        "warmup_step_s": 12.5,
        "compile_s": 10.0,
        "graphs": 6,
        "recompiles_in_step": 1,
        "graphs_in_step": 1,
    }
    assert compile_record(False, None, 2.5, before, after) is None  # a variant that does not compile
    # Counts this sdpo_core or torch does not keep are -1, never a made-up 0.
    unknown = compile_record(True, 3.0, 2.5, None, None)
    assert (unknown["graphs"], unknown["recompiles_in_step"], unknown["graphs_in_step"]) == (-1, -1, -1)
    partly = compile_record(True, 3.0, 2.5, {"graphs": 2, "recompiles": -1}, {"graphs": 2, "recompiles": -1})
    assert (partly["graphs_in_step"], partly["recompiles_in_step"]) == (0, -1)


def test_labels_name_compiling_the_layout_and_the_precision():
    from benchmarks.dpo_step import label

    words = "fp32 weights with bf16 autocast"
    assert label("sdpo", False, compiled=True, layout="packed", precision=words) == (
        f"sdpo, packed layout, compiled decoder layers, {words}, gradient checkpointing off"
    )
    # TRL runs eagerly in its own layout whatever sdpo's flags are.
    assert label("trl", True, compiled=True, layout="packed", precision=words) == (
        f"TRL, reference model in memory, eager (not compiled), {words}, gradient checkpointing on "
        "(TRL's DPOConfig default)"
    )


def test_bf16_mixed_precision_needs_bfloat16_compute(capsys):
    from benchmarks.dpo_step import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--precision", "bf16-mixed", "--dtype", "float32"])
    assert exit_info.value.code == 2
    assert "--precision bf16-mixed computes in bfloat16: pass --dtype bfloat16, not float32" in capsys.readouterr().err


def test_the_layout_and_compile_flags_reach_sdpos_train_config():
    import argparse

    from benchmarks.dpo_step import add_step_options, precision_of, sdpo_configs, weights_dtype

    parser = argparse.ArgumentParser()
    add_step_options(parser)
    args = parser.parse_args(["--layout", "packed", "--row-tokens", "512", "--compile", "--dtype", "bfloat16",
                              "--precision", "bf16-mixed"])  # fmt: skip
    train_cfg, _ = sdpo_configs(args)
    assert (train_cfg.shared_prompt, train_cfg.packed_row_tokens, train_cfg.compile) == ("packed", 512, True)
    assert precision_of(args).name == "bf16-mixed" and weights_dtype(args) == "float32"
    plain, _ = sdpo_configs(parser.parse_args(["--layout", "padded"]))
    assert (plain.shared_prompt, plain.compile) == (False, False)
    assert (
        precision_of(parser.parse_args([])).name == "fp32"
        and weights_dtype(parser.parse_args(["--dtype", "bfloat16"])) == "bfloat16"
    )
