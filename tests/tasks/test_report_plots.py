"""The report's pieces that need no service: the pipeline's plots, the table artifact's rows, the
Markdown report and the held-out metrics picked from a row."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sdpo_core.run_plots import heldout_plot, partition_plot, run_plots, training_curves_plot
from tasks.context import RunContext
from tasks.report import COLUMNS, markdown_report, step_metrics_of, table_records

ROWS = [
    {
        "step": 1,
        "chunk": "orca",
        "pairs": 12,
        "m0_accuracy": 0.75,
        "eval/ref_gamma": -3.5,
        "eval/reward_accuracy_vs_m0": 0.6,
        "eval/reward_margin_vs_m0": 0.02,
        "eval/reward_accuracy_vs_prev": 0.6,
        "eval/reward_margin_vs_prev": 0.02,
        "eval/gamma": -3.3,
        "chunk/ref_gamma": -2.0,
        "train_loss": 0.69,
        "optimizer_steps": 3,
        "version": "2",
        "model_uri": "models:/m@step-1",
        "reused": False,
    },
    {
        "step": 2,
        "chunk": "mix|hard",  # a '|' must not break the Markdown table
        "pairs": 10,
        "m0_accuracy": 0.4,
        "eval/ref_gamma": -3.3,
        "eval/reward_accuracy_vs_m0": 0.7,
        "eval/reward_margin_vs_m0": 0.05,
        "eval/reward_accuracy_vs_prev": 0.55,
        "eval/reward_margin_vs_prev": 0.03,
        "eval/gamma": -3.0,
        "chunk/ref_gamma": -1.0,
        "train_loss": 0.66,
        "optimizer_steps": 2,
        "version": "3",
        "model_uri": "models:/m@step-2",
        "reused": True,
    },
]

CURVES = {
    "step 1: orca": [(1, {"loss": 0.693, "rewards/margins": 0.0, "rewards/accuracies": 0.0}), (2, {"loss": 0.68})],
    "step 2: mix": [(1, {"loss": 0.70, "rewards/margins": 0.01, "rewards/accuracies": 0.5})],
}


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_plots_writes_three_pngs(tmp_path):
    paths = run_plots(ROWS, CURVES, tmp_path / "plots")
    assert [p.name for p in paths] == ["training.png", "heldout.png", "partition.png"]
    assert all(is_png(p) and p.stat().st_size > 5_000 for p in paths)
    # Atomic writes: nothing else is left in the folder.
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)


def test_plots_draw_one_line_per_step_and_each_metric(tmp_path, monkeypatch):
    """The figures hold what they claim: a line per sDPO step in each training panel, a line per
    held-out metric against the steps, a bar per chunk (read back from the matplotlib figures)."""
    import sdpo_core.run_plots as run_plots_module

    figures = []
    monkeypatch.setattr(run_plots_module, "_save", lambda fig, path: figures.append(fig) or path)
    training_curves_plot(CURVES, tmp_path / "t.png")
    heldout_plot(ROWS, tmp_path / "h.png")
    partition_plot(ROWS, tmp_path / "p.png")
    training, heldout, partition = figures
    loss_panel = training.axes[0]
    assert [line.get_label() for line in loss_panel.lines] == ["step 1: orca", "step 2: mix"]
    assert list(loss_panel.lines[0].get_xdata()) == [1, 2] and list(loss_panel.lines[0].get_ydata()) == [0.693, 0.68]
    # The margin panel has no point of step 1's second optimizer step (not logged there).
    assert list(training.axes[1].lines[0].get_xdata()) == [1]
    accuracy_panel = heldout.axes[0]
    assert [line.get_label() for line in accuracy_panel.lines] == ["reward_accuracy_vs_m0", "reward_accuracy_vs_prev"]
    assert list(accuracy_panel.lines[0].get_xdata()) == [1, 2]
    assert list(accuracy_panel.lines[0].get_ydata()) == [0.6, 0.7]
    sizes, accuracies = partition.axes
    assert [bar.get_height() for bar in sizes.patches] == [12, 10]
    assert [bar.get_height() for bar in accuracies.patches] == [0.75, 0.4]


def test_table_records_format_as_the_terminal_table():
    records = table_records(ROWS)
    assert list(records[0]) == [title for title, _, _ in COLUMNS]
    assert records[0]["M0 acc"] == "0.750" and records[1]["eval acc vs M0"] == "0.700"
    assert table_records([{"step": 1}])[0]["train loss"] == "-"


def test_markdown_report_has_a_row_per_step_and_escapes_bars():
    ctx = RunContext(
        root="/ws", run_dir="/ws/runs/x", tracking_uri="sqlite:///db", experiment_id="7", parent_run_id="parent123",
        model_name="m",
    )  # fmt: skip
    text = markdown_report(ROWS, ctx, [Path("plots/training.png")])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(ROWS)
    assert all(line.count(" | ") == len(COLUMNS) - 1 for line in table[2:]), "an unescaped '|' split a cell"
    assert "mix\\|hard" in text and "parent123" in text and "`plots/training.png`" in text


def test_step_metrics_of_takes_the_held_out_numbers_only():
    got = step_metrics_of(ROWS[0] | {"harness/arc/acc": 0.25, "eval/note": "text"})
    assert set(got) == {
        "eval/ref_gamma",
        "eval/reward_accuracy_vs_m0",
        "eval/reward_margin_vs_m0",
        "eval/reward_accuracy_vs_prev",
        "eval/reward_margin_vs_prev",
        "eval/gamma",
        "chunk/ref_gamma",
        "harness/arc/acc",
    }
    assert got["eval/gamma"] == pytest.approx(-3.3) and not any(math.isnan(v) for v in got.values())
