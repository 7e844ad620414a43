"""``kubectl fermata`` against the real control plane, with the operator running the run.

The run's storage is a local folder holding what the real trainer code writes there: TensorBoard
events (``TensorBoardSink``, mirrored to ``<checkpoints>/tensorboard/``) and a checkpoint with its
``metrics.json`` (``CheckpointStore``); the trainer's progress is reported with the trainer's own
``KubernetesStatusReporter``. The plugin is run as kubectl runs it: ``kubectl fermata ...`` finds
``kubectl-fermata`` on ``PATH``.

``logs`` asks the API server for the pod's log, which the API server fetches from the node's
kubelet. The test kubelet serves no log endpoint (and the test API server would dial the node's
host name), so here ``logs`` is checked for the pod it picks and for how it reports the API
server's answer; the log text itself is never fetched in these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fermata_dev.cluster import LocalControlPlane
from fermata_dev.kubelet import LocalKubelet
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for

ROOT = Path(__file__).resolve().parents[2]


def kubectl_fermata(
    control_plane: LocalControlPlane, kubeconfig: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``kubectl fermata ARGS`` with kubectl-fermata (the console script) first on PATH."""
    scripts = Path(sys.executable).parent
    assert (scripts / "kubectl-fermata").exists(), "install the package: pip install -e ."
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), PATH=f"{scripts}:{os.environ.get('PATH', '')}")
    kubectl = ROOT / "tests" / "cluster" / "bin" / "kubectl"
    if not kubectl.exists():
        kubectl.symlink_to(control_plane.binary.name)
    return subprocess.run(
        [str(kubectl), "fermata", *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd
    )


def _write_trainer_outputs(storage_dir: Path, work: Path) -> Any:
    """TensorBoard events and a checkpoint, written by the trainer's own classes."""
    from fermata_trainer.checkpoints import CheckpointStore
    from fermata_trainer.storage import open_storage
    from fermata_trainer.telemetry import TensorBoardSink

    storage = open_storage(str(storage_dir))
    tb = TensorBoardSink(work / "tensorboard", storage.child("tensorboard"))
    evaluations: list[dict[str, Any]] = [
        {"step": 0, "validationLoss": 3.6, "authenticity": 0.2, "baseline": True},
    ]
    tb.scalars(0, {"validation/loss": 3.6, "authenticity/score": 0.2})
    for step in range(1, 41):
        tb.scalars(step, {"train/loss": 3.6 - 0.015 * step})
        if step % 10 == 0:
            val, auth = 3.6 - 0.012 * step, 0.2 + 0.006 * step
            tb.scalars(step, {"validation/loss": val, "authenticity/score": auth})
            evaluations.append({"step": step, "validationLoss": val, "authenticity": auth, "baseline": False})
    tb.close()
    metrics = work / "metrics.json"
    metrics.write_text(
        json.dumps(
            {
                "step": 40,
                "baselineValidationLoss": 3.6,
                "evaluations": evaluations,
                "trainLoss": [3.6 - 0.015 * s for s in range(31, 41)],
            }
        )
    )
    weights = work / "lm.pt"
    weights.write_bytes(b"\0" * 1024)
    store = CheckpointStore(storage, keep_last=3, local_dir=work / "checkpoints")
    return store.write(40, 0, "periodic", {"metrics.json": metrics, "lm.pt": weights})


@pytest.mark.cluster
def test_status_report_suspend_resume_logs(
    runs: Runs,
    operator: OperatorProcess,
    kubelet: LocalKubelet,
    control_plane: LocalControlPlane,
    kubeconfig: Path,
    k8s_api: Any,
    tmp_path: Path,
) -> None:
    from fermata_api import RunRef, TrainerProgress, TrainerState, TrainerStatus
    from fermata_trainer.reporter import KubernetesStatusReporter

    storage_dir = tmp_path / "storage"
    runs.create(
        "plug",
        spec(
            storage={"checkpoints": str(storage_dir)},
            # $180/h: 5 cents a second, so the cost curve moves during the test.
            budget={
                "maxUSD": 5,
                "prices": [{"instanceType": "g4dn.xlarge", "capacityType": "spot", "hourlyUSD": 180}],
            },
            gates=[
                {
                    "name": "early",
                    "at": {"step": 30},
                    "require": {"maxValidationLoss": 3.5, "minAuthenticity": 0.3, "maxCostUSD": 4},
                    "onNoGo": "continue",
                },
                {"name": "week-5", "at": {"elapsed": "35d"}, "require": {"minAuthenticity": 0.35}},
            ],
        ),
    )
    wait_for(lambda: runs.status("plug").get("phase") == "Running", timeout=60, what="Running")

    # Before any trainer report: the status command already works.
    proc = kubectl_fermata(control_plane, kubeconfig, "status", "plug", "-n", runs.ns)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "no report from the trainer yet" in proc.stdout and "checkpoint   none yet" in proc.stdout

    ref = _write_trainer_outputs(storage_dir, tmp_path / "trainer-work")
    run = runs.get("plug")
    reporter = KubernetesStatusReporter(
        RunRef(name="plug", namespace=runs.ns, uid=run["metadata"]["uid"]), api_client=k8s_api
    )
    reporter.apply(
        TrainerStatus(
            progress=TrainerProgress(
                state=TrainerState.training,
                heartbeat_time=datetime.now(UTC),
                pod_name="plug-0",
                step=40,
                total_steps=100,
                epoch=0,
                train_loss=3.0,
                validation_loss=3.12,
                validation_perplexity=22.6,
                baseline_validation_loss=3.6,
                evaluated_step=40,
                authenticity=0.44,
            ),
            last_checkpoint=ref,
        )
    )
    wait_for(
        lambda: any(g["name"] == "early" for g in runs.status("plug").get("gates") or []),
        timeout=30,
        what="gate early evaluated",
    )

    proc = kubectl_fermata(control_plane, kubeconfig, "status", "plug", "-n", runs.ns)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    print(out)
    assert out.startswith(f"plug ({runs.ns})  Running  GO")
    assert "of $5.00  [" in out and "$180.00/h" in out and "40.0%  step 40/100  epoch 0  Training" in out
    assert "train 3.0000  val 3.1200 @ step 40  baseline 3.6000" in out
    assert "authenticity 0.440" in out
    assert "checkpoint   step 40, " in out and ref.uri in out
    assert "pod          plug-0 on " in out and "(g4dn.xlarge, spot)" in out
    assert "interruptions 0/10  failures 0/0" in out

    png = tmp_path / "report.png"
    proc = kubectl_fermata(control_plane, kubeconfig, "report", "plug", "-n", runs.ns, "-o", str(png))
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    report = proc.stdout
    assert "early   GO" in report and "3.120 <= 3.500" in report and "0.440 >= 0.300" in report
    assert "week-5  pending   at elapsed 35d" in report
    assert "losses from TensorBoard events in" in report and "40 train points, 5 evaluations" in report
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Without TensorBoard files the report falls back to the checkpoint's metrics.json.
    shutil.rmtree(storage_dir / "tensorboard")
    proc = kubectl_fermata(control_plane, kubeconfig, "report", "plug", "-n", runs.ns, "--no-plot")
    assert proc.returncode == 0, proc.stderr
    assert "metrics.json of checkpoint step 40: 10 train points, 4 evaluations" in proc.stdout

    proc = kubectl_fermata(control_plane, kubeconfig, "suspend", "plug", "-n", runs.ns)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "suspend requested" in proc.stdout
    assert runs.get("plug")["spec"]["suspend"] is True
    wait_for(lambda: runs.status("plug").get("phase") == "Suspended", timeout=90, what="Suspended")
    proc = kubectl_fermata(control_plane, kubeconfig, "status", "plug", "-n", runs.ns)
    print(proc.stdout)
    assert proc.stdout.startswith(f"plug ({runs.ns})  Suspended")
    assert "Suspended=True" in proc.stdout  # a condition that is not OK is listed
    proc = kubectl_fermata(control_plane, kubeconfig, "suspend", "plug", "-n", runs.ns)
    assert proc.returncode == 0 and "already suspended" in proc.stdout
    # logs: asked of the API server for the run's pod, which suspension deleted (a running pod's
    # log would be fetched from its node's kubelet, which the test kubelet does not serve).
    proc = kubectl_fermata(control_plane, kubeconfig, "logs", "plug", "-n", runs.ns, "--tail", "20")
    assert proc.returncode == 1, proc.stderr
    print(proc.stderr)
    assert proc.stderr == f"error: trainer pod {runs.ns}/plug-0 is gone (run plug is Suspended)\n"
    proc = kubectl_fermata(control_plane, kubeconfig, "resume", "plug", "-n", runs.ns)
    print(proc.stdout)
    assert proc.returncode == 0 and "resume requested" in proc.stdout
    wait_for(lambda: runs.status("plug").get("phase") == "Running", timeout=90, what="Running again")
    time.sleep(2)
    proc = kubectl_fermata(control_plane, kubeconfig, "report", "plug", "-n", runs.ns, "-o", str(png))
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "cost from 2 billed segments" in proc.stdout
    proc = kubectl_fermata(control_plane, kubeconfig, "status", "plug", "-n", runs.ns)
    print(proc.stdout)
    assert "pod          plug-1 on " in proc.stdout

    proc = kubectl_fermata(control_plane, kubeconfig, "status", "missing", "-n", runs.ns)
    assert proc.returncode == 1
    assert proc.stderr == f'error: trainingrun "missing" not found in namespace "{runs.ns}"\n'


# ------------------------------------------------------------------------------- without a cluster


def test_cost_curve_integrates_segments() -> None:
    from fermata_kubectl.plugin import cost_curve

    status = {
        "cost": {
            "updated": "2026-03-01T03:00:00Z",
            "segments": [
                # one hour at $0.39, a gap, then an open span at $1.30 until `updated`
                {
                    "pod": "r-0",
                    "start": "2026-03-01T00:00:00Z",
                    "end": "2026-03-01T01:00:00Z",
                    "hourlyUSD": 0.39,
                },
                {"pod": "r-1", "start": "2026-03-01T02:00:00Z", "hourlyUSD": 1.30},
            ],
        }
    }
    curve = cost_curve(status, datetime(2026, 3, 1, 5, tzinfo=UTC))
    assert [(t.hour, round(usd, 4)) for t, usd in curve] == [(0, 0.0), (1, 0.39), (2, 0.39), (3, 1.69)]


def test_status_without_status_and_condition_polarity() -> None:
    from fermata_kubectl.plugin import condition_is_ok, render_status

    run = {"metadata": {"name": "new", "namespace": "ml"}, "spec": {"budget": {"maxUSD": 600}}}
    text = render_status(run)
    assert text.startswith("new (ml)  New\n")
    assert "$0.00 of $600.00  [--------------------] 0.0%" in text
    assert condition_is_ok({"type": "Ready", "status": "True"})
    assert not condition_is_ok({"type": "Ready", "status": "Unknown"})
    assert condition_is_ok({"type": "BudgetWarning", "status": "False"})
    assert not condition_is_ok({"type": "Interrupted", "status": "True"})
    assert condition_is_ok({"type": "Complete", "status": "False"})
