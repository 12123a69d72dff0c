"""Continual sDPO, the pure part: the chain of registered steps, which watched batches are new,
what of a new batch is left to train, and the guards.

A *chain* is what the registered model's ``final`` alias reaches by following each version's
``sdpo.reference_version`` tag back to M0 (step 0). A continue run (flows/continual.py) trains
every watched batch file that the chain has not trained yet as the next step, T+1, T+2, ...: one
step per file, in file-name order. (Pooling the new files and partitioning them by the recipe's
strategy was the other choice; one step per file keeps "each new batch is the next chunk", and a
file is then the unit that lineage, rollback and the tags name.)

What the chain has trained is known by content, never by file times: each step's run holds the
content keys of the pairs it trained on (``chain/trained_pairs.json``), and each step trained by a
continue run records its batch file's name and sha256 in its tags. A file whose sha256 the chain
has is skipped without being read; any other file is read, and its pairs that the chain already
trained, or that are in the chain's held-out split, are dropped and counted.

No Prefect, MLflow or boto3 here: values in, values out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sdpo_core.dataset import drop_leaked
from sdpo_core.pairs import PreferencePair

# Tags a continue run adds to each version it registers (besides register_step's usual lineage).
BATCH_FILE = "sdpo.batch.file"
BATCH_SHA256 = "sdpo.batch.sha256"
BATCH_PAIRS = "sdpo.batch.pairs"
"""The pairs the step trained on (after the drops below)."""
BATCH_OVERLAP = "sdpo.batch.overlap_dropped"
"""Pairs of the file the chain had already trained on, dropped."""
BATCH_IN_EVAL = "sdpo.batch.eval_dropped"
"""Pairs of the file whose content or prompt is in the held-out split, dropped."""
EVAL_HASH = "sdpo.eval_hash"
"""Content hash of the held-out pairs file every step of the chain was measured on."""
ABANDONED = "sdpo.abandoned"
"""``true`` on the versions a rollback took out of the chain (they stay in the registry)."""
ABANDONED_FOR = "sdpo.abandoned_for"
"""The version ``final`` was rolled back to."""

TRAINED_PAIRS = "trained_pairs.json"
"""A step run's record of the content keys of the pairs it trained on, under ``chain/``."""
CHAIN_FOLDER = "chain"
"""The artifact folder of the chain records in a run (``trained_pairs.json``, ``eval.jsonl``)."""


class ChainError(ValueError):
    """A chain that cannot be continued or rolled back as asked (foreign, broken, another base)."""


class ChainBusy(RuntimeError):
    """Another continue run or rollback holds the chain."""


@dataclass(frozen=True)
class ChainLink:
    """One version of the chain: its step, its registry version and its tags."""

    step: int
    version: str
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    """The MLflow run that registered the version (its step run)."""

    @property
    def reference_version(self) -> str:
        return self.tags.get("sdpo.reference_version", "")


def walk_chain(
    model_name: str, final_version: str, lookup: Callable[[str], tuple[dict[str, str], str] | None]
) -> list[ChainLink]:
    """The chain that ends at ``final_version``, step 0 first.

    ``lookup(version)`` gives a version's tags and run id (None when the registry has no such
    version).

    Raises:
        ChainError: a version that this pipeline did not register (no ``sdpo.step`` tag), a link
            whose reference is missing or is not the step before it, or an M0 without the
            fingerprints the base guard compares.
    """
    links: list[ChainLink] = []
    version: str | None = final_version
    seen: set[str] = set()
    while version is not None:
        if version in seen:
            raise ChainError(f"registered model {model_name!r}: version {version} is its own ancestor")
        seen.add(version)
        found = lookup(version)
        if found is None:
            raise ChainError(f"registered model {model_name!r}: version {version} of the chain is not in the registry")
        tags, run_id = found
        step = tags.get("sdpo.step", "")
        if not step.isdigit():
            what = "its final version" if not links else f"version {version}, reference of version {links[-1].version},"
            raise ChainError(
                f"registered model {model_name!r}: {what} was not registered by the sDPO pipeline (no sdpo.step "
                "tag); a continue run only extends a chain this pipeline registered"
            )
        if links and int(step) != links[-1].step - 1:
            raise ChainError(
                f"registered model {model_name!r}: version {links[-1].version} (step {links[-1].step}) names "
                f"version {version} as its reference, which is step {step}, not step {links[-1].step - 1}"
            )
        links.append(ChainLink(int(step), version, dict(tags), run_id))
        if int(step) == 0:
            version = None
        else:
            version = tags.get("sdpo.reference_version") or None
            if version is None:
                raise ChainError(f"registered model {model_name!r}: version {links[-1].version} has no reference tag")
    m0 = links[-1]
    missing = [k for k in ("sdpo.weights_sha256", "sdpo.tokenizer_sha256") if not m0.tags.get(k)]
    if missing:
        raise ChainError(f"registered model {model_name!r}: M0 (version {m0.version}) lacks the tag(s) {missing}")
    return links[::-1]


