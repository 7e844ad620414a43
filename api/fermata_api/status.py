"""``TrainingRun.status``: what the operator (and, for progress, lastCheckpoint and artifacts, the
trainer) observed and decided."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import ConfigDict, Field

from fermata_api.base import ApiModel
from fermata_api.contract import (
    Artifacts,
    CheckpointRef,
    PreparationReport,
    TrainerControl,
    TrainerProgress,
)


class Phase(str, Enum):
    pending = "Pending"
    preparing = "Preparing"
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


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: str = Field(description="Condition type.")
    status: str = Field(pattern="^(True|False|Unknown)$", description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase machine-readable reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(default=None, description="Spec generation seen.")


class PodStatusSummary(ApiModel):
    """The current trainer pod."""

    name: str = Field(description="Pod name.")
    incarnation: int = Field(ge=0, description="How many pods came before this one.")
    phase: str | None = Field(default=None, description="Pod phase.")
    node_name: str | None = Field(default=None, description="Node the pod runs on.")
    instance_type: str | None = Field(default=None, description="The node's instance type.")
    capacity_type: str | None = Field(default=None, description="spot or on-demand.")
    created: datetime | None = Field(default=None, description="Pod creation time.")
    started: datetime | None = Field(default=None, description="Container start time.")
    uid: str | None = Field(
        default=None, description="The pod's UID, recorded when first seen: only this object is ever deleted."
    )
    spec_hash: str | None = Field(
        default=None,
        description=(
            "Digest of spec.resources, training and evaluation the pod was created from "
            "(a change restarts it from its checkpoint)."
        ),
    )


class CostSegment(ApiModel):
    """A closed span of billed node time (one pod on one node)."""

    pod: str = Field(description="Pod name.")
    node: str | None = Field(default=None, description="Node name.")
    instance_type: str | None = Field(default=None, description="Instance type billed.")
    capacity_type: str | None = Field(default=None, description="spot or on-demand.")
    start: datetime = Field(description="Start of billing (container start).")
    end: datetime | None = Field(default=None, description="End of billing (open if absent).")
    hourly_usd: float = Field(ge=0, description="Price used for this span.")
    usd: float = Field(ge=0, description="Cost of the span.")


class CostStatus(ApiModel):
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
    preparation_usd: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Of accruedUSD, what the preparation pods (<run>-prep-<n>, spec.preparation.mode Pod) "
            "cost; absent when there were none."
        ),
    )
    updated: datetime | None = Field(default=None, description="When cost was last computed.")


class GateOutcome(ApiModel):
    """The result of one gate evaluation."""

    name: str = Field(description="Gate name.")
    decision: Decision = Field(description="GO, NO-GO or CONDITIONAL-GO.")
    time: datetime = Field(description="When it was evaluated.")
    reason: str = Field(default="", description="Why.")
    evidence: dict[str, float] = Field(
        default_factory=dict,
        description="The metrics compared (validationLoss, authenticity, costUSD) and thresholds.",
    )
    evaluated_step: int | None = Field(
        default=None, description="Step of the evaluation the gate judged (at or after its milestone)."
    )


class IdleTracking(ApiModel):
    """Clocks the idle policy keeps between reconciles."""

    pod: str | None = Field(default=None, description="Pod the clocks belong to.")
    step: int | None = Field(default=None, description="Last step seen.")
    step_since: datetime | None = Field(default=None, description="When that step was first seen.")
    low_gpu_since: datetime | None = Field(
        default=None, description="Since when GPU utilisation is under the threshold."
    )
    preparing_since: datetime | None = Field(
        default=None, description="Since when the trainer reports Preparing or Tokenizing."
    )


class PendingGate(ApiModel):
    """A gate whose milestone is reached, waiting for an evaluation at or after it."""

    name: str = Field(description="Gate name.")
    due_step: int = Field(ge=0, description="The gate judges an evaluation at or after this step.")
    since: datetime = Field(description="When the milestone was reached.")


class EvaluationHistory(ApiModel):
    """What the operator has seen of the trainer's evaluations (for the plateau rule)."""

    count: int = Field(default=0, ge=0, description="Evaluations seen.")
    last_step: int | None = Field(default=None, description="Step of the latest evaluation seen.")
    best_validation_loss: float | None = Field(default=None, description="Best validation loss so far.")
    best_step: int | None = Field(default=None, description="Step of the best validation loss.")
    since_best: int = Field(default=0, ge=0, description="Evaluations since the best one.")


class Eta(ApiModel):
    """When the run should finish and what it should still cost, from measured throughput."""

    completion_time: datetime = Field(description="Estimated completion time.")
    remaining_seconds: float = Field(ge=0, description="Estimated seconds of training left.")
    remaining: str = Field(description="The same, human-readable (e.g. 3h12m).")
    remaining_cost_usd: float = Field(ge=0, description="Estimated spend until completion.")


