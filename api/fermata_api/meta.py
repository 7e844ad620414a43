"""Names the TrainingRun API fixes: group, version, kind, and the well-known labels,
annotations, finalizers and field managers both sides rely on."""

from __future__ import annotations

API_GROUP = "fermata.dev"
API_VERSION = "v1alpha1"
KIND = "TrainingRun"
PLURAL = "trainingruns"
SINGULAR = "trainingrun"
SHORT_NAMES = ["tr"]
CATEGORIES = ["fermata"]

#: Labels the operator puts on everything it creates.
LABEL_RUN = "fermata.dev/run"
LABEL_INCARNATION = "fermata.dev/incarnation"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
MANAGED_BY = "fermata-operator"

#: Capacity type (spot / on-demand) a trainer pod was created for.
ANNOTATION_CAPACITY = "fermata.dev/capacity"
#: Set by the operator on a pod before deleting it, so the deletion is not taken for an
#: interruption.
ANNOTATION_STOP_REASON = "fermata.dev/stop-reason"

#: Finalizer on trainer pods: a pod cannot vanish before its billed time is recorded.
POD_FINALIZER = "fermata.dev/cost-accounting"

#: Field manager of the operator's own writes.
OPERATOR_FIELD_MANAGER = "fermata-operator"
#: Field manager the trainer uses for its server-side apply on ``status``.
TRAINER_FIELD_MANAGER = "fermata-trainer"
#: Field manager of the preparation pod's server-side apply on ``status.preparation`` (its own,
#: so the trainer's applies, which leave that field out, do not remove it).
PREPARER_FIELD_MANAGER = "fermata-preparer"

#: Node labels that tell a node's capacity type: label key -> {capacity type: label value}.
CAPACITY_LABELS = {
    "karpenter.sh/capacity-type": {"spot": "spot", "on-demand": "on-demand"},
    "eks.amazonaws.com/capacityType": {"spot": "SPOT", "on-demand": "ON_DEMAND"},
}
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
GPU_RESOURCE = "nvidia.com/gpu"

#: Kueue (https://kueue.sigs.k8s.io): the run's labels copied to its trainer pods, so Kueue's
#: plain-pod integration queues each one as a single-pod Workload.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_LABELS = (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)
#: The scheduling gate Kueue's pod webhook adds, and removes when the Workload is admitted.
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"
#: The pod condition Kueue sets before it deletes a pod whose Workload was evicted (preempted,
#: deactivated, its ClusterQueue stopped ...).
KUEUE_TERMINATION_CONDITION = "TerminationTarget"

#: The team budget (``TrainingBudget``): a namespaced cap on the spend of a set of runs per period.
BUDGET_KIND = "TrainingBudget"
BUDGET_PLURAL = "trainingbudgets"
BUDGET_SINGULAR = "trainingbudget"
BUDGET_SHORT_NAMES = ["tb"]
