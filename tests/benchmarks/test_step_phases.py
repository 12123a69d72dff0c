"""benchmarks.step_phases: both phases of sdpo's step timed, as one JSON line."""

from __future__ import annotations

import json

from benchmarks import step_phases


def test_prints_both_phases_of_each_repetition(capsys) -> None:
    assert step_phases.main(["--size", "tiny", "--pairs", "4", "--batch-size", "2", "--repeats", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["size"], out["pairs"], len(out["runs"])) == ("tiny", 4, 2)
    assert all(run["reference_s"] > 0 and run["train_s"] > 0 for run in out["runs"])
