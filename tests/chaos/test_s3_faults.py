"""S3 trouble under the real trainer: errors (503 SlowDown), the server stopped, slow and reset
connections — through the fixture's fault proxy, which the trainer's credentials point at.

Invariants: at every moment the newest checkpoint manifest in the bucket verifies (every object
it lists exists with its size and sha256), and so does the one ``status.lastCheckpoint`` names;
while checkpoints cannot be written the run says so in ``status.progress.message``; when S3 is
back, checkpoints resume, the message clears and the run is still Running.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fermata_dev.kubelet import LocalKubelet
from fermata_dev.synthetic import make_mtat_tree
from tests.chaos.test_trainer_interruptions import trainer_spec, upload_tree
from tests.e2e.conftest import OperatorProcess, Runs, wait_for
from tests.s3_fixture import S3Server, s3_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.chaos, pytest.mark.cluster, pytest.mark.trainer]

#: How the trainer says it cannot reach storage (retrying) or could not write a checkpoint.
FAILED = ("storage trouble", "checkpoint failed")


class ManifestChecker:
    """Verifies the newest manifest under ``prefix`` whenever the bucket's listing changes."""

    def __init__(self, s3: S3Server, bucket: str, prefix: str) -> None:
        self.client = s3.client(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
        self.bucket, self.prefix = bucket, prefix
        self.violations: list[str] = []
        self.verified: set[str] = set()
        self._seen: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="manifest-checker")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.check()
            except Exception:  # the server is down or the checkpoint moved on: look again later
                continue

    def listing(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self.client.list_objects_v2(**kw)
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def verify(self, manifest_key: str, digest: str | None = None) -> str | None:
        """None if the checkpoint verifies, else what is wrong."""
        body = self.client.get_object(Bucket=self.bucket, Key=manifest_key)["Body"].read()
        if digest is not None and f"sha256:{hashlib.sha256(body).hexdigest()}" != digest:
            return f"{manifest_key}: digest differs from status.lastCheckpoint {digest}"
        manifest = json.loads(body)
        base = manifest_key.rsplit("/", 1)[0]
        for obj in manifest["objects"]:
            data = self.client.get_object(Bucket=self.bucket, Key=f"{base}/{obj['name']}")["Body"].read()
            if len(data) != obj["size"] or hashlib.sha256(data).hexdigest() != obj["sha256"]:
                return f"{manifest_key}: object {obj['name']} does not match its manifest"
        return None

    def check(self) -> None:
        listing = self.listing()
        manifests = sorted(k for k in listing if k.endswith("/manifest.json"))
        if not manifests:
            return
        newest = manifests[-1]
        fingerprint = json.dumps(
            sorted((k, v["ETag"]) for k, v in listing.items() if k.startswith(newest.rsplit("/", 1)[0]))
        )
        if fingerprint == self._seen:
            return
        try:
            problem = self.verify(newest)
        except self.client.exceptions.NoSuchKey:
            # Listed a moment ago, gone now: only pruning deletes, and never the newest one.
            problem = f"{newest}: listed as newest but an object is missing"
        if problem is not None:
            self.violations.append(f"{time.strftime('%H:%M:%S')} {problem}")
        else:
            self.verified.add(newest)
        self._seen = fingerprint


def test_s3_faults_leave_a_verified_latest_checkpoint_and_a_clear_message(
    runs: Runs,
    operator_factory: Any,
    kubelet: LocalKubelet,
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    bucket = s3_server.make_bucket("chaos-s3")
    data = upload_tree(
        s3_server, bucket, make_mtat_tree(tmp_path / "mtat", clips=8, seconds=(2.5, 3.0)).root, "mtat"
    )
    faults = s3_server.faults
    faults.passthrough()
    # The trainer reaches S3 only through the fault proxy.
    env = s3_server.env(faults=True)
    secret = {k: v for k, v in env.items() if k.startswith("AWS_") and k != "AWS_DEFAULT_REGION"}
    runs.core.create_namespaced_secret(runs.ns, {"metadata": {"name": "s3-creds"}, "stringData": secret})
    kubelet.executables["fermata-train"] = str(Path(sys.executable).parent / "fermata-train")
    kubelet.set_mode("exec")
    op: OperatorProcess = operator_factory(runs.ns, FERMATA_TRAINER_HEARTBEAT_SECONDS="0.5")
    runs.create(
        "s3",
        trainer_spec(
            data,
            bucket,
            "s3",
            maxSteps=100_000,
            epochs=10_000,
            checkpointEverySteps=3,
            evaluateEverySteps=100_000,
        ),
    )
    checker = ManifestChecker(s3_server, bucket, "runs/s3/checkpoints/")
    timeline: list[str] = []

    def progress() -> dict[str, Any]:
        return dict(runs.status("s3").get("progress") or {})

    def checkpoint_step() -> int:
        return int((runs.status("s3").get("lastCheckpoint") or {}).get("step") or 0)

    def recovered(after: int) -> bool:
        st = runs.status("s3")
        msg = (st.get("progress") or {}).get("message") or ""
        return st.get("phase") == "Running" and not msg.startswith(FAILED) and checkpoint_step() > after

    try:
        wait_for(lambda: checkpoint_step() >= 3, timeout=120, what="a first checkpoint")
        checker.start()
        for fault, apply, undo, until in (
            # Long enough to exhaust the trainer's retries: a checkpoint fails outright.
            ("503 SlowDown", lambda: faults.http_error(503, "SlowDown"), faults.passthrough, FAILED[1]),
            ("server stopped", s3_server.stop, s3_server.start, FAILED[0]),
            ("connections reset", faults.drop, faults.passthrough, FAILED[0]),
        ):
            before = checkpoint_step()
            timeline.append(f"{time.strftime('%H:%M:%S')} {fault}: on")
            apply()
            t = time.monotonic()
            st = wait_for(
                lambda until=until: (p := progress()).get("message", "")
                and p["message"].startswith(until)
                and p,
                timeout=60,
                interval=0.3,
                what=f"the run to report {until!r} ({fault})",
            )
            timeline.append(
                f"{time.strftime('%H:%M:%S')} {fault}: reported after {time.monotonic() - t:.1f}s: {st['message'][:200]}"
            )
            assert runs.status("s3").get("phase") == "Running"
            time.sleep(1.0)
            undo()
            t = time.monotonic()
            wait_for(
                lambda before=before: recovered(before), timeout=60, interval=0.3, what=f"recovery ({fault})"
            )
            timeline.append(
                f"{time.strftime('%H:%M:%S')} {fault}: recovered {time.monotonic() - t:.1f}s after the fault ended"
            )
        # Slow S3: checkpoints take longer but succeed, and nothing is reported as failing.
        before = checkpoint_step()
        faults.latency(0.05)
        wait_for(lambda: checkpoint_step() > before, timeout=60, what="a checkpoint over a slow link")
        assert not (progress().get("message") or "").startswith(FAILED)
        faults.passthrough()
        timeline.append("latency 50 ms/chunk: checkpoint written")
    finally:
        faults.passthrough()
        if not s3_server.running:
            s3_server.start()
        checker.stop()
        print("\n".join(timeline))
    # One last look with everything healthy: the newest manifest and the one in status verify.
    checker.check()
    last = runs.status("s3")["lastCheckpoint"]
    key = last["uri"].split(f"s3://{bucket}/", 1)[1]
    assert checker.verify(key, last["digest"]) is None
    assert not checker.violations, checker.violations
    assert len(checker.verified) >= 3, checker.verified
    st = runs.status("s3")
    assert st["phase"] == "Running" and st.get("failures", 0) == 0, st.get("message")
    assert "Traceback" not in op.log()
