"""What a policy can ask for: conditions, Events, a stop, a wake-up. The planner applies them."""

from __future__ import annotations

from dataclasses import dataclass, field

from fermata_api import Decision, Phase


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the run."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class SetCondition:
    """Set one standard condition (its lastTransitionTime moves only when status changes)."""

    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Stop:
    """End the run: ask the trainer to checkpoint and exit, then settle in ``phase``."""

    phase: Phase
    reason: str
    message: str
    decision: Decision | None = Decision.no_go


@dataclass
class Verdict:
    """A policy's answer for one reconcile."""

    conditions: list[SetCondition] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    stop: Stop | None = None
    #: Seconds until the policy wants to look again (a clock that is due), if any.
    wake_in: float | None = None

    def condition(self, ctype: str, status: bool, reason: str, message: str) -> Verdict:
        self.conditions.append(SetCondition(ctype, status, reason, message))
        return self

    def event(self, etype: str, reason: str, message: str) -> Verdict:
        self.events.append(Event(etype, reason, message))
        return self

    def wake(self, seconds: float | None) -> Verdict:
        if seconds is not None:
            self.wake_in = seconds if self.wake_in is None else min(self.wake_in, seconds)
        return self
