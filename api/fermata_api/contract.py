"""The contract between the Fermata operator and the trainer pod.

This one module says what the trainer reads from its pod and what it writes back:

* **In** — :class:`TrainerConfig`, a JSON document the operator renders into a ConfigMap and
  mounts at :data:`CONFIG_PATH` (or that a user writes by hand to run the trainer on a single
  machine), plus a few environment variables (:class:`PodEnv`) that change per pod incarnation
  (which checkpoint to resume from, which pod this is).
* **Out** — :class:`TrainerStatus`, the part of ``TrainingRun.status`` the trainer owns
  (``status.progress``, ``status.lastCheckpoint`` and ``status.artifacts``). The trainer writes
  it with server-side apply on the ``status`` subresource under the field manager
  :data:`TRAINER_FIELD_MANAGER`;
  the operator never writes these fields, and the trainer never writes any other, so neither
  can overwrite the other.
* **Control** — :class:`TrainerControl`, written by the operator at ``status.control`` and read
  by the trainer from every apply response: a checkpoint request the trainer answers by writing
  a checkpoint and echoing the request id in ``status.progress.checkpointRequestAck``.
"""

from __future__ import annotations

import os
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import Field

from fermata_api.base import ApiModel
from fermata_api.meta import API_GROUP, API_VERSION, KIND, PLURAL, TRAINER_FIELD_MANAGER
from fermata_api.spec import DatasetSpec, EvaluationSpec, ModelSpec, StorageSpec, TrainingSpec

#: Where the operator mounts the rendered :class:`TrainerConfig`.
CONFIG_PATH = "/etc/fermata/trainer.json"

#: Exit code the trainer uses when it stopped on request after writing a checkpoint
#: (SIGTERM, or a stop asked through ``status.control``). Anything 128+ is a signal death.
EXIT_STOPPED_WITH_CHECKPOINT = 0
#: Exit code for a bad configuration or dataset (permanent: retrying will not help).
EXIT_CONFIG_ERROR = 2


class RunRef(ApiModel):
    """Which TrainingRun this trainer reports to (empty name: no Kubernetes reporting)."""

    name: str = ""
    namespace: str = "default"
    uid: str | None = None


class ReportingSpec(ApiModel):
    """How often the trainer reports to its TrainingRun."""

    heartbeat_seconds: float = Field(default=30.0, gt=0, le=3600)


class TrainerConfig(ApiModel):
    """Everything the trainer needs, rendered by the operator into ``trainer.json``."""

    run: RunRef = Field(default_factory=RunRef)
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    storage: StorageSpec
    reporting: ReportingSpec = Field(default_factory=ReportingSpec)
    gpus: int = Field(default=1, ge=0, le=16)
    work_dir: str = Field(default="/tmp/fermata", description="Scratch space inside the pod.")

    @classmethod
    def load(cls, path: str | Path) -> TrainerConfig:
        return cls.model_validate_json(Path(path).read_text())


class PodEnv(ApiModel):
    """Per-pod facts the operator passes as environment variables."""

    config_path: str = CONFIG_PATH
    pod_name: str | None = None
    node_name: str | None = None
    #: Manifest URI of the checkpoint to resume from (``status.lastCheckpoint.uri``, or the
    #: user's ``spec.resumeFrom`` when :attr:`resume_explicit`).
    resume_from: str | None = None
    #: ``sha256:<hex>`` the manifest at :attr:`resume_from` must have
    #: (``status.lastCheckpoint.digest``); unset: not compared.
    resume_digest: str | None = None
    #: :attr:`resume_from` is another run's checkpoint the user chose (``spec.resumeFrom``): the
    #: trainer accepts a manifest recorded by another run (its objects are still verified).
    resume_explicit: bool = False
    incarnation: int = 0
    #: Scratch directory of this pod; the trainer prefers it to ``TrainerConfig.work_dir``.
    work_dir: str | None = None
    #: spec.preparation.mode Pod: the verified dataset manifest digest and code cache key the
    #: preparation pod produced; the trainer must find exactly these (and never tokenizes).
    prepared_manifest_digest: str | None = None
    prepared_codes_key: str | None = None

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> PodEnv:
        env = dict(os.environ if environ is None else environ)
        return cls(
            config_path=env.get(ENV_CONFIG, CONFIG_PATH),
            pod_name=env.get(ENV_POD_NAME) or None,
            node_name=env.get(ENV_NODE_NAME) or None,
            resume_from=env.get(ENV_RESUME_FROM) or None,
            resume_digest=env.get(ENV_RESUME_DIGEST) or None,
            resume_explicit=env.get(ENV_RESUME_EXPLICIT, "").strip().lower() in _TRUE,
            incarnation=int(env.get(ENV_INCARNATION, "0") or 0),
            work_dir=env.get(ENV_WORK_DIR) or None,
            prepared_manifest_digest=env.get(ENV_PREPARED_MANIFEST_DIGEST) or None,
            prepared_codes_key=env.get(ENV_PREPARED_CODES_KEY) or None,
        )