def check_same_base(model_name: str, m0: ChainLink, weights_sha256: str, tokenizer_sha256: str, source: str) -> None:
    """Refuse a config whose model (weights, or tokenizer and chat template) is not the chain's M0.

    Raises:
        ChainError: naming what differs, the chain's M0 version and the configured model.
    """
    problems = []
    if m0.tags.get("sdpo.weights_sha256") != weights_sha256:
        problems.append("its weights differ")
    if m0.tags.get("sdpo.tokenizer_sha256") != tokenizer_sha256:
        problems.append("its tokenizer or chat template differs")
    if problems:
        raise ChainError(
            f"model.name_or_path {source!r} is not the base of the chain of registered model {model_name!r} "
            f"(M0 is version {m0.version}, from {m0.tags.get('sdpo.source_model', '?')!r}): {' and '.join(problems)}; "
            "a chain continues only from its own M0 (use another tracking.registered_model for a new chain)"
        )


@dataclass(frozen=True)
class BatchFile:
    """A watched data file: its name (relative to the watched folder or prefix), where it was
    read from, its local copy and the sha256 of its bytes."""

    name: str
    origin: str
    path: str
    sha256: str


def unseen_batches(files: Sequence[BatchFile], chain: Sequence[ChainLink]) -> list[BatchFile]:
    """The files whose bytes no step of the chain trained on (by sha256), in name order."""
    known = {link.tags.get(BATCH_SHA256) for link in chain}
    return sorted((f for f in files if f.sha256 not in known), key=lambda f: f.name)


@dataclass(frozen=True)
class NewPairs:
    """What is left of a batch to train, and what was dropped."""

    pairs: list[PreferencePair]
    overlap: int
    """Pairs the chain (or an earlier file of this run) already trained on."""
    in_eval: int
    """Pairs whose content or prompt is in the held-out split."""


def new_pairs(pairs: Sequence[PreferencePair], trained: set[str], evals: Sequence[PreferencePair]) -> NewPairs:
    """The pairs of a batch that are neither in the held-out split nor already trained.

    ``trained`` holds content keys (:attr:`PreferencePair.content_key`, whatever the source
    name); the held-out split is matched as prepare_data matches it (content or prompt).
    """
    kept, leaked = drop_leaked(pairs, evals)
    fresh = [p for p in kept if p.content_key not in trained]
    return NewPairs(fresh, len(kept) - len(fresh), sum(leaked.values()))


def trained_keys(pairs: Sequence[PreferencePair]) -> list[str]:
    """The content keys of pairs, sorted and unique: what a step run records."""
    return sorted({p.content_key for p in pairs})


def rollback_plan(model_name: str, chain: Sequence[ChainLink], to_step: int) -> tuple[ChainLink, list[ChainLink]]:
    """(the link ``final`` moves back to, the links after it that leave the chain).

    Raises:
        ChainError: ``to_step`` is not a step of the chain, is 0, or is its last one already.
    """
    last = chain[-1].step
    if to_step == 0:
        # The held-out split of a chain lives with its first step's run: a chain cut back to M0
        # would lose it. Starting over is a new chain (another tracking.registered_model).
        raise ChainError(
            f"registered model {model_name!r}: rollback keeps at least step-1; to start over from M0, "
            "begin a new chain under another tracking.registered_model"
        )
    if not 0 <= to_step <= last:
        raise ChainError(
            f"registered model {model_name!r}: no step-{to_step} in the chain of its final version "
            f"{chain[-1].version} (steps 0..{last})"
        )
    if to_step == last:
        raise ChainError(f"registered model {model_name!r}: final (version {chain[-1].version}) is step-{last} already")
    return chain[to_step], list(chain[to_step + 1 :])


def parse_step(text: str) -> int:
    """``step-3`` or ``3`` -> 3; ValueError otherwise."""
    rest = text.strip().removeprefix("step-")
    if not rest.isdigit():
        raise ValueError(f"{text!r} is not a step: give step-N or N")
    return int(rest)
