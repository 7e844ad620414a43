"""Status reporting: the apply body, and (with the local control plane) the real round trip:
server-side apply of status.progress, a checkpoint request read back from status.control,
acknowledged after the checkpoint is written."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from fermata_api import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    TRAINER_FIELD_MANAGER,
    CheckpointRef,
    RunRef,
    TrainerProgress,
    TrainerState,
    TrainerStatus,
)
from fermata_trainer.reporter import (
    KubernetesStatusReporter,
    NullReporter,
    make_reporter,
    status_path,
)
from fermata_trainer.storage import LocalStorage, sha256_bytes
from fermata_trainer.training_loop import RunOutcome, Trainer
from tests.trainer.conftest import ConfigFactory

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "fermata.dev_trainingruns.yaml"


def _status(step: int = 3) -> TrainerStatus:
    now = datetime.now(UTC)
    return TrainerStatus(
        progress=TrainerProgress(state=TrainerState.training, heartbeat_time=now, step=step, total_steps=10),
        last_checkpoint=CheckpointRef(
            uri="s3://b/run/checkpoints/step-000000003/manifest.json",
            step=3,
            digest="sha256:" + "0" * 64,
            time=now,
            reason="periodic",
        ),
    )


def test_apply_body_and_null_reporter() -> None:
    reporter = KubernetesStatusReporter(
        RunRef(name="demo", namespace="music", uid="1234"), api_client=object()
    )
    body = reporter.body(_status())
    assert body["apiVersion"] == f"{API_GROUP}/{API_VERSION}" and body["kind"] == KIND
    assert body["metadata"] == {"name": "demo", "namespace": "music", "uid": "1234"}
    assert body["status"]["progress"]["step"] == 3
    assert body["status"]["lastCheckpoint"]["reason"] == "periodic"
    assert "control" not in body["status"]
    assert reporter.path == "/apis/fermata.dev/v1alpha1/namespaces/music/trainingruns/demo/status"
    assert status_path("a", "b").endswith(f"/namespaces/a/{PLURAL}/b/status")
    # an API client that cannot talk: reporting fails softly (logged, retried next heartbeat)
    assert reporter.report(_status()) is None and reporter.failures == 1
    assert isinstance(make_reporter(RunRef()), NullReporter)
    assert NullReporter().report(_status()) is None


def _install_crd(api: Any) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(api)
    body = yaml.safe_load(CRD.read_text())
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(body["metadata"]["name"])
        conditions = {c.type: c.status for c in (crd.status.conditions or [])}
        if conditions.get("Established") == "True":
            return
        time.sleep(0.2)
    raise TimeoutError("TrainingRun CRD not established")


@pytest.mark.cluster
def test_status_round_trip_and_checkpoint_request(
    k8s_api: Any, namespace: str, tmp_path: Path, make_config: ConfigFactory
) -> None:
    from kubernetes import client

    _install_crd(k8s_api)
    custom = client.CustomObjectsApi(k8s_api)
    run = custom.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {"name": "tiny"},
            "spec": {
                "dataset": {"uri": "/data/mtat"},
                "storage": {"checkpoints": "/data/ckpt"},
                "resources": {"image": "fermata/trainer:test"},
                "budget": {"maxUSD": 5},
            },
        },
    )
    ref = RunRef(name="tiny", namespace=namespace, uid=run["metadata"]["uid"])
    config = make_config(max_steps=400, heartbeat_seconds=0.05)
    config.run = ref
    reporter = KubernetesStatusReporter(ref, api_client=k8s_api)
    outcome: list[RunOutcome] = []
    errors: list[BaseException] = []

    def train() -> None:
        try:
            outcome.append(Trainer(config, reporter=reporter).run())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()

    def status() -> dict[str, Any]:
        obj = custom.get_namespaced_custom_object_status(API_GROUP, API_VERSION, namespace, PLURAL, "tiny")
        return dict(obj.get("status") or {})

    deadline = time.monotonic() + 120
    while (status().get("progress") or {}).get("step", 0) < 3:
        assert thread.is_alive() or not errors, errors
        assert time.monotonic() < deadline, "the trainer never reported step 3"
        time.sleep(0.05)

    # the operator's side: a checkpoint request in status.control, under its own field manager
    custom.api_client.call_api(
        status_path(namespace, "tiny"),
        "PATCH",
        query_params=[("fieldManager", "fermata-operator"), ("force", "true")],
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body={
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {"name": "tiny", "namespace": namespace},
            "status": {
                "control": {
                    "checkpointRequest": {
                        "id": "req-1",
                        "reason": "manual",
                        "time": datetime.now(UTC).isoformat(),
                        "stop": True,
                    }
                }
            },
        },
        response_type="object",
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
    )
    thread.join(timeout=120)
    assert not thread.is_alive(), "the trainer did not stop after the request"
    assert not errors, errors
    result = outcome[0]
    assert result.state is TrainerState.stopped and result.exit_code == 0

    final = status()
    progress = final["progress"]
    assert progress["state"] == "Stopped"
    assert progress["checkpointRequestAck"] == "req-1"
    assert 3 <= progress["step"] < 400
    last = final["lastCheckpoint"]
    assert last["reason"] == "request" and last["step"] == progress["step"]
    storage = LocalStorage(tmp_path / "storage")
    manifest = storage.get_bytes(f"checkpoints/step-{last['step']:09d}/manifest.json")
    assert last["digest"] == f"sha256:{sha256_bytes(manifest)}"
    assert final["control"]["checkpointRequest"]["id"] == "req-1"  # the operator's, untouched

    obj = custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, "tiny")
    managers = {(m["manager"], m.get("subresource")) for m in obj["metadata"].get("managedFields", [])}
    assert (TRAINER_FIELD_MANAGER, "status") in managers
