"""End to end: the operator runs the real trainer (tiny MusicGen) from the pod it created.

The test kubelet runs the pod's container from the trainer image ``make images`` built (its root
file system, read-only, the pod's volumes bind-mounted at their paths, uid 1000, the pod's
environment and its own bound service-account token; for the pretrained test the node's
Hugging Face cache is a node directory the kubelet shows its containers, named by a node-level
``HF_HUB_CACHE``); checkpoints and the dataset live on a real
S3-compatible server on loopback (versitygw). The run is interrupted mid-training (eviction:
SIGTERM → the trainer writes a checkpoint), the operator recreates the pod from
``status.lastCheckpoint``, and the run completes with a final decision.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from fermata_dev.images import TRAINER, Image, by_target
from fermata_dev.kubelet import LocalKubelet
from fermata_dev.synthetic import make_mtat_tree
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for
from tests.s3_fixture import s3_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.trainer, pytest.mark.slow]


def _upload_tree(s3: Any, bucket: str, root: Path, prefix: str) -> str:
    c = s3.client()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            c.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


def real_trainer_setup(
    runs: Runs,
    kubelet: LocalKubelet,
    s3: Any,
    tmp_path: Path,
    name: str,
    clips: int,
    seconds: tuple[float, ...],
    images: dict[str, Image] | None = None,
) -> tuple[str, str]:
    """A synthetic MagnaTagATune tree on the S3 server, its credentials as a Secret, and the
    test kubelet running pods' commands for real: from the built trainer image when ``images``
    is given (the run's ``resources.image`` must then name it), else from this venv.
    Returns (bucket, dataset URI)."""
    bucket = s3.make_bucket(name)
    data = _upload_tree(
        s3, bucket, make_mtat_tree(tmp_path / "mtat", clips=clips, seconds=seconds).root, "mtat"
    )
    secret = {k: v for k, v in s3.env().items() if k.startswith("AWS_") and k != "AWS_DEFAULT_REGION"}
    runs.core.create_namespaced_secret(runs.ns, {"metadata": {"name": "s3-creds"}, "stringData": secret})
    if images is not None:
        kubelet.images.update(images)
        kubelet.forward_ports.add(s3.port)  # the pod's own network reaches the node's S3 server
    else:
        kubelet.executables["fermata-train"] = str(Path(sys.executable).parent / "fermata-train")
    kubelet.set_mode("exec")
    return bucket, data


def trainer_image(images: dict[str, Image]) -> dict[str, Any]:
    """``resources`` naming the built trainer image."""
    return {**spec()["resources"], "image": by_target(images, TRAINER).ref}


def test_real_trainer_through_an_interruption_to_a_final_decision(
    runs: Runs,
    operator_factory: Any,
    kubelet: LocalKubelet,
    s3_server: Any,  # noqa: F811
    tmp_path: Path,
    built_images: dict[str, Image],
) -> None:
    bucket, data = real_trainer_setup(runs, kubelet, s3_server, tmp_path, "e2e", 12, (2.5, 3.0), built_images)
    operator: OperatorProcess = operator_factory(runs.ns, FERMATA_TRAINER_HEARTBEAT_SECONDS="1")
    runs.create(
        "e2e",
        spec(
            model={"base": "tiny://seed=0"},
            resources=trainer_image(built_images),
            dataset={"uri": data, "minTags": 3, "segmentSeconds": 2.0, "validationFraction": 0.25},
            training={
                "epochs": 40,
                "maxSteps": 60,
                "batchSize": 4,
                "learningRate": 0.003,
                "warmupSteps": 5,
                "checkpointEverySteps": 5,
                "evaluateEverySteps": 20,
            },
            evaluation={"clipSeconds": 2.0},
            storage={
                "checkpoints": f"s3://{bucket}/runs/e2e/",
                "credentialsSecret": "s3-creds",
                "keepLast": 2,
            },
            gates=[{"name": "step-20", "at": {"step": 20}, "require": {"maxValidationLoss": 9.0}}],
            idle={"timeout": "5m", "minGpuUtilization": 0.0},
            failures={"maxRetries": 0},
            spot={"backoffSeconds": 1},
        ),
    )
    # Training really runs: progress and a verified checkpoint reach the status.
    st = wait_for(
        lambda: (s := runs.status("e2e")).get("lastCheckpoint") and s["lastCheckpoint"]["step"] >= 10 and s,
        timeout=300,
        what="a checkpoint at step >= 10",
    )
    assert st["progress"]["podName"] == "e2e-0"
    assert st["lastCheckpoint"]["digest"].startswith("sha256:")
    step_before = runs.status("e2e")["progress"]["step"]
    kubelet.evict(runs.ns, "e2e-0")  # a spot reclaim: SIGTERM, then the pod is gone
    st = wait_for(
        lambda: (s := runs.status("e2e")).get("interruptions") == 1 and s,
        timeout=120,
        what="the interruption counted",
    )
    assert st["failures"] == 0
    sigterm_ckpt = st["lastCheckpoint"]
    # On SIGTERM the trainer checkpoints the step it is on — unless the newest checkpoint is
    # already that step (a periodic one just written): either way nothing done is lost.
    assert sigterm_ckpt["reason"] in {"signal", "periodic"}, sigterm_ckpt
    assert sigterm_ckpt["step"] >= step_before
    first_log = kubelet.logs(runs.ns, "e2e-0")
    assert '"reason": "SIGTERM"' in first_log and "trainer_stopped" in first_log
    new = wait_for(
        lambda: [p for p in runs.pods("e2e") if p.metadata.name == "e2e-1"], timeout=60, what="pod e2e-1"
    )[0]
    env = {e.name: e.value for e in new.spec.containers[0].env}
    assert env["FERMATA_RESUME_FROM"] == sigterm_ckpt["uri"]
    st = wait_for(
        lambda: (s := runs.status("e2e")).get("phase") in {"Succeeded", "Failed"} and s,
        timeout=600,
        what="completion",
    )
    logs = kubelet.logs(runs.ns, "e2e-1")
    assert st["phase"] == "Succeeded", (st.get("message"), logs[-3000:], operator.log()[-3000:])
    assert st["decision"] == "GO"
    assert [g["name"] for g in st["gates"]] == ["step-20", "final"]
    assert st["progress"]["step"] == 60 and st["progress"]["podName"] == "e2e-1"
    assert st["progress"]["validationLoss"] < st["progress"]["baselineValidationLoss"]
    assert 0.0 <= st["progress"]["authenticity"] <= 1.0
    assert "resum" in logs.lower()
    # spec.preparation.mode Trainer: the GPU pods report their own preparation; the second one
    # found the first one's code cache
    prep = st["preparation"]
    assert prep["state"] == "Completed" and prep["podName"] == "e2e-1", prep
    assert prep["reused"] == prep["filesTotal"] > 0 and prep["tokenized"] == 0
    # Both pods were billed; checkpoints, samples and the trainer's own field manager are real.
    assert [s["pod"] for s in st["cost"]["segments"]] == ["e2e-0", "e2e-1"]
    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="runs/e2e/").get("Contents", [])
    ]
    assert any(k.endswith("manifest.json") for k in keys)
    assert any(k.endswith(".wav") for k in keys)
    managers = {m["manager"] for m in runs.get("e2e")["metadata"]["managedFields"]}
    assert {"fermata-trainer", "fermata-operator"} <= managers


def test_no_go_gate_stops_the_real_trainer_and_writes_the_abort_report(
    runs: Runs,
    operator_factory: Any,
    kubelet: LocalKubelet,
    s3_server: Any,  # noqa: F811
    tmp_path: Path,
    built_images: dict[str, Image],
) -> None:
    bucket, data = real_trainer_setup(runs, kubelet, s3_server, tmp_path, "nogo", 8, (2.5,), built_images)
    # A real trainer answers the stop request: give it the production-like patience.
    operator_factory(
        runs.ns, FERMATA_TRAINER_HEARTBEAT_SECONDS="1", FERMATA_CHECKPOINT_REQUEST_TIMEOUT_SECONDS="60"
    )
    runs.create(
        "nogo",
        spec(
            model={"base": "tiny://seed=1"},
            resources=trainer_image(built_images),
            dataset={"uri": data, "minTags": 3, "segmentSeconds": 2.0, "validationFraction": 0.25},
            training={
                "epochs": 200,
                "maxSteps": 400,
                "batchSize": 4,
                "checkpointEverySteps": 50,
                "evaluateEverySteps": 5,
            },
            evaluation={"clipSeconds": 2.0},
            storage={"checkpoints": f"s3://{bucket}/runs/nogo/", "credentialsSecret": "s3-creds"},
            # Impossible after 5 steps: a validation loss under 0.01.
            gates=[{"name": "early", "at": {"step": 5}, "require": {"maxValidationLoss": 0.01}}],
            idle={"timeout": "5m", "minGpuUtilization": 0.0},
        ),
    )
    st = wait_for(
        lambda: (s := runs.status("nogo")).get("phase") == "Stopped" and s, timeout=300, what="Stopped"
    )
    assert st["decision"] == "NO-GO" and "validationLoss" in st["decisionReason"]
    uri = st["abortReport"]["uri"]
    key = uri.removeprefix(f"s3://{bucket}/")

    def abort_report() -> dict[str, Any] | None:
        try:
            return dict(json.loads(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()))
        except ClientError:
            return None  # not written yet: the trainer is checkpointing first

    body = wait_for(abort_report, timeout=120, what="abort report in S3")
    assert body["reason"] == "GateNoGo" and body["decision"] == "NO-GO"
    assert body["evidence"]["maxValidationLoss"] == 0.01
    assert body["lastCheckpoint"]["step"] >= 5
    wait_for(
        lambda: runs.status("nogo")["progress"].get("stopReportUri") == uri, timeout=60, what="trainer ack"
    )


def test_pretrained_musicgen_small_to_deployable_exports(
    runs: Runs,
    operator_factory: Any,
    kubelet: LocalKubelet,
    s3_server: Any,  # noqa: F811
    tmp_path: Path,
    miniature: Any,
    built_images: dict[str, Image],
) -> None:
    """``model.base: facebook/musicgen-small`` through the production loading path: the node's
    Hugging Face cache holds the (miniature) model and T5 encoder, the Hub is off. The first pod
    mirrors the model into the run's storage; after a spot reclaim the second pod, with an empty
    cache, loads it from there. The run ends Succeeded with best and final exports that
    ``MusicGen.get_pretrained`` loads and ``generate`` turns into audio."""
    import shutil

    bucket, data = real_trainer_setup(
        runs, kubelet, s3_server, tmp_path, "pretrained", 10, (2.5, 3.0), built_images
    )
    node_cache = tmp_path / "node-hf" / "hub"
    shutil.copytree(miniature.hub_cache, node_cache, symlinks=True)
    empty_cache = tmp_path / "empty-node-hf" / "hub"
    empty_cache.mkdir(parents=True)
    for path in (node_cache.parent, empty_cache.parent):  # the nodes' disks, writable by the pods
        subprocess.run(["chmod", "-R", "a+rwX", str(path)], check=True)
        kubelet.node_mounts.append(path)
    # the first pod's node has the model cached; HF_HUB_CACHE wins over the pod's HF_HOME
    kubelet.extra_env.update({"HF_HUB_CACHE": str(node_cache), "HF_HUB_OFFLINE": "1"})
    try:
        operator_factory(runs.ns, FERMATA_TRAINER_HEARTBEAT_SECONDS="1")
        runs.create(
            "pre",
            spec(
                model={"base": "facebook/musicgen-small"},
                resources=trainer_image(built_images),
                dataset={"uri": data, "minTags": 3, "segmentSeconds": 2.0, "validationFraction": 0.25},
                training={
                    "epochs": 40,
                    "maxSteps": 24,
                    "batchSize": 4,
                    "learningRate": 0.003,
                    "warmupSteps": 3,
                    "checkpointEverySteps": 4,
                    "evaluateEverySteps": 8,
                },
                evaluation={"clipSeconds": 1.0},
                storage={"checkpoints": f"s3://{bucket}/runs/pre/", "credentialsSecret": "s3-creds"},
                idle={"timeout": "5m", "minGpuUtilization": 0.0},
                failures={"maxRetries": 0},
                spot={"backoffSeconds": 1},
            ),
        )
        wait_for(
            lambda: (s := runs.status("pre")).get("lastCheckpoint") and s["lastCheckpoint"]["step"] >= 4,
            timeout=300,
            what="a checkpoint at step >= 4",
        )
        # the next pod lands on a node with an empty cache (and still no Hub)
        kubelet.extra_env["HF_HUB_CACHE"] = str(empty_cache)
        kubelet.evict(runs.ns, "pre-0")
        st = wait_for(
            lambda: (s := runs.status("pre")).get("phase") in {"Succeeded", "Failed"} and s,
            timeout=600,
            what="completion",
        )
    finally:
        for key in ("HF_HUB_CACHE", "HF_HUB_OFFLINE"):
            kubelet.extra_env.pop(key, None)
    first, second = kubelet.logs(runs.ns, "pre-0"), kubelet.logs(runs.ns, "pre-1")
    assert st["phase"] == "Succeeded", (st.get("message"), second[-3000:])
    assert '"origin": "hub"' in first and "model_mirrored" in first
    assert "model_restored_from_mirror" in second and "hub_fetched" not in second
    assert st["progress"]["step"] == 24

    artifacts = st["artifacts"]
    assert artifacts["final"]["step"] == 24
    assert artifacts["best"]["metric"] == "validationLoss"
    import torch
    from audiocraft.models import MusicGen

    client = s3_server.client()
    for which in ("best", "final"):
        prefix = artifacts[which]["uri"].removeprefix(f"s3://{bucket}/").rstrip("/")
        local = tmp_path / "exports" / which
        local.mkdir(parents=True)
        for name in ("state_dict.bin", "compression_state_dict.bin", "model_card.json"):
            client.download_file(bucket, f"{prefix}/{name}", str(local / name))
        card = json.loads((local / "model_card.json").read_text())
        assert card["baseModel"] == "facebook/musicgen-small"
        from huggingface_hub import constants

        saved = (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(node_cache), True
        try:
            model = MusicGen.get_pretrained(str(local), device="cpu")
        finally:
            constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved
        model.set_generation_params(duration=0.5, top_k=16)  # the miniature has 64 codes
        with torch.no_grad():
            audio = model.generate(["soulful amapiano piano"])
        assert audio.shape == (1, 1, 16000)