ENV_CONFIG = "FERMATA_CONFIG"
ENV_POD_NAME = "FERMATA_POD_NAME"
ENV_NODE_NAME = "FERMATA_NODE_NAME"
ENV_RESUME_FROM = "FERMATA_RESUME_FROM"
ENV_RESUME_DIGEST = "FERMATA_RESUME_DIGEST"
ENV_RESUME_EXPLICIT = "FERMATA_RESUME_EXPLICIT"
ENV_INCARNATION = "FERMATA_INCARNATION"
ENV_WORK_DIR = "FERMATA_WORK_DIR"
ENV_PREPARED_MANIFEST_DIGEST = "FERMATA_PREPARED_MANIFEST_DIGEST"
ENV_PREPARED_CODES_KEY = "FERMATA_PREPARED_CODES_KEY"

_TRUE = frozenset({"1", "true", "yes", "on"})


# ----------------------------------------------------------------------------- what comes back


class CheckpointRef(ApiModel):
    """A checkpoint whose manifest (with sha256 digests of every object) was written last."""

    uri: str = Field(description="URI of the checkpoint's manifest.json.")
    step: int = Field(ge=0, description="Optimizer step the checkpoint was taken after.")
    epoch: int = Field(default=0, ge=0, description="Epoch the step belongs to.")
    digest: str = Field(description="sha256 of the manifest (sha256:<hex>).")
    time: datetime = Field(description="When the manifest was written.")
    reason: str | None = Field(
        default=None, description="periodic, signal (SIGTERM), request (operator asked), final."
    )
    duration_seconds: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Wall seconds the checkpoint took, from serialising the state to the manifest's "
            "upload (absent for checkpoints written before this was recorded)."
        ),
    )
    size_bytes: int | None = Field(
        default=None, ge=0, description="Total size of the checkpoint's objects in bytes."
    )


class ArtifactRef(ApiModel):
    """An export of the fine-tuned model in audiocraft's release format (``state_dict.bin``,
    ``compression_state_dict.bin``) with its ``model_card.json``, written last: the card lists
    every file's sha256 and size, and the card's own sha256 is the export's digest."""

    uri: str = Field(
        description=(
            "URI of the export folder (<storage.checkpoints>/exports/step-<9 digits>); "
            "MusicGen.get_pretrained(<local copy of it>) loads it, and model.base of another "
            "run accepts it."
        )
    )
    step: int = Field(ge=0, description="Optimizer step of the exported weights.")
    metric: str = Field(
        description="The metric the best export is chosen by (evaluation.bestMetric): validationLoss or authenticity."
    )
    value: float | None = Field(
        default=None, description="That metric at this step (absent when the evaluation had none)."
    )
    digest: str = Field(description="sha256 of the export's model_card.json (sha256:<hex>).")
    time: datetime = Field(description="When the model card was written.")


class Artifacts(ApiModel):
    """The deployable exports of the run (``status.artifacts``)."""

    best: ArtifactRef | None = Field(
        default=None,
        description=(
            "The export at the evaluation with the best evaluation.bestMetric so far (an earlier "
            "best export is deleted once a better one is written)."
        ),
    )
    final: ArtifactRef | None = Field(
        default=None, description="The export written when the run completed its planned steps."
    )


