"""The contract between the Fermata operator and the trainer pod.

This one module says what the trainer reads from its pod and what it writes back:

* **In** — :class:`TrainerConfig`, a JSON document the operator renders into a ConfigMap and
  mounts at :data:`CONFIG_PATH` (or that a user writes by hand to run the trainer on a single
  machine), plus a few environment variables (:class:`PodEnv`) that change per pod incarnation
  (which checkpoint to resume from, which pod this is).
* **Out** — :class:`TrainerStatus`, the part of ``TrainingRun.status`` the trainer owns
  (``status.progress`` and ``status.lastCheckpoint``). The trainer writes it with server-side
  apply on the ``status`` subresource under the field manager :data:`TRAINER_FIELD_MANAGER`;
  the operator never writes these fields, and the trainer never writes any other, so neither
  can overwrite the other.
* **Control** — :class:`TrainerControl`, written by the operator at ``status.control`` and read
  by the trainer from every apply response: a checkpoint request the trainer answers by writing
  a checkpoint and echoing the request id in ``status.progress.checkpointRequestAck``.

The spec sections the trainer consumes (model, dataset, training, evaluation, storage) are
defined here too, so the ``TrainingRun`` CRD and the trainer read the same types; the operator's
API models compose them. This module imports only pydantic: the operator image has no torch.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_GROUP = "fermata.dev"
API_VERSION = "v1alpha1"
KIND = "TrainingRun"
PLURAL = "trainingruns"

#: Where the operator mounts the rendered :class:`TrainerConfig`.
CONFIG_PATH = "/etc/fermata/trainer.json"
#: Field manager the trainer uses for its server-side apply on ``status``.
TRAINER_FIELD_MANAGER = "fermata-trainer"

#: Exit code the trainer uses when it stopped on request after writing a checkpoint
#: (SIGTERM, or a stop asked through ``status.control``). Anything 128+ is a signal death.
EXIT_STOPPED_WITH_CHECKPOINT = 0
#: Exit code for a bad configuration or dataset (permanent: retrying will not help).
EXIT_CONFIG_ERROR = 2


def wire_name(field: str) -> str:
    """snake_case → the camelCase Kubernetes users expect (``max_usd`` → ``maxUSD``)."""
    return re.sub(r"Usd(?=[A-Z]|$)", "USD", to_camel(field))


class _Model(BaseModel):
    """camelCase on the wire (as Kubernetes users expect), snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=wire_name,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ----------------------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

#: A duration such as ``90s``, ``2h``, ``1h30m`` or ``35d``.
Duration = Annotated[
    str,
    Field(
        pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$",
        json_schema_extra={"example": "2h"},
    ),
]


def parse_duration(text: str) -> float:
    """Seconds in a duration string (``1h30m`` → 5400.0). Raises ValueError on bad input."""
    if not _DURATION_RE.match(text):
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 30m, 2h, 1h30m, 35d")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


# ----------------------------------------------------------------------------- spec sections


class ModelSpec(_Model):
    """The pretrained MusicGen model to fine-tune."""

    base: str = Field(
        default="facebook/musicgen-small",
        min_length=1,
        description=(
            "Hugging Face id (facebook/musicgen-small, -medium, -large, -melody) or a local "
            "path or s3:// URI of a MusicGen checkpoint directory."
        ),
    )


class DatasetSource(str, Enum):
    magnatagatune = "magnatagatune"
    manifest = "manifest"


DEFAULT_PROXY_TAGS = [
    "drums",
    "percussion",
    "beats",
    "electronic",
    "dance",
    "piano",
    "jazzy",
    "bass",
    "deep",
    "chill",
    "mellow",
    "soulful",
]


