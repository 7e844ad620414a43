"""The ``TrainingRun`` API (``fermata.dev/v1alpha1``) as typed models.

``crds/`` is generated from these models by ``python -m fermata_operator.crdgen``; every field's
``description`` becomes its ``kubectl explain`` text, and ``x-kubernetes-validations`` (CEL)
rules attached with :func:`cel` become API-server validation where fields interact.

The spec sections the trainer reads (model, dataset, training, evaluation, storage) and the
status parts the trainer writes (progress, lastCheckpoint) come from
:mod:`fermata_trainer.contract`, so the operator and the trainer share one definition.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import ConfigDict, Field, JsonValue

from fermata_trainer.contract import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    CheckpointRef,
    DatasetSpec,
    Duration,
    EvaluationSpec,
    ModelSpec,
    StorageSpec,
    TrainerControl,
    TrainerProgress,
    TrainingSpec,
    _Model,
)

SINGULAR = "trainingrun"
SHORT_NAMES = ["tr"]
CATEGORIES = ["fermata"]


def cel(*rules: tuple[str, str] | tuple[str, str, str]) -> ConfigDict:
    """Model config carrying CEL rules: (rule, message) or (rule, message, fieldPath)."""
    validations: list[JsonValue] = []
    for r in rules:
        entry: dict[str, JsonValue] = {"rule": r[0], "message": r[1]}
        if len(r) == 3:
            entry["fieldPath"] = r[2]
        validations.append(entry)
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": validations})


# ----------------------------------------------------------------------------- spec


class CapacityType(str, Enum):
    spot = "spot"
    on_demand = "on-demand"


class Toleration(_Model):
    """A toleration added to the trainer pod (on top of the operator's GPU/spot defaults)."""

    key: str | None = Field(default=None, description="Taint key (empty with Exists: all taints).")
    operator: str = Field(default="Equal", pattern="^(Equal|Exists)$", description="Equal or Exists.")
    value: str | None = Field(default=None, description="Taint value for operator Equal.")
    effect: str | None = Field(
        default=None,
        pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$",
        description="Taint effect to tolerate (empty: all).",
    )


class ResourcesSpec(_Model):
    """Where and on what the trainer pod runs."""

    image: str = Field(
        min_length=1, description="Trainer container image (see the Dockerfile's trainer target)."
    )
    image_pull_policy: str = Field(
        default="IfNotPresent",
        pattern="^(Always|IfNotPresent|Never)$",
        description="Image pull policy of the trainer container.",
    )
    gpus: int = Field(default=1, ge=0, le=8, description="nvidia.com/gpu per pod; >1 runs torchrun DDP.")
    cpu: str = Field(default="2", description="CPU request of the trainer container.")
    memory: str = Field(default="8Gi", description="Memory request and limit of the trainer container.")
    instance_types: list[str] = Field(
        default_factory=lambda: ["g4dn.xlarge"],
        min_length=1,
        max_length=32,
        description="Allowed node.kubernetes.io/instance-type values; priced by the price table.",
    )
    capacity: CapacityType = Field(
        default=CapacityType.spot,
        description="spot (falls back to on-demand per spec.spot) or on-demand.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node labels the trainer pod requires."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Extra tolerations for the trainer pod."
    )
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the trainer pod.")
    termination_grace_period_seconds: int = Field(
        default=150,
        ge=30,
        le=3600,
        description=(
            "Time the trainer gets to write its checkpoint after SIGTERM (a spot notice gives ~120 s)."
        ),
    )
    scratch_size: str = Field(
        default="50Gi",
        description="Size limit of the pod's scratch volume (code cache, downloads).",
    )


class PriceOverride(_Model):
    """An hourly price that replaces the price table's for this run."""

    instance_type: str = Field(min_length=1, description="node.kubernetes.io/instance-type.")
    capacity_type: CapacityType = Field(description="spot or on-demand.")
    hourly_usd: float = Field(ge=0, le=10000, description="US dollars per node-hour.")


class BudgetSpec(_Model):
    """The dollar budget the run must stay inside."""

    max_usd: float = Field(gt=0, le=10_000_000, description="Hard budget in US dollars.")
    warn_at_fraction: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="Raise the BudgetWarning condition and an Event at this share of maxUSD.",
    )
    stop_on_projected_overrun: bool = Field(
        default=False,
        description=("Stop early when the projected total at the current progress rate exceeds maxUSD."),
    )
    prices: list[PriceOverride] = Field(
        default_factory=list,
        max_length=64,
        description="Per-run overrides of the operator's price table.",
    )


