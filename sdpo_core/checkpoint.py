"""Mid-step checkpoints: everything a train step needs to continue after a crash.

A checkpoint is a folder ``step-<n>/`` under the step's checkpoint folder holding the policy's
weights, AdamW's moments, the scheduler's position, the random states and the metrics so far,
after ``n`` optimizer steps. The data position is ``n`` itself: the batch plan is a function of
the seed, so the next optimizer step's pairs are known. Tensors are written as safetensors and
everything else as JSON: loading a checkpoint runs no pickle.

Writing is atomic. The files go to a temporary folder, ``state.json`` (with every other file's
size and sha256) is written last, the folder is renamed into place, and only then does the
``latest`` pointer move to it (written to a temporary name and renamed). A crash at any moment
leaves the previous checkpoint as ``latest``; a checkpoint whose files do not match its
``state.json`` is ignored with a warning rather than loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdpo_core.files import DiskFullError, atomic_path, disk_full_error, is_disk_full
from sdpo_core.hashing import sha256_file
from sdpo_core.locks import file_lock
from sdpo_core.state import full_state, load_full_state

LATEST = "latest"
STATE = "state.json"
SCALER = "scaler.json"
LOCK = ".lock"
FORMAT = 2  # 2: weights and optimizer state keyed by parameter name (1: by position)


class CheckpointBusy(RuntimeError):
    """Another process holds the step's checkpoints."""


@dataclass(frozen=True)
class Resumed:
    """Where a restored checkpoint leaves training."""

    step: int
    """Optimizer steps already done."""
    history: list[dict[str, float]]
    """Their metrics, one dict per optimizer step."""
    path: Path


