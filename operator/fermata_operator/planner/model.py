"""What the planner takes in (:class:`Observed`) and gives back (:class:`Plan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fermata_operator.policies.effects import Event
from fermata_operator.policies.prices import PriceTable
from fermata_operator.policies.team_budget import BudgetFacts

#: Status keys the trainer (and the preparation pod: ``preparation``) owns; the operator never
#: writes them.
TRAINER_KEYS = frozenset({"progress", "lastCheckpoint", "artifacts", "preparation"})


@dataclass
class Observed:
    """One run and the facts around it, as read from the API (watch caches) before planning."""

    run: dict[str, Any]
    pods: list[dict[str, Any]]
    #: Nodes by name (only those the pods run on need to be present).
    nodes: dict[str, dict[str, Any]]
    #: Node names confirmed gone (404), not merely absent from a cache.
    missing_nodes: set[str]
    #: Prices resolved for this run before planning (overrides come from the spec).
    prices: PriceTable
    now: datetime
    #: Operator-owned status fields someone else rewrote since our last write (the status was
    #: restored from that write before planning).
    tampered: list[str] = field(default_factory=list)
    #: The run's namespace is being deleted: pods going away are not interruptions.
    namespace_terminating: bool = False
    #: The team budgets (TrainingBudgets) that select this run, resolved before planning.
    team_budgets: list[BudgetFacts] = field(default_factory=list)


@dataclass
class Plan:
    """What to do: the operator-owned status to write, objects to create, pods to stop,
    finalizers to release, Events to post, and when to look again."""

    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    #: (pod name, stop reason)
    stop_pods: list[tuple[str, str]] = field(default_factory=list)
    #: The UID of every pod named in stop_pods / release_finalizers: only that object is touched.
    uids: dict[str, str] = field(default_factory=dict)
    release_finalizers: list[str] = field(default_factory=list)
    #: Of those, the ones released because they never started: only if a fresh read agrees (a
    #: stale cache may not show a start yet, and a start not seen is cost lost).
    release_if_unstarted: set[str] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    #: A finished run's objects to delete (spec.ttlSecondsAfterFinished), as (kind, name): only
    #: those the run controls (pods by the UID in ``uids``, the rest by their owner reference).
    cleanup: list[tuple[str, str]] = field(default_factory=list)
    #: Delete the TrainingRun itself (spec.cleanup.deleteRun), after everything else.
    delete_run: bool = False
