"""``sdpo data inspect``: what the pipeline would make of a data source or a recipe, without training."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdpo_core.config import RunConfig
    from sdpo_core.data import DataReport

RECIPE_SUFFIXES = (".yaml", ".yml")


def add_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="inspect preference data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser(
        "inspect",
        help="report what a source or a recipe's sources hold: rows, kept, dropped by reason, token lengths",
        description=(
            "Read a data source (a file, folder, save_to_disk folder or hub dataset id) or every "
            "source of a recipe, validate and split it as `sdpo run` would, and print the report."
        ),
    )
    inspect.add_argument("target", help="a data source, or a recipe (.yaml)")
    inspect.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe settings (data.*, model.*)")
    inspect.add_argument("--format", default="auto", help="format of a single source (default: auto)")
    inspect.add_argument("--split", default="train", help="split of a hub or save_to_disk dataset")
    inspect.add_argument("--config-name", default=None, help="configuration of a hub dataset")
    inspect.add_argument(
        "--column", action="append", default=[], metavar="ROLE=COLUMN", help="map a column, e.g. prompt=question"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")


def config_for(args: argparse.Namespace) -> RunConfig:
    """The recipe named by the target, or a one-source config around it (with the default model)."""
    from sdpo_core.config import ConfigError, load_config

    if args.target.endswith(RECIPE_SUFFIXES):
        return load_config(args.target, args.overrides)
    columns = {}
    for item in args.column:
        if "=" not in item:
            raise ConfigError([f"--column {item!r}: expected ROLE=COLUMN"])
        role, column = item.split("=", 1)
        columns[role] = column
    source = {"path": args.target, "format": args.format, "split": args.split, "config_name": args.config_name}
    if columns:
        source["columns"] = columns
    overrides = [f"data.sources=[{json.dumps(source)}]", *args.overrides]
    return load_config(None, overrides)


def _short(value: Any, width: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_report(report: DataReport, cfg: RunConfig) -> str:
    """The data report as text: one block per source, then the totals."""
    d = cfg.data
    lines = []
    for r in report.sources:
        lines.append(f"source {r.name}: {r.path}")
        lines.append(f"  format      {r.format}")
        lines.append(
            f"  rows        {r.rows} read, {r.kept} kept (train {r.train}, eval {r.eval}), content {r.content_hash}"
        )
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(r.dropped.items())) or "none"
        lines.append(f"  dropped     {dropped}")
        lines.extend(f"              {bad}" for bad in r.bad_rows)
        lines.append(
            f"  truncated   {r.truncated_prompts} prompts (over {d.max_prompt_length} tokens, "
            f"{'dropped' if d.long_prompts == 'drop' else 'end kept'}), "
            f"{r.truncated_completions} pairs' completions (over {d.max_length} tokens in all)"
        )
        for part, stats in r.token_lengths.items():
            if stats:
                lines.append(
                    f"  tokens      {part:<9} p50 {stats['p50']}, p90 {stats['p90']}, p99 {stats['p99']}, max {stats['max']}"
                )
        if r.sample:
            lines.append("  sample pair")
            for key in ("prompt", "chosen", "rejected"):
                lines.append(textwrap.indent(f"{key:<9} {_short(r.sample[key])}", "    "))
        lines.append("")
    lines.append(
        f"total: {report.train} training pairs, {report.eval} eval pairs, {report.num_steps} step(s) planned "
        f"({cfg.partition.strategy}); token lengths under {report.tokenizer}"
    )
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from sdpo_core.data import build_dataset
    from sdpo_core.model_io import load_tokenizer

    cfg = config_for(args)
    _, _, report = build_dataset(cfg, load_tokenizer(cfg.model))
    print(json.dumps(report.to_json(), indent=2, ensure_ascii=False) if args.json else format_report(report, cfg))
    return 0
