"""The preparation phase: prepare the dataset on CPU capacity before the GPU pod starts.

With ``spec.preparation.mode: Pod`` (the default) a preparation pod (``<run>-prep-<n>``) scans,
verifies and filters the dataset, then decodes, resamples, segments and tokenizes it into the
code cache, writes the manifest and the cache index with their sha256 digests to storage,
verifies both, and reports ``status.preparation`` (files done of total, reused, ETA, the
manifest digest and code cache key). The training pod starts only once the preparation is
**verified**: the pod exited 0 *and* its own last report says ``Completed`` with a manifest
digest and a code cache key; the training pod is told both and must find exactly them.

* **Exit 2** (bad config or dataset): the run fails with the pod's message, no retry.
* **Exit 1** (anything else): retried with the trainer's retry policy (``spec.failures``),
  counted in ``status.preparer.failures``.
* **Interrupted** (spot, eviction, node gone, deleted by someone else): re-created after the
  spot backoff, counted in ``status.preparer.interruptions`` against ``spot.maxInterruptions``;
  the next pod resumes from the code cache the earlier one left.
* **Idle**: a preparation pod whose report is stale for ``idle.timeout`` (counted from its start
  until the first report), or a preparation running longer than ``idle.preparationTimeout``
  (from the first preparation pod's start), is stopped: phase ``IdleStopped``.

Mode ``Trainer``, a run whose training pod exists already (it started before the preparation
phase existed, or was switched to Pod mid-run), or one whose preparation is verified, skips
all of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fermata_api import (
    Phase,
    PreparationMode,
    PreparationReport,
    PreparationState,
    PreparerStatus,
    TrainingRunSpec,
    TrainingRunStatus,
    parse_duration,
)
from fermata_api import conditions as cond
from fermata_api.spec import IdleSpec
from fermata_operator.policies import retry, spot
from fermata_operator.policies.effects import Stop, Verdict
from fermata_operator.policies.pod_outcome import Outcome

#: How long a preparation pod that exited 0 may take for its own "Completed" report to be seen
#: (the report is written before it exits; a watch cache may show the pod's end first).
REPORT_GRACE_SECONDS = 30.0


def required(spec: TrainingRunSpec, st: TrainingRunStatus) -> bool:
    """Whether the run must (still) prepare in a pod of its own before training."""
    if spec.preparation.mode is not PreparationMode.pod:
        return False
    if st.preparer is not None and st.preparer.prepared:
        return False
    # The training pod exists or existed: it prepares itself (or already has).
    return st.pod is None and st.last_checkpoint is None and st.incarnation == 0


def own_report(report: PreparationReport | None, pod_name: str) -> PreparationReport | None:
    """The report, if the pod ``pod_name`` sent it (an earlier pod's says nothing of this one)."""
    return report if report is not None and report.pod_name == pod_name else None


def progress_message(report: PreparationReport | None, pod_name: str) -> str:
    """``tokenizing: 12/40 files (5 reused), ETA 30s`` — what the run's message says."""
    if report is None:
        return f"preparing the dataset in {pod_name}: waiting for its first report"
    text = f"preparing the dataset in {pod_name}: {report.state.value.lower()}"
    if report.files_total:
        text += f" {report.files_done}/{report.files_total} files"
        if report.reused:
            text += f" ({report.reused} reused)"
    if report.eta_seconds is not None and report.state is PreparationState.tokenizing:
        text += f", ETA {report.eta_seconds:.0f}s"
    return text


@dataclass(frozen=True)
class Completion:
    """The verdict on a preparation pod that exited 0."""

    verified: bool
    #: Not verified yet, but its report may still be on its way: look again soon.
    wait: bool
    message: str
    manifest_digest: str | None = None
    codes_key: str | None = None


def on_success(
    report: PreparationReport | None, pod_name: str, outcome: Outcome, now: datetime
) -> Completion:
    """A preparation pod exited 0: verified only by its own Completed report with both digests."""
    mine = own_report(report, pod_name)
    if (
        mine is not None
        and mine.state is PreparationState.completed
        and mine.manifest_digest
        and mine.codes_key
    ):
        return Completion(
            True,
            False,
            f"dataset prepared by {pod_name}: {mine.files_total} files "
            f"({mine.tokenized} tokenized, {mine.reused} reused), manifest {mine.manifest_digest}, "
            f"codes {mine.codes_key}",
            mine.manifest_digest,
            mine.codes_key,
        )
    finished = outcome.finished or now
    if (now - finished).total_seconds() < REPORT_GRACE_SECONDS:
        return Completion(False, True, f"{pod_name} exited 0: waiting for its verified report")
    return Completion(
        False,
        False,
        f"preparation pod {pod_name} exited 0 without reporting a verified dataset "
        "(status.preparation: Completed with manifestDigest and codesKey)",
    )


def idle(
    spec: IdleSpec,
    report: PreparationReport | None,
    pod_started: datetime,
    preparation_started: datetime,
    now: datetime,
) -> Verdict:
    """The idle verdict for a running preparation pod (``report``: its own, or None)."""
    timeout = parse_duration(spec.timeout)
    allowance = parse_duration(spec.preparation_timeout)
    heartbeat = report.heartbeat_time if report is not None else None
    stale = (now - (max(heartbeat, pod_started) if heartbeat else pod_started)).total_seconds()
    preparing = (now - preparation_started).total_seconds()
    v = Verdict()
    found: tuple[str, str] | None = None
    if stale >= timeout:
        found = (
            "HeartbeatStale",
            f"no report from the preparation pod for {stale:.0f}s (idle timeout {spec.timeout})",
        )
    elif preparing >= allowance:
        found = (
            "PreparationTooLong",
            (f"still preparing after {preparing:.0f}s (idle.preparationTimeout {spec.preparation_timeout})"),
        )
    if found is not None:
        reason, message = found
        v.condition(cond.IDLE, True, reason, message)
        v.stop = Stop(Phase.idle_stopped, "Idle", message)
        return v
    v.condition(cond.IDLE, False, "Preparing", "preparing the dataset")
    return v.wake(max(1.0, min(timeout - stale, allowance - preparing)))


def on_failure(
    spec: TrainingRunSpec, tracking: PreparerStatus, pod_name: str, outcome: Outcome
) -> tuple[Verdict, float]:
    """A preparation pod failed (exit 1, OOM): counted (already) in ``tracking.failures`` and
    retried like the trainer (``spec.failures``), or the run fails."""
    named = Outcome(
        outcome.kind,
        outcome.reason,
        f"preparation pod {pod_name}: {outcome.message}",
        outcome.exit_code,
        outcome.termination_notice,
        outcome.started,
        outcome.finished,
    )
    return retry.on_failure(spec, tracking.failures, named)


def on_interruption(
    spec: TrainingRunSpec, tracking: PreparerStatus, pod_name: str, outcome: Outcome
) -> tuple[Verdict, float]:
    """A preparation pod was taken away (already counted in ``tracking.interruptions``): re-create
    it after the spot backoff (it resumes from the code cache), or fail past maxInterruptions."""
    return spot.on_interruption(spec, tracking.interruptions, pod_name, outcome)


def on_config_error(pod_name: str, outcome: Outcome) -> Verdict:
    """Exit 2 (config or dataset error): the run fails with the pod's message."""
    named = Outcome(
        outcome.kind,
        "PreparationConfigError",
        f"preparation pod {pod_name}: {outcome.message}",
        outcome.exit_code,
        False,
        outcome.started,
        outcome.finished,
    )
    return retry.on_config_error(named)
