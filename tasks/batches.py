"""The watched batches of a continual chain (data.watch): list them, and turn the new ones into
the next steps' chunks.

A watched place is a local folder or an ``s3://bucket/prefix``. Every data file in it (the
suffixes sdpo_core.sources reads, hidden files and folders left out) is one batch, named by its
path relative to the folder or prefix. Files on S3 are downloaded into the run folder first,
since a file's identity is the sha256 of its bytes (S3 ETags are not content hashes for
multipart uploads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from sdpo_core.config import RunConfig, SourceConfig
from sdpo_core.continual import BatchFile, new_pairs
from sdpo_core.data import DataError, read_pairs, write_pairs
from sdpo_core.dataset import load_source
from sdpo_core.files import atomic_write_text
from sdpo_core.hashing import sha256_file
from sdpo_core.pairs import PROMPT_TOO_LONG, PreferencePair
from sdpo_core.records import ChunkInfo
from sdpo_core.sources import SUFFIXES
from tasks.blocks import S3Access
from tasks.retries import IO_TASK


def _is_data(relative: str) -> bool:
    parts = relative.split("/")
    return relative.lower().endswith(SUFFIXES) and not any(p.startswith((".", "__")) for p in parts)


@task(name="list-batches", task_run_name="list-batches", **IO_TASK)
def list_batches(watch: str, dest: str, access: S3Access | None = None) -> list[BatchFile]:
    """Every batch file under ``watch`` (a folder or an S3 prefix), in name order, with its
    sha256; S3 objects are downloaded under ``dest``.

    Raises:
        DataError: a folder that does not exist, or a path that is not a folder.
    """
    if watch.startswith("s3://"):
        from tasks.s3 import client, download_file, split_uri

        s3 = client(access)
        bucket, prefix = split_uri(watch)
        base = f"{prefix}/" if prefix else ""
        found = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(base) :]
                if relative and _is_data(relative):
                    local = Path(dest) / relative
                    if not download_file(f"s3://{bucket}/{obj['Key']}", local, s3):
                        continue  # deleted since the listing
                    found.append(BatchFile(relative, f"s3://{bucket}/{obj['Key']}", str(local), sha256_file(local)))
        return sorted(found, key=lambda f: f.name)
    folder = Path(watch).expanduser()
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DataError(
            f"data.watch {watch!r} {what}: give the folder (or s3://bucket/prefix) that receives the batches"
        )
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and _is_data(relative):
            files.append(BatchFile(relative, str(path), str(path), sha256_file(path)))
    return files


@dataclass(frozen=True)
class BatchStep:
    """A new batch as the chunk of one step, with what was dropped from it."""

    chunk: ChunkInfo
    batch: BatchFile
    read: int
    """Usable pairs in the file (after load_source's own drops: duplicates, empty completions, ...)."""
    overlap: int
    in_eval: int
    too_long: int


@task(name="read-batches", task_run_name="read-batches", **IO_TASK)
def read_batches(
    cfg: RunConfig, batches: list[BatchFile], eval_path: str, trained: set[str], first_step: int, run_dir: str
) -> list[BatchStep]:
    """Each new batch as the next step's chunk: its pairs read and validated as any source is,
    less those in the held-out split and those already trained (counted), tokenized as
    prepare_data tokenizes (prompt policy and lengths; the ids kept beside the chunk file).

    A file left with fewer than data.min_pairs_per_step pairs is no step (a warning says why);
    it is read again by the next run. Also writes ``data/train.jsonl`` (every new pair of the
    run, in step order) and ``data/data_report.json`` (per file: read, trained, dropped).

    Raises:
        DataError: a file that cannot be read, naming it and the row.
    """
    from sdpo_core.model_io import load_tokenizer
    from sdpo_core.tokenization import TemplateFailed, encode_pair, save_tokens, truncate_pair

    logger = get_run_logger()
    d = cfg.data
    tokenizer = load_tokenizer(cfg.model)
    evals = read_pairs(Path(eval_path))
    known = set(trained)
    steps: list[BatchStep] = []
    report = []
    pooled: list[PreferencePair] = []
    for batch in batches:
        name = Path(batch.name).name.split(".")[0] or "batch"
        source = SourceConfig(path=batch.path, name=name)
        places: dict[str, str] = {}
        pairs, src_report = load_source(source, d.skip_bad_rows, d.seed, places)
        fresh = new_pairs(pairs, known, evals)
        kept, tokens, too_long = [], [], 0
        for p in fresh.pairs:
            try:
                full = encode_pair(p, tokenizer)
            except TemplateFailed as exc:
                raise DataError(f"{places.get(p.id, batch.origin)}: {exc}") from None
            if len(full.prompt_ids) > d.max_prompt_length and d.long_prompts == "drop":
                too_long += 1
                continue
            kept.append(p)
            tokens.append(truncate_pair(full, d, tokenizer.bos_token_id))
        entry = {
            "file": batch.name,
            "origin": batch.origin,
            "sha256": batch.sha256,
            "rows": src_report.rows,
            "read": len(pairs),
            "dropped": src_report.dropped | {"already trained": fresh.overlap, "in eval split": fresh.in_eval}
            | ({PROMPT_TOO_LONG: too_long} if too_long else {}),
            "trained": 0,
        }  # fmt: skip
        if not kept:
            logger.info(
                "batch %s: nothing new (%d pair(s): %d already trained, %d in the held-out split)",
                batch.name, len(pairs), fresh.overlap, fresh.in_eval,
            )  # fmt: skip
            report.append(entry)
            continue
        if len(kept) < d.min_pairs_per_step:
            logger.warning(
                "batch %s: %d new pair(s) of %d (%d already trained, %d in the held-out split): fewer than "
                "data.min_pairs_per_step, not trained",
                batch.name, len(kept), len(pairs), fresh.overlap, fresh.in_eval,
            )  # fmt: skip
            report.append(entry)
            continue
        step = first_step + len(steps)
        path = Path(run_dir) / "chunks" / f"step-{step}.jsonl"
        digest = write_pairs(kept, path)
        save_tokens(path, tokens, tokenizer, d)
        known.update(p.content_key for p in kept)  # a later file of this run repeating them drops them
        pooled.extend(kept)
        chunk = ChunkInfo(step=step, label=batch.name, path=str(path), size=len(kept), content_hash=digest)
        steps.append(BatchStep(chunk, batch, len(pairs), fresh.overlap, fresh.in_eval, too_long))
        report.append(entry | {"trained": len(kept), "step": step})
        logger.info(
            "batch %s -> step %d: %d pair(s) (%d already trained and %d in the held-out split dropped)",
            batch.name, step, len(kept), fresh.overlap, fresh.in_eval,
        )  # fmt: skip
    data_dir = Path(run_dir) / "data"
    write_pairs(pooled, data_dir / "train.jsonl")
    atomic_write_text(data_dir / "data_report.json", json.dumps({"batches": report}, indent=2) + "\n")
    return steps
