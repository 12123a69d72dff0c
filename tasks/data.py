"""Tasks that prepare and partition the preference data."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import get_run_logger, task

from sdpo_core import data as data_mod
from sdpo_core.config import RunConfig
from sdpo_core.evaluate import gamma
from sdpo_core.files import atomic_write_text
from sdpo_core.logprobs import TokenizedPair
from sdpo_core.model_io import load_tokenizer
from sdpo_core.partition import PARTITION_FILE, needs_m0_scores, partition_pairs, partition_record, source_accuracy
from sdpo_core.records import ChunkInfo, PreparedData
from sdpo_core.scores import load_scores, save_scores
from sdpo_core.tokenization import load_tokens, save_tokens, tokens_path
from tasks.context import RunContext
from tasks.retries import IO_TASK


def prepare(cfg: RunConfig, out_dir: str | Path) -> tuple[PreparedData, data_mod.DataReport]:
    """Read and validate every source once, hold out the eval split; write train.jsonl,
    eval.jsonl and data_report.json (what was read, kept and dropped, by source and reason).

    The CLI calls this before Prefect starts (bad input fails in seconds, before anything is
    tracked) and hands the result to the flow, which then does not read the data again.
    """
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(cfg.model)
    tokens: dict[str, TokenizedPair] = {}
    train, evals, report = data_mod.build_dataset(cfg, tokenizer, tokens)
    train_hash = data_mod.write_pairs(train, out_dir / "train.jsonl")
    eval_hash = data_mod.write_pairs(evals, out_dir / "eval.jsonl")
    # The ids build_dataset tokenized, beside each file, so no later stage tokenizes again.
    save_tokens(out_dir / "train.jsonl", [tokens[p.id] for p in train], tokenizer, cfg.data)
    save_tokens(out_dir / "eval.jsonl", [tokens[p.id] for p in evals], tokenizer, cfg.data)
    report_path = atomic_write_text(
        out_dir / "data_report.json", json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    )
    counts = {r.name: {k: v for k, v in r.to_json().items() if k != "sample"} for r in report.sources}
    prepared = PreparedData(
        train_path=str(out_dir / "train.jsonl"),
        eval_path=str(out_dir / "eval.jsonl"),
        train_hash=train_hash,
        eval_hash=eval_hash,
        counts=counts,
        report_path=str(report_path),
        config_hash=cfg.data_hash(),
    )
    return prepared, report


@task(name="prepare-data", task_run_name="prepare-data", **IO_TASK)
def prepare_data(cfg: RunConfig, run_dir: str) -> PreparedData:
    """Load, normalise and validate every source; hold out the eval split."""
    return prepare(cfg, Path(run_dir) / "data")[0]


@task(name="partition", task_run_name="partition", **IO_TASK)
def partition(cfg: RunConfig, ctx: RunContext, prepared: PreparedData, m0_uri: str) -> list[ChunkInfo]:
    """Split the training pairs into the steps' chunks; write each as JSON lines and partition.json.

    For by_source and easy_to_hard, M0 scores the whole training set once (cached); its scores
    of each chunk are cached too, under the key the reference scoring of step 1 looks up, so they
    are not computed again. partition.json records the strategy, M0's accuracy per source and each
    chunk's pair ids, in order; it is logged to the parent run.
    """
    from tasks import artifacts, tracking
    from tasks.scores import cached_scores, scores_path
    from tasks.storage import fetch, publish, require

    require(ctx, prepared.train_path)
    fetch(ctx, tokens_path(prepared.train_path), optional=True)  # without it the chunks are tokenized later
    m0_dir, _ = tracking.fetch_for(ctx, m0_uri)
    out_dir = Path(ctx.run_dir) / "chunks"
    train = data_mod.read_pairs(Path(prepared.train_path))
    p = cfg.partition
    accuracy = m0_scores = gammas = None
    written: list[Path] = []
    if needs_m0_scores(p.strategy):
        path, computed = cached_scores(cfg, ctx, m0_dir, prepared.train_path)
        written += [path] if computed else []
        m0_scores = load_scores(path)
        assert len(m0_scores["chosen"]) == len(train), "scores follow the training file row for row"
        accuracy = source_accuracy(train, m0_scores, p.accuracy)
        gammas = gamma(m0_scores, p.accuracy).tolist()
    split = partition_pairs(train, p, accuracy, gammas, min_pairs=cfg.data.min_pairs_per_step)
    position = {pair.id: i for i, pair in enumerate(train)}
    tokenizer = load_tokenizer(cfg.model, m0_dir)
    train_tokens = load_tokens(prepared.train_path, tokenizer, cfg.data)
    infos = []
    for chunk in split.chunks:
        path = out_dir / f"step-{chunk.step}.jsonl"
        digest = data_mod.write_pairs(chunk.pairs, path)
        rows = [position[pair.id] for pair in chunk.pairs]  # the chunk's rows in the training file
        if train_tokens is not None:
            written.append(save_tokens(path, [train_tokens[i] for i in rows], tokenizer, cfg.data))
        if m0_scores is not None:
            cached = scores_path(cfg, ctx, m0_dir, path)  # where step 1's reference scoring looks
            if not cached.is_file():
                idx = torch.tensor(rows)
                written.append(save_scores({k: v[idx] for k, v in m0_scores.items()}, cached))
        infos.append(
            ChunkInfo(
                step=chunk.step,
                label=chunk.label,
                path=str(path),
                size=len(chunk.pairs),
                content_hash=digest,
                m0_accuracy=chunk.m0_accuracy,
            )
        )
    record = partition_record(cfg, infos, split, accuracy, len(train))
    record_path = atomic_write_text(out_dir / PARTITION_FILE, json.dumps(record, indent=2) + "\n")
    publish(ctx, *[c.path for c in infos], record_path, *written)
    artifacts.log_artifact(tracking.client(ctx.tracking_uri), ctx.parent_run_id, record_path, ctx.s3)
    logger = get_run_logger()
    logger.info("partition %s: %s", p.strategy, ", ".join(f"step {c.step} {c.label} ({c.size} pairs)" for c in infos))
    if record["unused_pairs"]:
        logger.warning(
            "%d of %d training pairs are in no chunk (partition.sizes) and are not trained on",
            record["unused_pairs"],
            record["train_pairs"],
        )
    return infos