class CreationBlocked(ApiModel):
    """The API server refused to create one of the run's objects (or a name is taken)."""

    reason: str = Field(description="NameConflict, CreateFailed or NamespaceTerminating.")
    message: str = Field(description="The API server's explanation, or which object holds the name.")
    generation: int | None = Field(default=None, description="Spec generation it happened at.")
    time: datetime = Field(
        description="When it happened; creation is retried after a while or on a spec change."
    )


class StopIntent(ApiModel):
    """A stop the operator has decided on and is carrying out."""

    phase: Phase = Field(description="Phase the run ends in.")
    reason: str = Field(description="CamelCase reason (BudgetExceeded, Idle, GateNoGo, ...).")
    message: str = Field(default="", description="Human-readable detail.")
    time: datetime = Field(description="When the stop was decided.")


class AbortReport(ApiModel):
    """The abort report of a stopped run: its summary here, the full JSON at ``uri``."""

    uri: str = Field(description="Where the trainer writes the report (next to the checkpoints).")
    reason: str = Field(description="Why the run was stopped.")
    summary: str = Field(default="", description="Human-readable summary.")
    time: datetime = Field(description="When the stop was decided.")


class PreparerStatus(ApiModel):
    """The operator's record of the preparation pods (spec.preparation.mode Pod)."""

    incarnation: int = Field(default=0, ge=0, description="Preparation pods created so far minus one.")
    pod: PodStatusSummary | None = Field(default=None, description="The current preparation pod.")
    interruptions: int = Field(default=0, ge=0, description="Preparation pods lost to interruptions.")
    failures: int = Field(
        default=0, ge=0, description="Preparation pods that failed (exit 1) and were retried."
    )
    retry_after: datetime | None = Field(default=None, description="Next preparation pod not before.")
    started_at: datetime | None = Field(
        default=None,
        description="When the first preparation pod started (idle.preparationTimeout counts from it).",
    )
    prepared: bool = Field(
        default=False, description="The prepared dataset is verified: the training pod may start."
    )
    manifest_digest: str | None = Field(
        default=None, description="sha256 of the verified dataset manifest the training pod must find."
    )
    codes_key: str | None = Field(
        default=None, description="Key of the verified code cache the training pod must load."
    )
    finished_at: datetime | None = Field(default=None, description="When the preparation was verified.")
    last_interruption: str | None = Field(default=None, description="Why the last preparation pod was lost.")


class TrainingRunStatus(ApiModel):
    """Observed state, written by the operator (and progress/lastCheckpoint/artifacts by the trainer)."""

    model_config = ConfigDict(
        alias_generator=ApiModel.model_config.get("alias_generator"),
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
    preparation: PreparationReport | None = Field(
        default=None,
        description=(
            "The dataset preparation's report (written by the preparation pod, or by the trainer in "
            "spec.preparation.mode Trainer): files done of total, reused from the code cache, ETA, "
            "and the verified manifest digest and code cache key."
        ),
    )
    preparer: PreparerStatus | None = Field(
        default=None,
        description="The preparation pods (spec.preparation.mode Pod), as the operator sees them.",
    )
    artifacts: Artifacts | None = Field(
        default=None,
        description=(
            "The deployable exports (written by the trainer): best (the evaluation with the best "
            "evaluation.bestMetric) and final (at completion), each a folder in audiocraft's "
            "release format that MusicGen.get_pretrained loads."
        ),
    )
    control: TrainerControl | None = Field(default=None, description="Operator → trainer requests.")
    idle_tracking: IdleTracking | None = Field(default=None, description="Idle policy clocks.")
    pending_gates: list[PendingGate] = Field(
        default_factory=list,
        description="Gates at their milestone, waiting for an evaluation at or after it.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    evaluations: EvaluationHistory | None = Field(
        default=None, description="Evaluations seen (best loss and since when, for the plateau rule)."
    )
    eta: Eta | None = Field(default=None, description="Estimated completion time and remaining cost.")
    creation_blocked: CreationBlocked | None = Field(
        default=None, description="Why the run's objects could not be created (no hot retry)."
    )
    stop: StopIntent | None = Field(default=None, description="The stop being carried out.")
    abort_report: AbortReport | None = Field(default=None, description="Summary of the abort report.")
    last_interruption: str | None = Field(default=None, description="Why the last pod was lost.")
    cleaned_up: datetime | None = Field(
        default=None,
        description=(
            "When the run's pods, ConfigMap and RBAC were deleted (spec.ttlSecondsAfterFinished "
            "after status.completionTime)."
        ),
    )


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
        {
            "name": "ETA",
            "type": "string",
            "jsonPath": ".status.eta.remaining",
            "description": "Estimated training time left at the measured throughput",
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
