"""Idle detection: a running trainer that does not train is stopped after ``idle.timeout``.

A run counts as idle when, for the whole timeout, any of these holds:

* **stale heartbeat** — no report from the trainer (measured from the pod's start until the
  first report arrives, so a trainer that never reports is caught too);
* **no progress** — ``progress.step`` has not advanced;
* **low GPU** — ``progress.gpuUtilization`` stayed under ``idle.minGpuUtilization``.

While the trainer reports ``Preparing`` or ``Tokenizing`` its step cannot advance and the GPU
is unused by design: then only a stale heartbeat counts, and preparation itself is allowed
``idle.preparationTimeout`` (reason ``PreparationTooLong`` beyond it). The step and GPU clocks
start again when training starts.

A pod waiting for a node (Pending) is *not* idle: that is the ``WaitingForCapacity``
condition. The clocks live in ``status.idleTracking`` so an operator restart keeps them.
"""

from __future__ import annotations

from datetime import datetime

from fermata_api import IdleSpec, IdleTracking, Phase, TrainerProgress, TrainerState, parse_duration
from fermata_api import conditions as cond
from fermata_operator.policies.effects import Stop, Verdict

PREPARING_STATES = {TrainerState.preparing, TrainerState.tokenizing}


def _clocks(
    spec: IdleSpec, progress: TrainerProgress | None, t: IdleTracking, started: datetime, now: datetime
) -> IdleTracking:
    """Advance the tracking clocks with this report."""
    preparing = progress is not None and progress.state in PREPARING_STATES
    if preparing:
        # Preparation began with the pod unless training was seen before it.
        since = t.preparing_since or (started if t.step_since is None else now)
        return t.model_copy(
            update={
                "preparing_since": since,
                "step": progress.step if progress else None,
                "step_since": now,
                "low_gpu_since": None,
            }
        )
    update: dict[str, object] = {"preparing_since": None}
    step = progress.step if progress is not None else None
    if step is not None and step != t.step:
        update |= {"step": step, "step_since": now}
    gpu = progress.gpu_utilization if progress is not None else None
    if gpu is not None and gpu < spec.min_gpu_utilization:
        update["low_gpu_since"] = t.low_gpu_since or now
    else:
        update["low_gpu_since"] = None
    return t.model_copy(update=update)


def _idle(
    spec: IdleSpec, progress: TrainerProgress | None, t: IdleTracking, started: datetime, now: datetime
) -> tuple[str, str] | list[float]:
    """(reason, message) if idle, else the seconds left on each running clock."""
    timeout = parse_duration(spec.timeout)
    heartbeat = progress.heartbeat_time if progress is not None else None
    stale = (now - (max(heartbeat, started) if heartbeat else started)).total_seconds()
    if stale >= timeout:
        return "HeartbeatStale", f"no report from the trainer for {stale:.0f}s (idle timeout {spec.timeout})"
    if t.preparing_since is not None:
        allowance = parse_duration(spec.preparation_timeout)
        preparing = (now - t.preparing_since).total_seconds()
        if preparing >= allowance:
            return "PreparationTooLong", (
                f"still {progress.state.value if progress else 'preparing'} after {preparing:.0f}s "
                f"(idle.preparationTimeout {spec.preparation_timeout})"
            )
        return [timeout - stale, allowance - preparing]
    stalled = (now - max(t.step_since or started, started)).total_seconds()
    if stalled >= timeout:
        return (
            "NoProgress",
            f"step {t.step} has not advanced for {stalled:.0f}s (idle timeout {spec.timeout})",
        )
    waits = [timeout - stale, timeout - stalled]
    if t.low_gpu_since is not None:
        low = (now - t.low_gpu_since).total_seconds()
        if low >= timeout:
            gpu = progress.gpu_utilization if progress is not None else None
            return "LowGpuUtilization", (
                f"GPU utilisation {gpu or 0:.0%} under {spec.min_gpu_utilization:.0%} for {low:.0f}s "
                f"(idle timeout {spec.timeout})"
            )
        waits.append(timeout - low)
    return waits


def evaluate(
    spec: IdleSpec,
    progress: TrainerProgress | None,
    tracking: IdleTracking | None,
    pod_name: str,
    pod_started: datetime,
    now: datetime,
) -> tuple[Verdict, IdleTracking]:
    """The idle verdict for the running pod ``pod_name`` and the clocks to keep."""
    t = tracking if tracking is not None and tracking.pod == pod_name else IdleTracking(pod=pod_name)
    if progress is not None and progress.pod_name not in (None, pod_name):
        progress = None  # reports from an earlier pod do not count for this one
    t = _clocks(spec, progress, t, pod_started, now)
    found = _idle(spec, progress, t, pod_started, now)
    v = Verdict()
    if isinstance(found, tuple):
        reason, message = found
        v.condition(cond.IDLE, True, reason, message)
        v.stop = Stop(Phase.idle_stopped, "Idle", message)
        return v, t
    active = "Preparing" if t.preparing_since is not None else "Active"
    v.condition(cond.IDLE, False, active, "preparing" if active == "Preparing" else "training is progressing")
    return v.wake(max(1.0, min(found))), t
