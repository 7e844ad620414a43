"""The webhook notifier against a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fermata_operator.notifier import Notifier, category

RUN = {"metadata": {"name": "demo", "namespace": "ml", "uid": "uid-1"}}
STATUS = {
    "phase": "Stopped",
    "decision": "NO-GO",
    "decisionReason": "val loss 4.1 > 3.5",
    "cost": {"accruedUSD": 12.5, "budgetUSD": 600.0},
    "stop": {"phase": "Stopped", "reason": "GateNoGo"},
}


class Hook:
    """A webhook that answers the queued status codes first, then 200."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.attempts += 1
                code = hook.answers.pop(0) if hook.answers else 200
                if code == 200:
                    hook.received.append(json.loads(body))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.server.shutdown()
    h.server.server_close()


def test_categories() -> None:
    assert category("GateNoGo", STATUS) == "decision"
    assert category("GateConditionalGo", {}) == "decision"
    assert category("Completed", {}) == "decision"
    assert category("BudgetWarning", {}) == "budget"
    assert category("BudgetExceeded", {}) == "budget"
    from fermata_operator.policies import team_budget

    for reason in (team_budget.WARNING, team_budget.EXCEEDED, team_budget.INSUFFICIENT, team_budget.UNKNOWN):
        assert category(reason, {}) == "budget"
    assert category("Idle", {}) == "idle"
    assert category("TrainerFailed", {}) == "failure"
    assert category("ConfigError", {"stop": {"reason": "ConfigError", "phase": "Failed"}}) == "failure"
    for quiet in ("PodCreated", "Running", "CleanedUp", "SpecChanged"):
        assert category(quiet, {}) is None


def test_slack_text_retried_after_a_500_and_delivered_once(hook: Hook) -> None:
    hook.answers = [500]
    n = Notifier(hook.url, "slack", backoff_seconds=0.05)
    assert n.notify(RUN, STATUS, "Warning", "GateNoGo", "gate q: val loss 4.1 > 3.5")
    assert not n.notify(RUN, STATUS, "Warning", "GateNoGo", "gate q: val loss 4.1 > 3.5")  # same event
    got = hook.wait(1)
    n.close()
    assert hook.attempts == 2 and n.delivered == 1 and len(got) == 1
    text = got[0]["text"]
    for fact in (
        "ml/demo",
        "GateNoGo",
        "val loss 4.1",
        "phase Stopped",
        "decision NO-GO",
        "$12.50 of $600.00",
    ):
        assert fact in text, (fact, text)


def test_generic_json_and_event_filter(hook: Hook) -> None:
    n = Notifier(hook.url, "generic", ("failure",), backoff_seconds=0.05)
    assert not n.notify(RUN, STATUS, "Warning", "GateNoGo", "not subscribed")
    assert n.notify(RUN, {**STATUS, "phase": "Failed"}, "Warning", "TrainerFailed", "exit 1")
    got = hook.wait(1)
    n.close()
    assert got == [
        {
            **got[0],
            "category": "failure",
            "type": "Warning",
            "reason": "TrainerFailed",
            "message": "exit 1",
            "run": {"name": "demo", "namespace": "ml", "uid": "uid-1"},
            "phase": "Failed",
            "decision": "NO-GO",
            "costUSD": 12.5,
            "budgetUSD": 600.0,
        }
    ]


def test_gives_up_on_a_4xx_and_never_blocks(hook: Hook) -> None:
    hook.answers = [404]
    n = Notifier(hook.url, "slack", backoff_seconds=0.05, queue_size=1)
    started = time.monotonic()
    queued = [n.notify(RUN, STATUS, "Warning", "Idle", f"idle {i}") for i in range(50)]
    assert time.monotonic() - started < 1.0  # a full queue drops, it does not wait
    assert queued[0] and not all(queued)
    n.close()
    # The 404 was not retried; what else fitted in the queue was delivered.
    assert hook.attempts == 1 + len(hook.received)
    assert not any("idle 0" in r["text"] for r in hook.received)


def test_an_unreachable_hook_is_retried_then_given_up() -> None:
    n = Notifier("http://127.0.0.1:9/none", "slack", attempts=3, backoff_seconds=0.01, timeout_seconds=1)
    assert n.notify(RUN, STATUS, "Warning", "BudgetExceeded", "over budget")
    n.close()
    assert n.delivered == 0
