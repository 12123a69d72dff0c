"""A train-step deployment run keeps to its worker's workspace, whatever its parameters say.

Anyone who can call the Prefect API chooses a run's ``spec`` and ``context``. Here the flow's body
is called as a worker calls it, with the training and publishing replaced by stand-ins that do
what the real ones do to the paths they are given (the step model's folder replaced, the record
written), so that a path let through would show as a file written or deleted outside.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import flows.train_step
from sdpo_core.config import load_config
from sdpo_core.records import ChunkInfo, TrainStepResult, TrainStepSpec
from tasks.context import OutsideWorkspace, RunLocation

SQLITE = "sqlite:///"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A worker with its own workspace, a folder outside it holding a file that must survive, and
    stand-ins for the train and publish tasks that write where they are told."""
    ws = tmp_path / "worker-ws"
    (ws / "runs").mkdir(parents=True)
    monkeypatch.setenv("SDPO_HOME", str(ws))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models" / "step-1").mkdir(parents=True)
    (elsewhere / "models" / "step-1" / "keep.txt").write_text("precious")
    trained: list[str] = []

    def fake_train_step(ctx, spec):
        # What save_model does: the target folder is replaced by the new model.
        out = Path(ctx.run_dir) / "models" / "step-1"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"weights")
        Path(spec.chunk.path).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.chunk.path).write_text("fetched chunk")  # what require() does for a missing file
        trained.append(ctx.run_dir)
        return TrainStepResult(step=1, model_dir=str(out), optimizer_steps=1, final_loss=0.5, run_id="r")

    monkeypatch.setattr(flows.train_step, "train_step", fake_train_step)
    monkeypatch.setattr(flows.train_step, "publish_trained", lambda ctx, result: {"run_dir": ctx.run_dir})
    return {"ws": ws, "elsewhere": elsewhere, "tmp": tmp_path, "trained": trained}  # type: ignore[dict-item]


def call(
    pipeline_root: Path,
    run_dir: str,
    chunk_path: str = "",
    ref_scores: str = "",
    tracking_uri: str = "",
    storage_uri: str | None = None,
    **filled: str,
):
    """The flow's body with these parameters, as a worker runs a deployment run."""
    run = Path(run_dir)
    chunk = ChunkInfo(
        step=1, label="orca", path=chunk_path or str(run / "chunks" / "step-1.jsonl"), size=4, content_hash="c"
    )
    spec = TrainStepSpec(
        config=load_config(REPO / "recipes" / "default.yaml"),
        chunk=chunk,
        ref_uri="models:/m/1",
        ref_scores=ref_scores or str(pipeline_root / "cache" / "logps" / "ref.safetensors"),
        **filled,
    )
    context = RunLocation(str(pipeline_root), run_dir, tracking_uri, "0", "parent", "m", storage_uri)
    return flows.train_step.sdpo_train_step.fn(spec=spec, context=context)


def untouched(worker: dict) -> None:
    elsewhere = worker["elsewhere"]
    assert (elsewhere / "models" / "step-1" / "keep.txt").read_text() == "precious"
    assert sorted(p.relative_to(elsewhere).as_posix() for p in elsewhere.rglob("*")) == [
        "models",
        "models/step-1",
        "models/step-1/keep.txt",
    ]
    assert worker["trained"] == [], "training started"


def test_a_run_folder_outside_the_workspace_is_refused(worker) -> None:
    with pytest.raises(OutsideWorkspace, match=r"context\.run_dir .*elsewhere.*outside this worker's workspace"):
        call(worker["tmp"] / "pipeline-ws", str(worker["elsewhere"]))
    untouched(worker)


def test_dot_dot_and_symlinks_do_not_lead_out(worker) -> None:
    ws, tmp = worker["ws"], worker["tmp"]
    with pytest.raises(OutsideWorkspace, match="context.run_dir"):
        call(ws, str(ws / "runs" / ".." / ".." / "elsewhere"))
    with pytest.raises(OutsideWorkspace, match="context.run_dir"):
        call(ws, "../../elsewhere")
    (ws / "runs" / "link").symlink_to(worker["elsewhere"], target_is_directory=True)
    with pytest.raises(OutsideWorkspace, match=r"context\.run_dir .*runs/link"):
        call(ws, str(ws / "runs" / "link"))
    # A pipeline root of "/" moves every absolute path into the workspace, but not into runs/.
    with pytest.raises(OutsideWorkspace, match="context.run_dir"):
        call(Path("/"), str(worker["elsewhere"]))
    untouched(worker)
    assert not list(ws.rglob("*.safetensors")), "nothing was written in the workspace either"
    assert not (tmp / "etc").exists()


@pytest.mark.parametrize("field", ["chunk", "ref_scores", "tracking", "out_dir", "storage"])
def test_data_paths_and_a_local_tracking_store_outside_are_refused(worker, field: str) -> None:
    ws, outside = worker["ws"], worker["elsewhere"] / "victim"
    kwargs = {
        "chunk": {"chunk_path": str(outside)},
        "ref_scores": {"ref_scores": "../../elsewhere/victim"},
        "tracking": {"tracking_uri": f"{SQLITE}{outside}"},
        "out_dir": {"out_dir": str(outside)},
        "storage": {"storage_uri": str(outside)},
    }[field]
    name = {
        "chunk": "spec.chunk.path",
        "ref_scores": "spec.ref_scores",
        "tracking": "context.tracking_uri",
        "out_dir": "spec.out_dir",
        "storage": "context.storage_uri",
    }[field]
    with pytest.raises(OutsideWorkspace, match=name.replace(".", r"\.")):
        call(ws, str(ws / "runs" / "r"), **kwargs)
    assert not outside.exists()
    untouched(worker)


def test_paths_under_the_pipeline_workspace_move_into_the_workers(worker) -> None:
    """The pipeline's workspace is elsewhere (another machine): its run folder, chunk and scores
    are found at the same places in the worker's, and the run trains there."""
    ws, pipeline = worker["ws"], worker["tmp"] / "pipeline-ws"
    out = call(pipeline, str(pipeline / "runs" / "r"), tracking_uri=f"{SQLITE}{ws / 'mlflow.db'}")
    assert out == {"run_dir": str(ws / "runs" / "r")}
    assert (ws / "runs" / "r" / "models" / "step-1" / "model.safetensors").is_file()
    assert (ws / "runs" / "r" / "chunks" / "step-1.jsonl").is_file()
    assert not pipeline.exists()
    untouched_outside = worker["elsewhere"] / "models" / "step-1" / "keep.txt"
    assert untouched_outside.read_text() == "precious"


def test_without_sdpo_home_the_worker_uses_its_own_folder_not_the_callers(
    worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No SDPO_HOME: the workspace is .sdpo in the worker's working folder, never the root the
    caller names (which used to be taken as is)."""
    monkeypatch.delenv("SDPO_HOME")
    monkeypatch.chdir(worker["tmp"])
    with pytest.raises(OutsideWorkspace, match="context.run_dir"):
        call(worker["elsewhere"].parent, str(worker["elsewhere"]))
    untouched(worker)
    call(worker["tmp"] / "pipeline-ws", str(worker["tmp"] / "pipeline-ws" / "runs" / "r"))
    assert (worker["tmp"] / ".sdpo" / "runs" / "r" / "models" / "step-1" / "model.safetensors").is_file()