class IdleSpec(_Model):
    """When a running trainer counts as idle and is stopped (after a checkpoint)."""

    timeout: Duration = Field(
        default="2h",
        description=(
            "Stop after the heartbeat is stale, the step has not advanced, or GPU utilisation "
            "stayed under minGpuUtilization, for this long."
        ),
    )
    min_gpu_utilization: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="GPU utilisation (0-1) under which the GPU counts idle.",
    )


class SpotSpec(_Model):
    """Spot interruption handling: a separate retry budget from application failures."""

    model_config = cel(
        (
            "self.fallbackToOnDemandAfter <= self.maxInterruptions",
            "fallbackToOnDemandAfter must not exceed maxInterruptions",
            ".fallbackToOnDemandAfter",
        ),
    )

    max_interruptions: int = Field(
        default=10, ge=0, le=1000, description="Spot interruptions survived before the run fails."
    )
    fallback_to_on_demand_after: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Move to on-demand capacity after this many interruptions (0: never).",
    )
    backoff_seconds: int = Field(
        default=10, ge=0, le=3600, description="First delay before recreating an interrupted pod."
    )
    max_backoff_seconds: int = Field(
        default=600, ge=0, le=86400, description="Cap of the exponential recreate delay."
    )


class FailureSpec(_Model):
    """Application failures (non-zero exits, OOM): retried apart from spot interruptions."""

    max_retries: int = Field(
        default=1, ge=0, le=100, description="Pod failures retried before the run is Failed."
    )
    backoff_seconds: int = Field(default=30, ge=0, le=3600, description="First retry delay.")


class GateAt(_Model):
    """When a gate fires: exactly one of elapsed, step, epoch."""

    model_config = cel(
        (
            "[has(self.elapsed), has(self.step), has(self.epoch)].filter(x, x).size() == 1",
            "set exactly one of elapsed, step or epoch",
        ),
    )

    elapsed: Duration | None = Field(
        default=None, description="Wall-clock time since the run started, e.g. 35d."
    )
    step: int | None = Field(default=None, ge=0, description="Optimizer step reached.")
    epoch: int | None = Field(default=None, ge=0, description="Epoch reached.")


class GateRequire(_Model):
    """Thresholds a gate checks; at least one."""

    model_config = cel(
        (
            "has(self.minAuthenticity) || has(self.maxValidationLoss) || has(self.maxCostUSD)",
            "a gate needs at least one of minAuthenticity, maxValidationLoss, maxCostUSD",
        ),
    )

    min_authenticity: float | None = Field(
        default=None, ge=0, le=1, description="Lowest acceptable authenticity score (0-1)."
    )
    max_validation_loss: float | None = Field(
        default=None, gt=0, le=100, description="Highest acceptable validation cross-entropy."
    )
    max_cost_usd: float | None = Field(
        default=None, gt=0, description="Highest acceptable accrued cost in US dollars."
    )


class NoGoAction(str, Enum):
    stop = "stop"
    continue_ = "continue"


