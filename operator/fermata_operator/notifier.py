"""Webhook notifications: a run's decisions, budget warnings and stops, idle stops and failures.

The controller hands over every Event it posts on a run (the same facts, at the same moment);
:func:`category` picks those a user is notified of, and :class:`Notifier` posts them as JSON —
Slack-compatible (``{"text": ...}``, for an incoming webhook) or generic (structured). Delivery
never blocks reconciliation: notifications go through a bounded queue to one background thread
(a full queue drops with a warning), each is retried with exponential backoff on connection
errors, 429 and 5xx, and each is delivered at most once per (run UID, reason, key) while the
operator runs.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

log = structlog.get_logger("fermata.notifier")

#: What a user can subscribe to (chart value notifications.webhook.events).
CATEGORIES = ("decision", "budget", "idle", "failure")
_BUDGET = frozenset(
    {
        "BudgetWarning",
        "BudgetExceeded",
        "ProjectedOverrun",
        # a team's TrainingBudget (policies/team_budget.py)
        "TeamBudgetWarning",
        "TeamBudgetExceeded",
        "TeamBudgetInsufficient",
        "TeamBudgetUnknown",
    }
)
_DECISION = frozenset({"Completed", "GateNoGo", "Plateau", "DeadlineExceeded"})
_FAILURE = frozenset({"TrainerFailed", "TooManyInterruptions"})
#: Notifications remembered for de-duplication.
_SEEN_LIMIT = 10_000


def category(reason: str, status: dict[str, Any]) -> str | None:
    """The category of an Event's reason, given the status written with it (None: not notified)."""
    if reason in _BUDGET:
        return "budget"
    if reason == "Idle":
        return "idle"
    if reason in _DECISION or reason.startswith("Gate"):
        return "decision"
    stop = status.get("stop") or {}
    if reason in _FAILURE or (stop.get("reason") == reason and stop.get("phase") == "Failed"):
        return "failure"
    return None


@dataclass(frozen=True)
class Notification:
    key: tuple[str, str, str]
    body: bytes


def payload(
    fmt: str, kind: str, run: dict[str, Any], status: dict[str, Any], etype: str, reason: str, message: str
) -> dict[str, Any]:
    """The JSON posted: ``{"text": ...}`` (slack) or the facts as fields (generic)."""
    meta = run.get("metadata") or {}
    cost = status.get("cost") or {}
    facts = {
        "category": kind,
        "type": etype,
        "reason": reason,
        "message": message,
        "run": {"name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")},
        "phase": status.get("phase"),
        "decision": status.get("decision"),
        "decisionReason": status.get("decisionReason"),
        "costUSD": cost.get("accruedUSD"),
        "budgetUSD": cost.get("budgetUSD"),
        "time": datetime.now(UTC).isoformat(),
    }
    if fmt != "slack":
        return facts
    spent = f"${float(cost.get('accruedUSD') or 0):.2f} of ${float(cost.get('budgetUSD') or 0):.2f}"
    text = (
        f"{'⚠️ ' if etype == 'Warning' else ''}TrainingRun {meta.get('namespace')}/{meta.get('name')}: "
        f"{reason}: {message} (phase {facts['phase'] or '-'}, decision {facts['decision'] or '-'}, "
        f"cost {spent})"
    )
    return {"text": text}


class Notifier:
    """Posts notifications from a bounded queue in a background thread (see the module doc)."""

    def __init__(
        self,
        url: str,
        fmt: str = "slack",
        events: tuple[str, ...] = CATEGORIES,
        *,
        queue_size: int = 1000,
        attempts: int = 6,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        timeout_seconds: float = 10.0,
    ) -> None:
        self.url, self.fmt, self.events = url, fmt, frozenset(events)
        self.attempts, self.timeout = max(1, attempts), timeout_seconds
        self.backoff, self.max_backoff = backoff_seconds, max_backoff_seconds
        self._queue: queue.Queue[Notification | None] = queue.Queue(maxsize=max(1, queue_size))
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self.delivered = 0
        self._thread = threading.Thread(target=self._work, name="fermata-notifier", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producing (any thread)

    def notify(
        self, run: dict[str, Any], status: dict[str, Any], etype: str, reason: str, message: str
    ) -> bool:
        """Queue the notification of one Event if subscribed and new; never blocks, never raises."""
        try:
            kind = category(reason, status)
            if kind is None or kind not in self.events:
                return False
            key = (str((run.get("metadata") or {}).get("uid")), reason, message)
            if not self._first(key):
                return False
            body = json.dumps(payload(self.fmt, kind, run, status, etype, reason, message)).encode()
            self._queue.put_nowait(Notification(key, body))
            return True
        except queue.Full:
            self._forget(key)
            log.warning("notification dropped: queue full", reason=reason)
        except Exception:
            log.exception("notification not queued", reason=reason)
        return False

    def _first(self, key: tuple[str, str, str]) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            while len(self._seen) > _SEEN_LIMIT:
                self._seen.popitem(last=False)
            return True

    def _forget(self, key: tuple[str, str, str]) -> None:
        with self._lock:
            self._seen.pop(key, None)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (for up to ``timeout``), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    # ------------------------------------------------------------------ delivering (its thread)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._deliver(item)
            except Exception:  # never let one notification end the thread
                log.exception("notification failed", reason=item.key[1])

    def _deliver(self, item: Notification) -> None:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            error = self._post(item.body)
            if error is None:
                self.delivered += 1
                log.info("notification delivered", reason=item.key[1], attempt=attempt)
                return
            if not error[1] or attempt == self.attempts:
                log.warning("notification not delivered", reason=item.key[1], error=error[0], attempt=attempt)
                return
            time.sleep(delay)
            delay = min(self.max_backoff, delay * 2)

    def _post(self, body: bytes) -> tuple[str, bool] | None:
        """None when delivered, else (error, whether a retry may help)."""
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                resp.read()
            return None
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}", exc.code == 429 or exc.code >= 500
        except (urllib.error.URLError, OSError) as exc:
            return str(exc)[:200], True
