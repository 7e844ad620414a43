"""Idle detection: a running trainer that does not train is stopped after ``idle.timeout``.

A run counts as idle when, for the whole timeout, any of these holds:

* **stale heartbeat** — no report from the trainer (measured from the pod's start until the
  first report arrives, so a trainer that never reports is caught too);
* **no progress** — ``progress.step`` has not advanced;
* **low GPU** — ``progress.gpuUtilization`` stayed under ``idle.minGpuUtilization``.

A pod waiting for a node (Pending) is *not* idle: that is reported by the
``WaitingForCapacity`` condition instead. The tracking state (last step seen and since when,
low-GPU since when) lives in ``status.idleTracking`` so an operator restart keeps the clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fermata_operator.api import IdleSpec, IdleTracking
from fermata_trainer.contract import TrainerProgress, parse_duration


@dataclass(frozen=True)
class IdleVerdict:
    idle: bool
    reason: str
    message: str
    tracking: IdleTracking
    #: Seconds until the earliest idle clock would fire (for the next wake-up).
    wake_in: float | None


def evaluate(
    spec: IdleSpec,
    progress: TrainerProgress | None,
    tracking: IdleTracking | None,
    pod_name: str,
    pod_started: datetime,
    now: datetime,
) -> IdleVerdict:
    timeout = parse_duration(spec.timeout)
    t = tracking if tracking is not None and tracking.pod == pod_name else IdleTracking(pod=pod_name)
    # Reports from an earlier pod do not count for this one.
    if progress is not None and progress.pod_name not in (None, pod_name):
        progress = None

    heartbeat = progress.heartbeat_time if progress is not None else None
    last_alive = max(heartbeat, pod_started) if heartbeat else pod_started
    stale = (now - last_alive).total_seconds()

    step = progress.step if progress is not None else None
    if step is not None and step != t.step:
        t = t.model_copy(update={"step": step, "step_since": now})
    step_since = t.step_since or pod_started
    stalled = (now - max(step_since, pod_started)).total_seconds()

    gpu = progress.gpu_utilization if progress is not None else None
    if gpu is not None and gpu < spec.min_gpu_utilization:
        if t.low_gpu_since is None:
            t = t.model_copy(update={"low_gpu_since": now})
    elif t.low_gpu_since is not None:
        t = t.model_copy(update={"low_gpu_since": None})
    low_gpu = (now - t.low_gpu_since).total_seconds() if t.low_gpu_since else 0.0

    if stale >= timeout:
        return IdleVerdict(
            True,
            "HeartbeatStale",
            f"no report from the trainer for {stale:.0f}s (idle timeout {spec.timeout})",
            t,
            None,
        )
    if stalled >= timeout:
        return IdleVerdict(
            True,
            "NoProgress",
            f"step {step} has not advanced for {stalled:.0f}s (idle timeout {spec.timeout})",
            t,
            None,
        )
    if t.low_gpu_since is not None and low_gpu >= timeout:
        return IdleVerdict(
            True,
            "LowGpuUtilization",
            f"GPU utilisation {gpu:.0%} under {spec.min_gpu_utilization:.0%} for {low_gpu:.0f}s "
            f"(idle timeout {spec.timeout})",
            t,
            None,
        )
    waits = [timeout - stale, timeout - stalled]
    if t.low_gpu_since is not None:
        waits.append(timeout - low_gpu)
    return IdleVerdict(False, "Active", "training is progressing", t, max(0.0, min(waits)))