class TrainerState(str, Enum):
    preparing = "Preparing"
    tokenizing = "Tokenizing"
    training = "Training"
    evaluating = "Evaluating"
    checkpointing = "Checkpointing"
    completed = "Completed"
    stopped = "Stopped"
    failed = "Failed"


class TrainerProgress(ApiModel):
    """What the trainer reports at ``status.progress``."""

    state: TrainerState = Field(description="What the trainer is doing now.")
    heartbeat_time: datetime = Field(description="When the trainer last reported.")
    pod_name: str | None = Field(default=None, description="Pod that sent the report.")
    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps planned.")
    epoch: int = Field(default=0, ge=0, description="Current epoch (0-based).")
    train_loss: float | None = Field(default=None, description="Recent mean training cross-entropy.")
    validation_loss: float | None = Field(default=None, description="Latest validation cross-entropy.")
    validation_perplexity: float | None = Field(default=None, description="exp(validationLoss).")
    baseline_validation_loss: float | None = Field(
        default=None, description="Validation cross-entropy of the pretrained model at step 0."
    )
    evaluated_step: int | None = Field(default=None, description="Step of the latest evaluation.")
    authenticity: float | None = Field(
        default=None, ge=0, le=1, description="Latest authenticity score in [0, 1]."
    )
    authenticity_components: dict[str, float] | None = Field(
        default=None, description="The parts the authenticity score was built from."
    )
    samples_per_second: float | None = Field(
        default=None, description="Training throughput: samples per second over all ranks."
    )
    precision: str | None = Field(
        default=None,
        description="What the forward pass runs in: bf16 or fp16 autocast over float32 weights, or fp32.",
    )
    precision_reason: str | None = Field(
        default=None,
        description="Why that precision (training.precision and the device, e.g. its CUDA compute "
        "capability); fp16 comes with a gradient scaler.",
    )
    gpu_utilization: float | None = Field(
        default=None, ge=0, le=1, description="Mean GPU utilisation since the last report (NVML)."
    )
    gpu_memory_bytes: int | None = Field(default=None, ge=0, description="GPU memory in use.")
    checkpoint_request_ack: str | None = Field(
        default=None, description="Id of the last status.control.checkpointRequest answered."
    )
    evaluation_request_ack: str | None = Field(
        default=None, description="Id of the last status.control.evaluationRequest answered."
    )
    stop_report_uri: str | None = Field(
        default=None, description="Where the trainer wrote status.control.stopReport."
    )
    message: str | None = Field(default=None, description="Human-readable note (errors, skips).")


class PreparationState(str, Enum):
    scanning = "Scanning"  # listing, verifying and filtering the dataset (the manifest)
    tokenizing = "Tokenizing"  # decoding, resampling, segmenting and encoding into code shards
    verifying = "Verifying"  # re-reading the manifest and the code cache index against their digests
    completed = "Completed"  # verified: manifestDigest and codesKey name what the trainer loads
    failed = "Failed"
    stopped = "Stopped"  # SIGTERM: the next preparation pod resumes


class PreparationReport(ApiModel):
    """What the dataset preparation reports at ``status.preparation``."""

    state: PreparationState = Field(description="What the preparation is doing now.")
    heartbeat_time: datetime = Field(description="When it last reported.")
    pod_name: str | None = Field(default=None, description="Pod that sent the report.")
    files_done: int = Field(default=0, ge=0, description="Clips tokenized or found in the code cache so far.")
    files_total: int = Field(default=0, ge=0, description="Clips to tokenize (the manifest's entries).")
    tokenized: int = Field(default=0, ge=0, description="Clips this pod decoded and encoded itself.")
    reused: int = Field(
        default=0, ge=0, description="Clips found already tokenized (an earlier pod's work, resumed)."
    )
    eta_seconds: float | None = Field(
        default=None, ge=0, description="Seconds of tokenizing left at the measured rate."
    )
    manifest_uri: str | None = Field(default=None, description="URI of the dataset manifest.")
    manifest_digest: str | None = Field(default=None, description="sha256 of the dataset manifest.")
    codes_key: str | None = Field(default=None, description="Key of the code cache built from it.")
    codes_uri: str | None = Field(default=None, description="Where the code cache is mirrored.")
    started_at: datetime | None = Field(default=None, description="When this pod started preparing.")
    finished_at: datetime | None = Field(default=None, description="When the preparation was verified.")
    message: str | None = Field(default=None, description="Human-readable note (errors).")


