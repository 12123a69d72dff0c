"""The records stages hand each other: prepared data, a chunk, a train step's inputs and result.

They are frozen pydantic models, so the same record is a Python value in-process, a JSON file for
torchrun's processes, and a typed parameter (a form in the Prefect UI) of a deployment run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdpo_core.config import RunConfig


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PreparedData(Record):
    """The normalised train and held-out eval pairs, written as JSON lines."""

    train_path: str
    eval_path: str
    train_hash: str
    eval_hash: str
    counts: dict[str, dict[str, Any]] = Field(
        description="Per source: rows read, pairs kept, dropped by reason, train and eval pairs, lengths."
    )
    report_path: str = Field("", description="data_report.json: what `sdpo data inspect` prints.")
    config_hash: str = Field(
        "", description="RunConfig.data_hash of the config the data was prepared for (its model and data settings)."
    )


class ChunkInfo(Record):
    """One step's data chunk on disk."""

    step: int
    label: str
    path: str
    size: int
    content_hash: str
    m0_accuracy: float | None = None


class TrainStepSpec(Record):
    """Everything one sDPO train step needs, wherever it runs: in-process, under torchrun, or as
    a run of the train-step deployment on a GPU worker.

    The pipeline fills the registry-level fields; the place that trains fetches the reference and
    fills ``ref_dir``, ``out_dir`` and ``checkpoint_dir`` with its own local paths.
    """

    config: RunConfig = Field(description="The pipeline's resolved config.")
    chunk: ChunkInfo = Field(description="The step's chunk D_t.")
    ref_uri: str = Field(description="M(t-1) in the registry, models:/<name>/<version>: reference and start.")
    ref_scores: str = Field(description="Path of the reference log-probs of the chunk (safetensors).")
    init_uri: str = Field(
        "", description="The model the policy starts from when it is not the reference (train.init: base): M0."
    )
    ref_dir: str = Field("", description="Local folder of M(t-1), filled where the step trains.")
    init_dir: str = Field("", description="Local folder of init_uri's model, filled where the step trains.")
    out_dir: str = Field("", description="Where the step model is saved, filled where the step trains.")
    checkpoint_dir: str | None = Field(None, description="The step's checkpoints; None saves none.")
    meta: dict[str, Any] = Field(default_factory=dict, description="Written into the step model's meta.json.")
    schedule_offset: int = Field(
        0, description="train.carry_optimizer: optimizer steps of the chain before this step (its schedule's start)."
    )
    schedule_total: int = Field(
        0, description="train.carry_optimizer: optimizer steps of the whole chain; 0: this step's own schedule."
    )

    @property
    def step(self) -> int:
        return self.chunk.step


class TrainStepResult(Record):
    """A trained step model on local disk, what training did, and its MLflow step run."""

    step: int
    model_dir: str
    optimizer_steps: int
    final_loss: float
    history: list[dict[str, float]] = Field(default_factory=list, description="Metrics of every optimizer step.")
    resumed_from: int = Field(0, description="Optimizer steps restored from a checkpoint (0: from the start).")
    run_id: str = Field("", description="The step's MLflow run, filled by the train task.")
    checkpoint_dir: str = Field("", description="The step's checkpoints, removed once its model is registered.")