def _write_json(path: Path, data: Any) -> None:
    """Write a file of a checkpoint's temporary folder (no reader sees it before the folder's rename)."""
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(path: Path, text: str) -> None:
    """:func:`atomic_path`, with the new file and the rename flushed to disk."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        _fsync(tmp)
    _fsync(path.parent)  # the rename itself survives a power loss


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict keyed by parameter name as (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for full_key, value in tensors.items():
        name, key = full_key.rsplit(".", 1)  # parameter names have dots, AdamW's keys do not
        state.setdefault(name, {})[key] = value
    for name, values in rest["scalars"].items():
        state.setdefault(name, {}).update(values)
    groups = [g | {"betas": tuple(g["betas"])} if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_states() -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, [version, list(internal), gauss]


def _set_rng_states(tensors: dict[str, torch.Tensor], python_state: list[Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


class Checkpoints:
    """The checkpoints of one train step, in ``root``.

    Args:
        root: the step's checkpoint folder (one per config, chunk and reference).
        every: save after every this many optimizer steps, and after the last; 0 saves only
            after the last.
        on_saved: called with each checkpoint folder once it is in place (to copy it elsewhere,
            for instance to object storage).
        lease: a lock beyond this machine, held inside :meth:`exclusive` after the local one
            (tasks.lease: a lease in the S3 store the checkpoints are copied to).
    """

    def __init__(
        self,
        root: str | Path,
        every: int,
        on_saved: Callable[[Path], None] | None = None,
        lease: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.every = every
        self.on_saved = on_saved
        self.lease = lease
        self._verified: tuple[Path, tuple] | None = None
        """The last checkpoint that passed verify(), with its files' sizes and times then."""

    def due(self, step: int, total: int) -> bool:
        """Whether to save after optimizer step ``step`` of ``total``."""
        return step == total or (self.every > 0 and step % self.every == 0)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, verified; None if there is none (or it is damaged)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        # Hashing a large checkpoint takes a while: one whose files have not changed since it
        # was verified (checked before training, then loaded) is not hashed again.
        files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*")))
        if self._verified == (path, files):
            return path
        problem = self.verify(path)
        if problem:
            warnings.warn(f"ignoring checkpoint {path}: {problem}", stacklevel=2)
            return None
        self._verified = (path, files)
        return path

    @staticmethod
    def verify(path: Path) -> str | None:
        """None if every file of the checkpoint matches its state.json, else what is wrong."""
        state_path = path / STATE
        if not state_path.is_file():
            return "no state.json"
        try:
            state = json.loads(state_path.read_text())
        except ValueError as exc:
            return f"state.json is not JSON ({exc})"
        if state.get("format") != FORMAT:
            return f"format {state.get('format')!r}, expected {FORMAT}"
        for name, expected in state["files"].items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != expected["size"] or sha256_file(f) != expected["sha256"]:
                return f"{name} does not match its recorded size and sha256"
        return None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        history: list[dict[str, float]],
        write: bool = True,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Path | None:
        """Write the checkpoint after ``step`` optimizer steps; the older one is removed.

        The state is gathered whole first, which is collective for an FSDP-sharded model: then
        every process calls this and only the one with ``write`` writes (None elsewhere).
        ``scaler``: fp16's loss scaler, whose scale and growth count are saved too.
        """
        weights, optim = full_state(model, optimizer)
        if not write:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".{final.name}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            save_file(weights, str(tmp / "model.safetensors"))
            opt_tensors, opt_rest = _optimizer_tensors(optim)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            _write_json(tmp / "optimizer.json", opt_rest)
            sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            _write_json(tmp / "scheduler.json", sched)
            if scaler is not None:  # plain numbers: the scale, its growth and backoff settings
                _write_json(tmp / SCALER, scaler.state_dict())
            rng_tensors, python_rng = _rng_states()
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            _write_json(tmp / "rng.json", {"python": python_rng})
            files = {}
            for f in sorted(tmp.iterdir()):
                _fsync(f)
                files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
            _write_json(tmp / STATE, {"format": FORMAT, "step": step, "history": history, "files": files})
            _fsync(tmp / STATE)
            if final.exists():  # the same step saved before (a resumed run that re-saves it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.root)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc) and not isinstance(exc, DiskFullError):
                # Not retried (tasks.retries): the previous checkpoint is still `latest`.
                raise disk_full_error(final, exc) from exc
            raise
        previous = self.latest_name()
        _replace_durably(self.root / LATEST, final.name + "\n")
        if previous and previous != final.name:
            shutil.rmtree(self.root / previous, ignore_errors=True)
        if self.on_saved is not None:
            self.on_saved(final)
        return final

    def latest_name(self) -> str | None:
        pointer = self.root / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Resumed | None:
        """Load the latest checkpoint into the model, optimizer, scheduler (and fp16's loss
        ``scaler``: a fresh scale of 65536 would overflow again the steps that lowered it); None
        if none."""
        path = self.latest()
        if path is None:
            return None
        rest = json.loads((path / "optimizer.json").read_text())
        optim = _optimizer_state(load_file(str(path / "optimizer.safetensors")), rest)
        try:
            load_full_state(model, optimizer, load_file(str(path / "model.safetensors")), optim)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise RuntimeError(f"{path}: the checkpoint does not fit this model and optimizer: {exc}") from exc
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()) | {"lr_lambdas": [None]})
        if scaler is not None and (path / SCALER).is_file():
            scaler.load_state_dict(json.loads((path / SCALER).read_text()))
        elif scaler is not None:  # written before the scaler was saved: its scale starts afresh
            warnings.warn(
                f"{path}: no loss-scaler state; fp16 loss scaling restarts at its initial scale", stacklevel=2
            )
        _set_rng_states(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text())["python"])
        state = json.loads((path / STATE).read_text())
        return Resumed(state["step"], state["history"], path)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this step's lock while training it: a second process training the same step
        (the same run started twice) fails at once instead of writing the same checkpoints.

        The lock is a ``flock``, which holds among the processes of one machine; the ``lease``
        given to the constructor, if any, is held inside it for processes on other machines."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(self.root / LOCK, wait=False))
            except BlockingIOError:
                raise CheckpointBusy(
                    f"{self.root}: another process is training this step (same run name, config, chunk and "
                    "reference); wait for it, or give this run another run_name"
                ) from None
            if self.lease is not None:
                held.enter_context(self.lease())  # raises its own CheckpointBusy when held elsewhere
            yield

    def clear(self) -> None:
        """Remove every checkpoint of this step (once its model is registered)."""
        shutil.rmtree(self.root, ignore_errors=True)
