"""The step profiler runs the benchmark's step three times and lists where the time went."""

from __future__ import annotations

import json

from benchmarks import profile_step


def test_profile_step_reports_runs_and_operations(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert (
        profile_step.main(
            ["--pairs", "8", "--batch-size", "4", "--profile-pairs", "4", "--top", "10", "--out", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert min(result[k] for k in ("first_run_s", "second_run_s", "profiled_run_s")) > 0
    assert result["profiled_pairs"] == 4 and "--profile-pairs 4" in result["command"]
    assert result["layout"] == {"shared_prompt": True, "max_pass_tokens": 1024}  # the CPU defaults
    assert len(result["top"]) == 10 and all(op["calls"] > 0 for op in result["top"])
    assert any(op["name"] == "aten::mm" for op in result["top"]), "the matmuls should be among the top operations"
    assert "profiled run (4 pairs)" in capsys.readouterr().out
