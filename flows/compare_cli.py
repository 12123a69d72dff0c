"""``sdpo compare RUN_A RUN_B``: two runs' per-step tables side by side, on the terminal or as JSON.

A run is named by its run folder (``.sdpo/runs/<name>-<time>``, or just that folder's name) or by
its MLflow parent run id. Either way the rows are the run's ``report.json`` (written by
``tasks/report.py``: one object per step), so both kinds of name give the same table. Nothing here
needs a Prefect server; an MLflow run id is read through MLflow's client.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_ID = re.compile(r"[0-9a-f]{32}")
"""MLflow run ids: 32 lowercase hex digits. Other names are never sent to the tracking server."""


def shown_columns() -> list[tuple[str, str, str]]:
    """The report's columns (title, key, format), less the step (each block's first cell) and the
    model URI (too wide to read beside another; it is in the JSON)."""
    # Imported here: tasks.report imports Prefect, which must not load before the CLI has pointed
    # it at the workspace (flows/cli.py imports this module at its top).
    from tasks.report import COLUMNS

    return [column for column in COLUMNS if column[1] not in ("step", "model_uri")]


class UnknownRun(FileNotFoundError):
    """A name that is neither a run folder with a report.json nor an MLflow run with one (exit 2)."""


@dataclass
class RunRows:
    """One run's per-step rows and where they were read from."""

    name: str
    where: str
    rows: list[dict[str, Any]]


def add_parser(sub: Any) -> None:
    """The ``compare`` subcommand."""
    compare = sub.add_parser(
        "compare",
        help="print two runs' per-step tables side by side (or as JSON)",
        description=(
            "Compare two sDPO runs step by step: for each step, run A's row, run B's row and B - A for "
            "the numbers. A run is its run folder (a path, or a folder name under .sdpo/runs/) or its "
            "MLflow parent run id; its rows are the run's report.json."
        ),
    )
    compare.add_argument("run_a", metavar="RUN_A", help="run folder or MLflow parent run id")
    compare.add_argument("run_b", metavar="RUN_B", help="run folder or MLflow parent run id")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    compare.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for run ids (default: MLFLOW_TRACKING_URI or the workspace's)",
    )


def _check_rows(rows: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in rows):
        raise UnknownRun(f"{where}: not an sdpo report (expected a list of per-step objects with a 'step')")
    return rows


def _read_report(path: Path) -> list[dict[str, Any]]:
    try:
        return _check_rows(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnknownRun(f"{path}: not an sdpo report ({exc})") from None


def _from_mlflow(run_id: str, tracking_uri: str) -> RunRows | None:
    """The run's report.json artifact, or None when the tracking store has no such run."""
    from mlflow.exceptions import MlflowException

    from sdpo_core.redact import redact
    from tasks.tracking import client

    c = client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except MlflowException:  # no such run in this store
        return None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = Path(c.download_artifacts(run_id, "report.json", scratch))
        except (MlflowException, OSError):
            raise UnknownRun(
                f"MLflow run {run_id} ({redact(tracking_uri)}) has no report.json: not the parent run of a finished sdpo run"
            ) from None
        rows = _read_report(local)
    return RunRows(run.info.run_name or run_id, f"MLflow run {run_id}", rows)


def load_run(name: str, root: Path, tracking_uri: str) -> RunRows:
    """One run's rows, from its folder (a path or a name under ``root/runs``) or its MLflow run id.

    Raises:
        UnknownRun: the name is neither, or its report is missing or not a report.
    """
    for folder in (Path(name), root / "runs" / name):
        if folder.is_file() and folder.name == "report.json":
            return RunRows(folder.parent.name, str(folder), _read_report(folder))
        if folder.is_dir():
            report = folder / "report.json"
            if not report.is_file():
                raise UnknownRun(
                    f"{folder}: a folder without report.json (not a run folder, or the run did not finish)"
                )
            return RunRows(folder.name, str(report), _read_report(report))
    if RUN_ID.fullmatch(name):
        found = _from_mlflow(name, tracking_uri)
        if found is not None:
            return found
    raise UnknownRun(
        f"no run {name!r}: not a run folder (a path, or a name under {root / 'runs'}) "
        "nor an MLflow parent run id (32 hex digits) in the tracking store"
    )


def _cell(row: dict[str, Any] | None, key: str, fmt: str) -> str:
    value = None if row is None else row.get(key)
    return "-" if value is None else fmt.format(value)


def _number(row: dict[str, Any] | None, key: str) -> float | None:
    value = None if row is None else row.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _diff(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    x, y = _number(a, key), _number(b, key)
    return None if x is None or y is None else y - x


def _by_step(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {row["step"]: row for row in rows}


def format_comparison(a: RunRows, b: RunRows) -> str:
    """Both tables interleaved: per step, A's row, B's row and B - A for the numbers."""
    shown = shown_columns()
    left, right = _by_step(a.rows), _by_step(b.rows)
    cells = [["step", "run", *(title for title, _, _ in shown)]]
    for step in sorted(left.keys() | right.keys()):
        ra, rb = left.get(step), right.get(step)
        cells.append([str(step), "A", *(_cell(ra, key, fmt) for _, key, fmt in shown)])
        cells.append(["", "B", *(_cell(rb, key, fmt) for _, key, fmt in shown)])
        diffs = (_diff(ra, rb, key) for _, key, _ in shown)
        cells.append(["", "B-A", *("" if d is None else f"{d:+.4g}" for d in diffs)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = [f"A: {a.name} ({a.where}), {len(a.rows)} step(s)", f"B: {b.name} ({b.where}), {len(b.rows)} step(s)", ""]
    return "\n".join(head + lines)


def comparison_json(a: RunRows, b: RunRows) -> dict[str, Any]:
    """Both runs' rows, and per step A's row, B's row and B - A for every number both have."""
    left, right = _by_step(a.rows), _by_step(b.rows)
    steps = []
    for step in sorted(left.keys() | right.keys()):
        ra, rb = left.get(step), right.get(step)
        keys = sorted((ra or {}).keys() & (rb or {}).keys())
        diff = {k: d for k in keys if k != "step" and (d := _diff(ra, rb, k)) is not None}
        steps.append({"step": step, "a": ra, "b": rb, "b_minus_a": diff})
    runs = {"a": {"name": a.name, "source": a.where}, "b": {"name": b.name, "source": b.where}}
    return {"runs": runs, "steps": steps}


def run_compare(args: argparse.Namespace) -> int:
    """``sdpo compare``: print the comparison; an unknown run raises :class:`UnknownRun` (exit 2)."""
    from tasks.tracking import tracking_uri
    from tasks.workspace import workspace_root

    root = workspace_root()
    uri = tracking_uri(args.tracking_uri, root)
    a, b = load_run(args.run_a, root, uri), load_run(args.run_b, root, uri)
    print(json.dumps(comparison_json(a, b), indent=2) if args.json else format_comparison(a, b))
    return 0
