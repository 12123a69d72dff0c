"""The kernel micro-benchmark runs and reports every case (timings are not asserted)."""

from __future__ import annotations

import json

from benchmarks import kernels


def test_kernels_benchmark_reports_every_case(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert kernels.main(["--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(c["pairs"], c["prompt"], c["rejected"]) for c in result["attention"]] == list(kernels.ATTENTION_CASES)
    for case in result["attention"]:
        assert case["square"] > 0 and case["rectangle"] > 0
    assert result["adamw"]["parameters"] == 20_569_600  # the benchmark's 20M model
    assert min(result["adamw"][k] for k in ("default", "foreach", "fused")) > 0
    assert "square/rect" in capsys.readouterr().out
