"""The command line of continual sDPO: ``sdpo run --continue`` (its printing), ``sdpo rollback``
and ``sdpo lineage``. flows/cli.py routes to these; they read the registry through MLflow's client
and need no Prefect server (rollback and lineage) or start the continue flow (run)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdpo_core.config import RunConfig

COMMANDS = ("rollback", "lineage")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``rollback`` and ``lineage`` subcommands."""
    rollback = sub.add_parser(
        "rollback",
        help="point final back to an earlier step of the chain, deleting nothing",
        description=(
            "Point the registered model's final alias back to step N of its chain (step-k aliases "
            "after N are removed). The versions after N stay in the registry, tagged "
            "sdpo.abandoned=true; the next `sdpo run --continue` trains from step N, and trains the "
            "batches of the abandoned steps again unless their files left the watched folder."
        ),
    )
    rollback.add_argument("--config", "-c", default="recipes/continual.yaml", help="the chain's recipe")
    rollback.add_argument("--to", required=True, metavar="step-N", help="the step final moves back to")
    rollback.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings on top of the recipe")
    lineage = sub.add_parser(
        "lineage",
        help="print the chain behind final: versions, batches, references, held-out metrics",
        description="Print each version of the chain behind the registered model's final alias.",
    )
    lineage.add_argument("--config", "-c", default="recipes/continual.yaml", help="the chain's recipe")
    lineage.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings on top of the recipe")


def run_continue(cfg: RunConfig) -> int:
    """``sdpo run --continue``: the continue flow on a parsed config; prints what it did."""
    from sdpo_core.model_io import check_model_source

    check_model_source(cfg.model)
    if cfg.storage.credentials_block:
        from tasks.blocks import read_credentials

        read_credentials(cfg.storage.credentials_block)  # a missing block stops the run here
    from flows.continual import sdpo_continue

    result = sdpo_continue(config=cfg)
    print()
    print(f"sdpo continue {cfg.run_name!r}: {result.message}")
    if result.rows:
        print()
        print(result.table)
    if result.lineage:
        print()
        print(f"Chain of {result.model_name!r}:")
        print(result.lineage)
    return 0


def _uri(cfg: RunConfig) -> str:
    from tasks.tracking import tracking_uri
    from tasks.workspace import workspace_root

    return tracking_uri(cfg.tracking.tracking_uri, workspace_root())


def run_command(args: argparse.Namespace) -> int:
    """``sdpo rollback`` or ``sdpo lineage``."""
    from sdpo_core.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.command == "rollback":
        return _rollback(cfg, args.to)
    return _lineage(cfg)


def _rollback(cfg: RunConfig, to: str) -> int:
    from sdpo_core.config import ConfigError
    from sdpo_core.continual import BATCH_FILE, parse_step
    from tasks.blocks import read_access
    from tasks.continual import rollback_chain
    from tasks.workspace import workspace_root

    try:
        step = parse_step(to)
    except ValueError as exc:
        raise ConfigError([f"--to: {exc}"]) from None
    name = cfg.tracking.registered_model
    access = read_access(cfg.storage.credentials_block)
    target, abandoned = rollback_chain(_uri(cfg), name, step, workspace_root(), cfg.storage.uri, access)
    print(f"Registered model {name!r}: final is version {target.version} (step-{target.step}) again.")
    print(f"Abandoned (kept, tagged sdpo.abandoned=true): version(s) {', '.join(a.version for a in abandoned)}.")
    files = [a.tags[BATCH_FILE] for a in abandoned if BATCH_FILE in a.tags]
    if files:
        print(f"The next `sdpo run --continue` trains again: {', '.join(files)} (remove a file to leave it out).")
    return 0


def _lineage(cfg: RunConfig) -> int:
    from sdpo_core.continual import ABANDONED, ChainError
    from sdpo_core.lineage import format_lineage, lineage_row
    from tasks import tracking
    from tasks.continual import find_chain

    name = cfg.tracking.registered_model
    c = tracking.client(_uri(cfg))
    chain = find_chain(c, name)
    if chain is None:
        raise ChainError(f"registered model {name!r}: no final version yet (no chain to show)")
    print(f"Chain of registered model {name!r} (final: version {chain[-1].version}):")
    print(format_lineage([lineage_row(link) for link in chain]))
    abandoned = tracking.search_versions(c, f"name = '{name}' and tags.`{ABANDONED}` = 'true'")
    if abandoned:
        rows = [
            f"  version {v.version} (step {v.tags.get('sdpo.step', '?')}, rolled back to version "
            f"{v.tags.get('sdpo.abandoned_for', '?')})"
            for v in sorted(abandoned, key=lambda v: int(v.version))
        ]
        print("Abandoned by rollbacks (kept in the registry):", *rows, sep="\n")
    return 0