class GateSpec(_Model):
    """A go/no-go milestone."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Gate name (unique in the run).",
    )
    at: GateAt = Field(description="When the gate is evaluated.")
    require: GateRequire = Field(description="Thresholds for GO.")
    margin: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description=(
            "Relative margin: a metric that misses its threshold by at most this share gives "
            "CONDITIONAL-GO (continue, flagged) instead of NO-GO."
        ),
    )
    on_no_go: NoGoAction = Field(
        default=NoGoAction.stop,
        description="stop: checkpoint and stop the run on NO-GO; continue: record only.",
    )


class TrainingRunSpec(_Model):
    """Desired state of a MusicGen fine-tuning run."""

    model_config = cel(
        (
            "!has(self.gates) || self.gates.all(g, !has(g.require.maxCostUSD) || "
            "g.require.maxCostUSD <= self.budget.maxUSD)",
            "a gate's maxCostUSD cannot exceed budget.maxUSD",
            ".gates",
        ),
        (
            "self.evaluation.bpmMin < self.evaluation.bpmMax",
            "evaluation.bpmMin must be below evaluation.bpmMax",
            ".evaluation",
        ),
        (
            "self.storage.checkpoints == oldSelf.storage.checkpoints",
            "storage.checkpoints is immutable: the run's checkpoints live there",
            ".storage.checkpoints",
        ),
        (
            "self.model.base == oldSelf.model.base",
            "model.base is immutable: start a new run to change the base model",
            ".model.base",
        ),
    )

    model: ModelSpec = Field(default_factory=ModelSpec, description="Base model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training audio and how it is selected.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Validation and authenticity scoring."
    )
    resources: ResourcesSpec = Field(description="Trainer image, GPUs and node placement.")
    budget: BudgetSpec = Field(description="Dollar budget and warning level.")
    idle: IdleSpec = Field(default_factory=IdleSpec, description="Idle shutdown policy.")
    spot: SpotSpec = Field(default_factory=SpotSpec, description="Spot interruption policy.")
    failures: FailureSpec = Field(
        default_factory=FailureSpec, description="Application failure retry policy."
    )
    gates: list[GateSpec] = Field(
        default_factory=list,
        max_length=16,
        description="Go/no-go milestones.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    storage: StorageSpec = Field(description="Checkpoint storage and credentials.")
    suspend: bool = Field(
        default=False,
        description="true: checkpoint, release the GPU and wait; false again resumes.",
    )
    deadline: Duration | None = Field(
        default=None, description="Optional wall-clock limit for the whole run (e.g. 40d)."
    )


# ----------------------------------------------------------------------------- status


class Phase(str, Enum):
    pending = "Pending"
    running = "Running"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"
    budget_exceeded = "BudgetExceeded"
    idle_stopped = "IdleStopped"
    stopped = "Stopped"


TERMINAL_PHASES = {
    Phase.succeeded,
    Phase.failed,
    Phase.budget_exceeded,
    Phase.idle_stopped,
    Phase.stopped,
}


class Decision(str, Enum):
    go = "GO"
    no_go = "NO-GO"
    conditional_go = "CONDITIONAL-GO"


class Condition(_Model):
    """A standard Kubernetes condition."""

    type: str = Field(description="Condition type.")
    status: str = Field(pattern="^(True|False|Unknown)$", description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase machine-readable reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(default=None, description="Spec generation seen.")


class PodStatusSummary(_Model):
    """The current trainer pod."""

    name: str = Field(description="Pod name.")
    incarnation: int = Field(ge=0, description="How many pods came before this one.")
    phase: str | None = Field(default=None, description="Pod phase.")
    node_name: str | None = Field(default=None, description="Node the pod runs on.")
    instance_type: str | None = Field(default=None, description="The node's instance type.")
    capacity_type: str | None = Field(default=None, description="spot or on-demand.")
    created: datetime | None = Field(default=None, description="Pod creation time.")
    started: datetime | None = Field(default=None, description="Container start time.")


class CostSegment(_Model):
    """A closed span of billed node time (one pod on one node)."""

    pod: str = Field(description="Pod name.")
    node: str | None = Field(default=None, description="Node name.")
    instance_type: str | None = Field(default=None, description="Instance type billed.")
    capacity_type: str | None = Field(default=None, description="spot or on-demand.")
    start: datetime = Field(description="Start of billing (container start).")
    end: datetime | None = Field(default=None, description="End of billing (open if absent).")
    hourly_usd: float = Field(ge=0, description="Price used for this span.")
    usd: float = Field(ge=0, description="Cost of the span.")


class CostStatus(_Model):
    """Money spent and expected."""

    accrued_usd: float = Field(default=0.0, ge=0, description="Spend so far.")
    hourly_rate_usd: float = Field(default=0.0, ge=0, description="Current burn rate.")
    projected_total_usd: float | None = Field(
        default=None, description="Expected total at the current progress rate."
    )
    budget_usd: float = Field(default=0.0, ge=0, description="spec.budget.maxUSD.")
    remaining_usd: float = Field(default=0.0, description="budget - accrued.")
    segments: list[CostSegment] = Field(
        default_factory=list, description="Billed spans, reconstructable from pod and node facts."
    )
    updated: datetime | None = Field(default=None, description="When cost was last computed.")


class GateOutcome(_Model):
    """The result of one gate evaluation."""

    name: str = Field(description="Gate name.")
    decision: Decision = Field(description="GO, NO-GO or CONDITIONAL-GO.")
    time: datetime = Field(description="When it was evaluated.")
    reason: str = Field(default="", description="Why.")
    evidence: dict[str, float] = Field(
        default_factory=dict,
        description="The metrics compared (validationLoss, authenticity, costUSD) and thresholds.",
    )


class IdleTracking(_Model):
    """Clocks the idle policy keeps between reconciles."""

    pod: str | None = Field(default=None, description="Pod the clocks belong to.")
    step: int | None = Field(default=None, description="Last step seen.")
    step_since: datetime | None = Field(default=None, description="When that step was first seen.")
    low_gpu_since: datetime | None = Field(
        default=None, description="Since when GPU utilisation is under the threshold."
    )


class StopIntent(_Model):
    """A stop the operator has decided on and is carrying out."""

    phase: Phase = Field(description="Phase the run ends in.")
    reason: str = Field(description="CamelCase reason (BudgetExceeded, Idle, GateNoGo, ...).")
    message: str = Field(default="", description="Human-readable detail.")
    time: datetime = Field(description="When the stop was decided.")


class AbortReport(_Model):
    """The abort report of a stopped run: its summary here, the full JSON at ``uri``."""

    uri: str = Field(description="Where the trainer writes the report (next to the checkpoints).")
    reason: str = Field(description="Why the run was stopped.")
    summary: str = Field(default="", description="Human-readable summary.")
    time: datetime = Field(description="When the stop was decided.")


class TrainingRunStatus(_Model):
    """Observed state, written by the operator (and progress/lastCheckpoint by the trainer)."""

    model_config = ConfigDict(
        alias_generator=_Model.model_config.get("alias_generator"),
        populate_by_name=True,
        extra="ignore",
    )

    phase: Phase | None = Field(default=None, description="Where the run is in its life.")
    decision: Decision | None = Field(default=None, description="Latest go/no-go decision.")
    decision_reason: str | None = Field(default=None, description="Why the decision was taken.")
    message: str | None = Field(default=None, description="Human-readable summary.")
    observed_generation: int | None = Field(default=None, description="Spec generation acted on.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    start_time: datetime | None = Field(default=None, description="When the first pod started.")
    completion_time: datetime | None = Field(default=None, description="When the run ended.")
    progress_percent: float | None = Field(default=None, description="step / totalSteps × 100.")
    incarnation: int = Field(default=0, ge=0, description="Pods created so far minus one.")
    pod: PodStatusSummary | None = Field(default=None, description="The current trainer pod.")
    interruptions: int = Field(default=0, ge=0, description="Spot interruptions survived.")
    failures: int = Field(default=0, ge=0, description="Application failures retried.")
    capacity: str | None = Field(default=None, description="Capacity type in use now.")
    retry_after: datetime | None = Field(default=None, description="Next pod not before.")
    waiting_for_capacity_since: datetime | None = Field(
        default=None, description="Since when the pod waits for a node (Pending)."
    )
    cost: CostStatus | None = Field(default=None, description="Spend and budget.")
    gates: list[GateOutcome] = Field(
        default_factory=list,
        description="Gate results, one per gate that fired, plus the final decision.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    progress: TrainerProgress | None = Field(default=None, description="Trainer's report.")
    last_checkpoint: CheckpointRef | None = Field(
        default=None, description="Newest verified checkpoint; the next pod resumes from it."
    )
    control: TrainerControl | None = Field(default=None, description="Operator → trainer requests.")
    idle_tracking: IdleTracking | None = Field(default=None, description="Idle policy clocks.")
    stop: StopIntent | None = Field(default=None, description="The stop being carried out.")
    abort_report: AbortReport | None = Field(default=None, description="Summary of the abort report.")
    last_interruption: str | None = Field(default=None, description="Why the last pod was lost.")


# ----------------------------------------------------------------------------- the object


def printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Decision", "type": "string", "jsonPath": ".status.decision"},
        {
            "name": "Progress",
            "type": "number",
            "format": "float",
            "jsonPath": ".status.progressPercent",
            "description": "Percent of planned optimizer steps done",
        },
        {
            "name": "Cost",
            "type": "number",
            "format": "float",
            "jsonPath": ".status.cost.accruedUSD",
            "description": "US dollars spent",
        },
        {
            "name": "Budget",
            "type": "number",
            "format": "float",
            "jsonPath": ".spec.budget.maxUSD",
            "description": "US dollar budget",
        },
        {"name": "Capacity", "type": "string", "jsonPath": ".status.capacity", "priority": 1},
        {
            "name": "Interruptions",
            "type": "integer",
            "jsonPath": ".status.interruptions",
            "priority": 1,
        },
        {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
        {
            "name": "Val-Loss",
            "type": "number",
            "jsonPath": ".status.progress.validationLoss",
            "priority": 1,
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CATEGORIES",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "AbortReport",
    "BudgetSpec",
    "CapacityType",
    "Condition",
    "CostSegment",
    "CostStatus",
    "Decision",
    "FailureSpec",
    "GateAt",
    "GateOutcome",
    "GateRequire",
    "GateSpec",
    "IdleSpec",
    "IdleTracking",
    "NoGoAction",
    "Phase",
    "PodStatusSummary",
    "PriceOverride",
    "ResourcesSpec",
    "SpotSpec",
    "StopIntent",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "printer_columns",
]