class DatasetSpec(_Model):
    """Where the training audio comes from and how it is filtered."""

    source: DatasetSource = Field(
        default=DatasetSource.magnatagatune,
        description=(
            "magnatagatune: a MagnaTagATune tree (annotations_final.csv + mp3/) filtered by "
            "proxyTags; manifest: a JSONL file of {audio, description[, bpm, key, tags]}."
        ),
    )
    uri: str = Field(
        min_length=1,
        description=(
            "Local path or s3:// URI: the MagnaTagATune root (source=magnatagatune) or the "
            "manifest JSONL file (source=manifest)."
        ),
    )
    proxy_tags: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROXY_TAGS),
        max_length=188,
        description="MagnaTagATune tags that stand in for the target genre's traits.",
    )
    min_tags: int = Field(
        default=3,
        ge=1,
        le=188,
        description="Keep a clip only if it carries at least this many of proxyTags.",
    )
    validation_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Share of clips held out for validation (deterministic split by clip id).",
    )
    segment_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        description=(
            "Length of the training segments in seconds; shorter clips are padded and masked, never dropped."
        ),
    )
    verify_checksums: bool = Field(
        default=True,
        description="Verify each audio file against its recorded sha256 before tokenizing.",
    )


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class TrainingSpec(_Model):
    """Optimisation hyper-parameters. Defaults follow audiocraft's MusicGen recipe."""

    epochs: int = Field(default=20, ge=1, le=10000, description="Passes over the train split.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optional cap on optimizer steps (overrides epochs when smaller).",
    )
    batch_size: int = Field(default=8, ge=1, le=4096, description="Clips per optimizer micro-batch.")
    gradient_accumulation: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    learning_rate: float = Field(default=5.0e-5, gt=0, le=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=0.1, ge=0, le=1, description="AdamW weight decay.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warm-up steps before cosine decay.")
    gradient_clip: float = Field(default=1.0, gt=0, description="Max gradient norm.")
    cfg_dropout: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="Classifier-free-guidance dropout: share of samples trained unconditioned.",
    )
    checkpoint_every_steps: int = Field(
        default=1000, ge=1, description="Write a checkpoint every this many optimizer steps."
    )
    evaluate_every_steps: int = Field(
        default=500,
        ge=1,
        description="Validation loss and authenticity every this many optimizer steps.",
    )
    seed: int = Field(default=1234, ge=0, description="Seed for data order, dropout and sampling.")
    precision: Precision = Field(
        default=Precision.auto,
        description="auto: bf16 autocast on GPU with float32 weights, float32 on CPU.",
    )


