"""The ``sdpo`` command: ``sdpo run --config RECIPE key.sub=value ...``."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from flows import compare_cli, continual_cli, data_inspect
from sdpo_core.locks import file_lock
from tasks.workspace import configure_environment

if TYPE_CHECKING:
    from sdpo_core.config import RunConfig
    from sdpo_core.data import DataReport
    from sdpo_core.records import PreparedData

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
RESUME_HINT = (
    "finished steps are registered and the unfinished step's checkpoints are kept: "
    "run the same command again to continue"
)


def _options_help() -> str:
    from sdpo_core.config import RunConfig
    from sdpo_core.config_rules import describe

    lines = ["recipe options (set in the YAML recipe or as key.sub=value overrides):", ""]
    for key, default, doc in describe(RunConfig):
        lines.append(f"  {key} (default {default})")
        lines.extend(textwrap.wrap(doc, width=88, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo",
        description="Stepwise DPO (sDPO) as a Prefect pipeline with MLflow tracking and registry.",
        epilog="Workspace: everything a run writes goes under .sdpo/ (set SDPO_HOME to move it).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the sDPO pipeline on a recipe",
        description=(
            "Split the preference data into steps and train step t with DPO from, and against, "
            "the model of step t-1; every step is tracked and registered in MLflow."
        ),
        epilog=_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", "-c", default="recipes/default.yaml", help="YAML recipe (default: %(default)s)")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings on top of the recipe")
    run.add_argument(
        "--dry-run", action="store_true", help="check the config and data, print the resolved config, stop"
    )
    run.add_argument(
        "--continue",
        dest="continue_chain",
        action="store_true",
        help="continual sDPO: train the batches new in data.watch as the next steps after final (flows/continual.py)",
    )
    experiment = sub.add_parser(
        "experiment",
        help="compare sDPO with plain DPO and controls: arms x seeds, with intervals and plots",
        description=(
            "Run every arm of an experiment recipe with every seed on one shared data preparation "
            "and one M0, then compare the final models on the shared eval split (comparison.md, "
            "comparison.json and PNG plots, also in MLflow and as Prefect artifacts)."
        ),
    )
    experiment.add_argument(
        "--config", "-c", default="recipes/experiments/default.yaml", help="experiment recipe (default: %(default)s)"
    )
    experiment.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings on top of the recipe")
    experiment.add_argument("--dry-run", action="store_true", help="check the recipe, every arm and the data, stop")
    data_inspect.add_parser(sub)
    continual_cli.add_parsers(sub)
    compare_cli.add_parser(sub)
    return parser


def preflight(cfg: RunConfig, data_dir: Path) -> tuple[PreparedData, DataReport]:
    """Check the model folder and the tracking server, then prepare the data into ``data_dir``,
    before Prefect starts: bad input fails in seconds, with one message, before anything is
    tracked. The flow is handed the prepared data and does not read the sources again.
    """
    from sdpo_core.harness import check_available
    from sdpo_core.model_io import check_model_source
    from tasks.data import prepare

    check_model_source(cfg.model)
    if not cfg.train.deployment:  # a deployment's worker runs the harness, and checks for it there
        check_available(cfg)  # evaluate.harness without lm_eval: exit 2 with the install hint
    check_tracking_server(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    return prepare(cfg, data_dir)


class TrackingUnreachable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def check_tracking_server(uri: str | None, timeout: float = 5.0) -> None:
    """Fail fast, naming the server, when an MLflow server over HTTP does not answer ``/health``.

    (MLflow's own client retries for minutes before it gives up; a run should not start
    training only to find out at the first log.)
    """
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from sdpo_core.redact import redact

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingUnreachable(f"MLflow tracking server {redact(uri)} does not answer: {problem}")


def create_prefect_database() -> None:
    """Create the temporary Prefect server's database in a new workspace, under a file lock.

    Without a Prefect server (no ``PREFECT_API_URL``) each run starts a temporary one on the
    workspace's SQLite database, and each server migrates it on start: two runs starting at
    once in a new workspace would race in those migrations. The first run creates it here (a
    ``prefect server database upgrade`` in its own process) while any other waits.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    import subprocess

    home = Path(os.environ["PREFECT_HOME"])
    if (home / "prefect.db").is_file():
        return
    with file_lock(home / ".create-database.lock"):
        if not (home / "prefect.db").is_file():
            subprocess.run(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                check=True, capture_output=True, text=True,
            )  # fmt: skip


