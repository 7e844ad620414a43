"""End to end: the preparation phase on CPU capacity (``spec.preparation.mode: Pod``, the default).

The operator first runs a preparation pod (``<run>-prep-0``, ``fermata-train prepare
--tokenize``) on a priced CPU node; it is evicted while it tokenizes, the next preparation pod
resumes from the per-file code cache the first one mirrored (its report shows clips reused), and
only once the prepared dataset is verified does the GPU pod start — loading that dataset, never
tokenizing — and train to Succeeded. The cost segments show the preparation pods billed on the CPU
node at its price and the GPU pod's billed span starting after the preparation ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fermata_dev.kubelet import LocalKubelet, NodeSpec
from fermata_operator.policies.prices import DEFAULT_PRICES
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for
from tests.e2e.test_trainer_e2e import real_trainer_setup
from tests.s3_fixture import s3_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.trainer, pytest.mark.slow]

CPU_NODE = NodeSpec("cpu-1", "m5.xlarge", "on-demand", "us-east-1a", gpus=0, cpu="8", memory="32Gi")


def _condition(st: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), None)


def test_preparation_pod_resumes_after_eviction_then_the_gpu_pod_trains(
    runs: Runs,
    operator_factory: Any,
    kubelet: LocalKubelet,
    s3_server: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    # 30 clips of 8-9 s and an EnCodec with 32 filters: tokenizing lasts seconds (about 13 s on
    # a quiet 2-core machine), long enough to be seen and interrupted half-way
    bucket, data = real_trainer_setup(runs, kubelet, s3_server, tmp_path, "prep", 30, (8.0, 9.0))
    kubelet.add_node(CPU_NODE)
    operator: OperatorProcess = operator_factory(runs.ns, FERMATA_TRAINER_HEARTBEAT_SECONDS="1")
    runs.create(
        "prep",
        spec(
            model={"base": "tiny://seed=0,filters=32"},
            dataset={"uri": data, "minTags": 3, "segmentSeconds": 2.0, "validationFraction": 0.25},
            training={
                "epochs": 20,
                "maxSteps": 10,
                "batchSize": 4,
                "learningRate": 0.003,
                "warmupSteps": 2,
                "checkpointEverySteps": 5,
                "evaluateEverySteps": 10,
            },
            evaluation={"clipSeconds": 1.0},
            storage={"checkpoints": f"s3://{bucket}/runs/prep/", "credentialsSecret": "s3-creds"},
            idle={"timeout": "5m", "minGpuUtilization": 0.0},
            spot={"backoffSeconds": 1},
            preparation={
                "mode": "Pod",  # the default, but the shared spec() picks Trainer
                "resources": {"instanceTypes": ["m5.xlarge"], "cpu": "1", "memory": "2Gi"},
            },
        ),
    )
    # The preparation pod runs first, on the CPU node, and reports its tokenizing.
    st = wait_for(
        lambda: (s := runs.status("prep")).get("preparation", {}).get("state") == "Tokenizing"
        and s["preparation"]["filesDone"] >= 1
        and s,
        timeout=180,
        what="the preparation pod tokenizing",
    )
    first = st["preparation"]
    assert first["podName"] == "prep-prep-0" and first["filesDone"] < first["filesTotal"]
    assert st["phase"] == "Preparing"
    assert _condition(st, "Prepared")["status"] == "False"
    assert not [p for p in runs.pods("prep") if p.metadata.name == "prep-0"], "GPU pod before preparation"
    prep_pod = next(p for p in runs.pods("prep") if p.metadata.name == "prep-prep-0")
    assert prep_pod.spec.node_name == "cpu-1"
    assert prep_pod.spec.containers[0].args == ["prepare", "--tokenize"]
    assert "nvidia.com/gpu" not in (prep_pod.spec.containers[0].resources.limits or {})
    assert prep_pod.metadata.labels["app.kubernetes.io/component"] == "preparer"
    assert prep_pod.metadata.owner_references[0].kind == "TrainingRun"

    kubelet.evict(runs.ns, "prep-prep-0")  # interrupted mid-tokenizing
    st = wait_for(
        lambda: (s := runs.status("prep")).get("preparer", {}).get("interruptions") == 1 and s,
        timeout=60,
        what="the preparation pod's interruption counted",
    )
    # The next preparation pod resumes: it reuses what the first one tokenized.
    st = wait_for(
        lambda: (s := runs.status("prep")).get("preparer", {}).get("prepared") and s,
        timeout=240,
        what="the dataset prepared",
    )
    report = st["preparation"]
    assert report["podName"] == "prep-prep-1" and report["state"] == "Completed"
    assert report["reused"] > 0 and report["tokenized"] < report["filesTotal"], report
    assert report["reused"] + report["tokenized"] == report["filesTotal"] == report["filesDone"]
    assert st["preparer"]["codesKey"] == report["codesKey"]
    assert st["preparer"]["manifestDigest"] == report["manifestDigest"]
    gpu = wait_for(
        lambda: [p for p in runs.pods("prep") if p.metadata.name == "prep-0"], timeout=60, what="pod prep-0"
    )[0]
    env = {e.name: e.value for e in gpu.spec.containers[0].env}
    assert env["FERMATA_PREPARED_CODES_KEY"] == report["codesKey"]
    assert env["FERMATA_PREPARED_MANIFEST_DIGEST"] == report["manifestDigest"]

    st = wait_for(
        lambda: (s := runs.status("prep")).get("phase") in {"Succeeded", "Failed"} and s,
        timeout=300,
        what="completion",
    )
    logs = kubelet.logs(runs.ns, "prep-0")
    assert st["phase"] == "Succeeded", (st.get("message"), logs[-3000:], operator.log()[-3000:])
    assert _condition(st, "Prepared")["status"] == "True"
    assert "prepared_dataset_loaded" in logs and "codes_cache_built" not in logs
    assert st["interruptions"] == 0 and st["failures"] == 0

    # Billing: both preparation pods on the CPU node at its price; the GPU pod's span starts
    # after the preparation ended, so its billed seconds exclude it.
    segments = {s["pod"]: s for s in st["cost"]["segments"]}
    assert set(segments) == {"prep-prep-0", "prep-prep-1", "prep-0"}, segments
    for name in ("prep-prep-0", "prep-prep-1"):
        assert segments[name]["node"] == "cpu-1" and segments[name]["instanceType"] == "m5.xlarge"
        assert segments[name]["hourlyUSD"] == DEFAULT_PRICES["m5.xlarge/on-demand"]
    assert segments["prep-0"]["start"] >= segments["prep-prep-1"]["end"]
    assert (
        segments["prep-0"]["hourlyUSD"]
        == DEFAULT_PRICES[f"{segments['prep-0']['instanceType']}/{segments['prep-0']['capacityType']}"]
    )
    prep_usd = segments["prep-prep-0"]["usd"] + segments["prep-prep-1"]["usd"]
    assert st["cost"]["preparationUSD"] == pytest.approx(prep_usd, abs=1e-6)
    assert st["cost"]["accruedUSD"] == pytest.approx(prep_usd + segments["prep-0"]["usd"], abs=1e-3)
    managers = {m["manager"] for m in runs.get("prep")["metadata"]["managedFields"]}
    assert {"fermata-preparer", "fermata-trainer", "fermata-operator"} <= managers