class PreparationStatus(ApiModel):
    """The preparation pod's part of ``TrainingRun.status`` (one SSA patch under the field
    manager :data:`~fermata_api.meta.PREPARER_FIELD_MANAGER`)."""

    preparation: PreparationReport

    def apply_body(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "status": self.wire(),
        }


class TrainerStatus(ApiModel):
    """The trainer-owned part of ``TrainingRun.status`` (applied as one SSA patch)."""

    progress: TrainerProgress
    last_checkpoint: CheckpointRef | None = None
    artifacts: Artifacts | None = None
    #: spec.preparation.mode Trainer: the trainer's own preparation report
    preparation: PreparationReport | None = None

    def apply_body(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "status": self.wire(),
        }


class CheckpointRequest(ApiModel):
    """The operator asks for a checkpoint now (before a stop, or on a spot notice)."""

    id: str = Field(description="Unique id; the trainer echoes it in progress.checkpointRequestAck.")
    reason: str = Field(description="Why: budget, idle, interruption, suspend, gate, manual.")
    time: datetime = Field(description="When it was asked.")
    stop: bool = Field(default=False, description="Exit after the checkpoint is written.")


class EvaluationRequest(ApiModel):
    """The operator asks for an evaluation (validation loss and authenticity) at or after a step,
    e.g. for a gate whose milestone fell between two scheduled evaluations."""

    id: str = Field(description="Unique id; the trainer echoes it in progress.evaluationRequestAck.")
    min_step: int = Field(ge=0, description="Evaluate once the run is at or past this step.")
    reason: str = Field(default="gate", description="Why (e.g. the gate waiting for it).")
    time: datetime = Field(description="When it was asked.")


class StopReport(ApiModel):
    """Why the operator is stopping the run; the trainer writes it next to its checkpoints as
    ``reports/<id>.json`` (the abort report) when it stops."""

    id: str = Field(description="Report id (also its file name).")
    phase: str = Field(description="Phase the run ends in.")
    reason: str = Field(description="CamelCase reason: BudgetExceeded, Idle, GateNoGo, ...")
    decision: str | None = Field(default=None, description="GO, NO-GO or CONDITIONAL-GO.")
    message: str = Field(default="", description="Human-readable summary.")
    time: datetime = Field(description="When the stop was decided.")
    step: int | None = Field(default=None, description="Last step reported before the stop.")
    cost_usd: float | None = Field(default=None, description="Accrued cost at the stop.")
    evidence: dict[str, float] = Field(default_factory=dict, description="Metrics and thresholds.")


class TrainerControl(ApiModel):
    """What the operator writes at ``status.control`` for the trainer to read."""

    checkpoint_request: CheckpointRequest | None = Field(
        default=None, description="Write a checkpoint now (and stop, if asked)."
    )
    stop_report: StopReport | None = Field(
        default=None, description="The abort report the trainer writes when it stops."
    )
    evaluation_request: EvaluationRequest | None = Field(
        default=None, description="Evaluate now (once at or past minStep)."
    )


def report_key(report_id: str) -> str:
    """Where an abort report lives, relative to ``storage.checkpoints``."""
    return f"reports/{report_id}.json"


def read_control(run_object: dict[str, Any]) -> TrainerControl:
    """The control block of a TrainingRun as returned by the API (tolerates absence)."""
    raw = (run_object.get("status") or {}).get("control") or {}
    try:
        return TrainerControl.model_validate(raw)
    except ValueError:
        return TrainerControl()


__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CONFIG_PATH",
    "EXIT_CONFIG_ERROR",
    "EXIT_STOPPED_WITH_CHECKPOINT",
    "KIND",
    "PLURAL",
    "TRAINER_FIELD_MANAGER",
]
