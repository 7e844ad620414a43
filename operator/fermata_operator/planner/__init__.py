"""The reconcile planner: from what is observed to what should be done. No I/O here.

:func:`plan` takes one TrainingRun, its pods and their nodes (and the prices resolved for it)
and returns a :class:`Plan`: the operator-owned status to write, the objects to create, the pods
to stop, the finalizers to release and the Events to post. :mod:`fermata_operator.controller`
carries plans out.

Level-triggered and restart-safe: everything the planner needs to remember lives in the run's
status (incarnation, counters, closed cost spans, idle clocks, pending gates, the stop being
carried out); pods are named ``<run>-<incarnation>``, so a repeated create is a harmless
conflict.
"""

from fermata_operator.planner.context import operator_status, read_status
from fermata_operator.planner.lifecycle import plan
from fermata_operator.planner.model import TRAINER_KEYS, Observed, Plan
from fermata_operator.planner.pods import refused
from fermata_operator.planner.writes import first_write_hold, merge_patch, status_changed

__all__ = [
    "TRAINER_KEYS",
    "Observed",
    "Plan",
    "first_write_hold",
    "merge_patch",
    "operator_status",
    "plan",
    "read_status",
    "refused",
    "status_changed",
]