def dry_preflight(cfg: RunConfig) -> DataReport:
    """:func:`preflight` into a scratch folder that is removed after: ``--dry-run`` writes nothing."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        return preflight(cfg, Path(scratch) / "data")[1]


def start(cfg: RunConfig, name: str) -> tuple[Path, PreparedData]:
    """A new run folder ``runs/<name>-<time>`` with the data prepared in it, the Prefect database
    created and the credentials block read; a failure on the way leaves no folder behind."""
    import shutil

    from tasks.workspace import run_folder, workspace_root

    run_dir = run_folder(workspace_root(), name)
    try:
        prepared, _ = preflight(cfg, run_dir / "data")
        create_prefect_database()
        if cfg.storage.credentials_block:
            from tasks.blocks import read_credentials

            # A missing block or an unreachable Prefect API stops the run before its flow run starts.
            read_credentials(cfg.storage.credentials_block)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing tracked yet: a failed start leaves no run folder
        raise
    return run_dir, prepared


def _run(args: argparse.Namespace) -> int:
    import yaml

    from sdpo_core.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.continue_chain and not args.dry_run:  # the flow finds the chain and its new data itself
        check_tracking_server(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        create_prefect_database()
        return continual_cli.run_continue(cfg)
    if args.dry_run:
        report = dry_preflight(cfg)  # bad input stops here, before anything is printed
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(data_inspect.format_report(report, cfg))
        return 0
    _, prepared = start(cfg, cfg.run_name)
    from flows.pipeline import sdpo_pipeline
    from sdpo_core.redact import redact

    result = sdpo_pipeline(config=cfg, prepared=prepared)
    root = configure_environment()
    print()
    print(f"sDPO run {cfg.run_name!r}: {len(result.rows)} step(s), files in {result.run_dir}")
    print()
    print(result.table)
    print()
    print(f"Registered model {result.model_name!r}: aliases step-0 .. step-{len(result.rows)} and final.")
    if result.tracking_uri.startswith("sqlite:"):
        print(f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri}")
    else:
        print(f"MLflow:     {redact(result.tracking_uri)} (parent run {result.parent_run_id})")
    api = os.environ.get("PREFECT_API_URL")
    if api:  # the run reported to a Prefect server: its UI is where the API is
        print(f"Prefect UI: {redact(api.rstrip('/').removesuffix('/api'))}")
    else:
        print(f"Prefect UI: PREFECT_HOME={root / 'prefect'} .venv/bin/prefect server start")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from flows.experiment import base_config
    from sdpo_core.experiment_config import load_experiment

    exp = load_experiment(args.config, args.overrides)
    cfg = base_config(exp)
    if args.dry_run:
        report = dry_preflight(cfg)
        for arm in exp.arms:
            print(f"arm {arm.name}: seeds {list(exp.seeds)}, settings {dict(arm.set) or 'the pipeline recipe'}")
        if exp.expo is not None:
            print(f"arm expo: {exp.expo.from_arm}'s final models extrapolated, alpha in {list(exp.expo.alphas)}")
        print(data_inspect.format_report(report, cfg))
        return 0
    run_dir, prepared = start(cfg, exp.name)
    from flows.experiment import sdpo_experiment

    result = sdpo_experiment(config=exp, prepared=prepared, run_dir=str(run_dir))
    print()
    print(result.markdown)
    print("Files:", *result.files, sep="\n  ")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_environment()
    from sdpo_core.checkpoint import CheckpointBusy
    from sdpo_core.config import ConfigError
    from sdpo_core.continual import ChainBusy, ChainError
    from sdpo_core.data import DataError
    from sdpo_core.files import DiskFullError
    from sdpo_core.model_io import ModelError
    from sdpo_core.redact import redact
    from sdpo_core.train import TrainingError
    from tasks.blocks import CredentialsError
    from tasks.s3 import UploadError

    try:
        if args.command == "run":
            return _run(args)
        if args.command in continual_cli.COMMANDS:
            return continual_cli.run_command(args)
        if args.command == "experiment":
            return _experiment(args)
        if args.command == "compare":
            return compare_cli.run_compare(args)  # an unknown run: UnknownRun, a FileNotFoundError (exit 2)
        return data_inspect.run_inspect(args)
    except (ConfigError, DataError, ModelError, FileNotFoundError, TrackingUnreachable, CredentialsError) as exc:
        print(f"sdpo: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ChainError as exc:  # continual sDPO: a foreign or broken chain, another base model
        print(f"sdpo: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ChainBusy as exc:
        print(f"sdpo: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except TrainingError as exc:
        print(f"sdpo: training failed: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except CheckpointBusy as exc:
        print(f"sdpo: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except DiskFullError as exc:
        print(f"sdpo: error: {redact(str(exc))}", file=sys.stderr)
        print(f"sdpo: {RESUME_HINT}", file=sys.stderr)
        return EXIT_FAILED
    except UploadError as exc:
        print(f"sdpo: storage failed: {redact(str(exc))}", file=sys.stderr)
        print(f"sdpo: {RESUME_HINT}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
