"""``spec.suspend``: release the GPU and hold the run; resume later."""

from __future__ import annotations

from fermata_api import conditions as cond
from fermata_operator.policies import suspend
from fermata_operator.policies.effects import Event, SetCondition


def test_suspending_the_first_time_posts_the_event() -> None:
    v = suspend.suspending(already_suspended=False)
    assert v.events == [Event("Normal", "Suspended", "checkpointing and releasing the GPU")]
    assert v.conditions == [
        SetCondition(cond.SUSPENDED, True, "Suspended", suspend.SUSPENDED_MESSAGE),
        SetCondition(cond.READY, False, "Suspended", suspend.SUSPENDED_MESSAGE),
    ]
    assert v.stop is None and v.wake_in is None
    assert suspend.SUSPENDED_MESSAGE == "suspended: set spec.suspend=false to resume from the last checkpoint"


def test_staying_suspended_posts_no_event() -> None:
    v = suspend.suspending(already_suspended=True)
    assert v.events == []
    assert [(c.type, c.status) for c in v.conditions] == [(cond.SUSPENDED, True), (cond.READY, False)]


def test_resuming() -> None:
    v = suspend.resuming()
    assert v.events == [Event("Normal", "Resumed", "resuming from the last checkpoint")]
    assert v.conditions == [SetCondition(cond.SUSPENDED, False, "Resumed", "resumed")]
    assert v.stop is None