class EvaluationSpec(_Model):
    """How each evaluation generates and scores clips (the authenticity metric)."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "mellow amapiano with log drums and piano",
            "deep soulful amapiano with log drums and bass",
        ],
        min_length=1,
        max_length=32,
        description="Genre prompts generated at each evaluation.",
    )
    clip_seconds: float = Field(default=8.0, gt=0, le=30, description="Length of each generated clip.")
    bpm_min: float = Field(default=105.0, gt=0, le=300, description="Lower edge of the genre's tempo band.")
    bpm_max: float = Field(default=118.0, gt=0, le=300, description="Upper edge of the genre's tempo band.")
    reference_uri: str | None = Field(
        default=None,
        description=(
            "Optional local path or s3:// URI of reference clips (a folder of audio files); "
            "defaults to the training subset."
        ),
    )


class StorageSpec(_Model):
    """Where checkpoints, token caches and evaluation clips are kept."""

    checkpoints: str = Field(
        min_length=1,
        description="s3:// URI prefix (or local path) for checkpoints, samples and reports.",
    )
    credentials_secret: str | None = Field(
        default=None,
        description=(
            "Secret in the run's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and optional AWS_ENDPOINT_URL_S3, AWS_REGION); omit to use the pod's IAM role."
        ),
    )
    keep_last: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Checkpoints kept; older ones are pruned. The newest verified one is never deleted.",
    )
    cache_uri: str | None = Field(
        default=None,
        description="Where tokenized code shards are mirrored (defaults to <checkpoints>/cache/).",
    )


# ----------------------------------------------------------------------------- the config file


class RunRef(_Model):
    """Which TrainingRun this trainer reports to (empty name: no Kubernetes reporting)."""

    name: str = ""
    namespace: str = "default"
    uid: str | None = None


class ReportingSpec(_Model):
    """How often the trainer reports to its TrainingRun."""

    heartbeat_seconds: float = Field(default=30.0, gt=0, le=3600)


class TrainerConfig(_Model):
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


class PodEnv(_Model):
    """Per-pod facts the operator passes as environment variables."""

    config_path: str = CONFIG_PATH
    pod_name: str | None = None
    node_name: str | None = None
    resume_from: str | None = None
    incarnation: int = 0

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> PodEnv:
        env = dict(os.environ if environ is None else environ)
        return cls(
            config_path=env.get(ENV_CONFIG, CONFIG_PATH),
            pod_name=env.get(ENV_POD_NAME) or None,
            node_name=env.get(ENV_NODE_NAME) or None,
            resume_from=env.get(ENV_RESUME_FROM) or None,
            incarnation=int(env.get(ENV_INCARNATION, "0") or 0),
        )


ENV_CONFIG = "FERMATA_CONFIG"
ENV_POD_NAME = "FERMATA_POD_NAME"
ENV_NODE_NAME = "FERMATA_NODE_NAME"
ENV_RESUME_FROM = "FERMATA_RESUME_FROM"
ENV_INCARNATION = "FERMATA_INCARNATION"
#: Set by the test kubelet: mount paths live under this prefix on a machine without containers.
ENV_ROOT_PREFIX = "FERMATA_ROOT_PREFIX"


def resolve_mount_path(path: str, environ: dict[str, str] | None = None) -> Path:
    """Map an in-container path to where it really is (identity inside a real container).

    Under the test kubelet (``FERMATA_ROOT_PREFIX`` set) a pod's volume mounts live below that
    prefix; a path whose top directory is not mounted there (``/work/...``, say) is the host's,
    as if the container image were the host's file system.
    """
    env = os.environ if environ is None else environ
    prefix = env.get(ENV_ROOT_PREFIX)
    if prefix and path.startswith("/"):
        relative = path.lstrip("/")
        top = relative.split("/", 1)[0]
        if top and (Path(prefix) / top).exists():
            return Path(prefix) / relative
    return Path(path)


# ----------------------------------------------------------------------------- what comes back


class CheckpointRef(_Model):
    """A checkpoint whose manifest (with sha256 digests of every object) was written last."""

    uri: str = Field(description="URI of the checkpoint's manifest.json.")
    step: int = Field(ge=0, description="Optimizer step the checkpoint was taken after.")
    epoch: int = Field(default=0, ge=0, description="Epoch the step belongs to.")
    digest: str = Field(description="sha256 of the manifest (sha256:<hex>).")
    time: datetime = Field(description="When the manifest was written.")
    reason: str | None = Field(
        default=None, description="periodic, signal (SIGTERM), request (operator asked), final."
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


class TrainerProgress(_Model):
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
    samples_per_second: float | None = Field(default=None, description="Training throughput.")
    gpu_utilization: float | None = Field(
        default=None, ge=0, le=1, description="Mean GPU utilisation since the last report (NVML)."
    )
    gpu_memory_bytes: int | None = Field(default=None, ge=0, description="GPU memory in use.")
    checkpoint_request_ack: str | None = Field(
        default=None, description="Id of the last status.control.checkpointRequest answered."
    )
    stop_report_uri: str | None = Field(
        default=None, description="Where the trainer wrote status.control.stopReport."
    )
    message: str | None = Field(default=None, description="Human-readable note (errors, skips).")


class TrainerStatus(_Model):
    """The trainer-owned part of ``TrainingRun.status`` (applied as one SSA patch)."""

    progress: TrainerProgress
    last_checkpoint: CheckpointRef | None = None

    def apply_body(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "status": self.wire(),
        }


class CheckpointRequest(_Model):
    """The operator asks for a checkpoint now (before a stop, or on a spot notice)."""

    id: str = Field(description="Unique id; the trainer echoes it in progress.checkpointRequestAck.")
    reason: str = Field(description="Why: budget, idle, interruption, suspend, gate, manual.")
    time: datetime = Field(description="When it was asked.")
    stop: bool = Field(default=False, description="Exit after the checkpoint is written.")


class StopReport(_Model):
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


class TrainerControl(_Model):
    """What the operator writes at ``status.control`` for the trainer to read."""

    checkpoint_request: CheckpointRequest | None = Field(
        default=None, description="Write a checkpoint now (and stop, if asked)."
    )
    stop_report: StopReport | None = Field(
        default=None, description="The abort report the trainer writes when it stops."
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
    "KIND",
    "PLURAL",
    "TRAINER_FIELD_MANAGER",
    "CheckpointRef",
    "CheckpointRequest",
    "DatasetSource",
    "DatasetSpec",
    "Duration",
    "EvaluationSpec",
    "ModelSpec",
    "PodEnv",
    "Precision",
    "ReportingSpec",
    "RunRef",
    "StopReport",
    "StorageSpec",
    "TrainerConfig",
    "TrainerControl",
    "TrainerProgress",
    "TrainerState",
    "TrainerStatus",
    "TrainingSpec",
    "parse_duration",
    "read_control",
    "report_key",
    "resolve_mount_path",
]
