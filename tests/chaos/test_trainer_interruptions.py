"""Twenty spot interruptions of one run with the real trainer (tiny MusicGen on the CPU, the test
kubelet's exec mode, checkpoints on a real S3 server on loopback).

Each time the trainer has made progress in its pod, the pod is evicted (SIGTERM → the trainer
finishes its step, writes a checkpoint, exits); the operator recreates it from
``status.lastCheckpoint``. The run must complete with step continuity: every incarnation
resumes exactly at the step its predecessor checkpointed on SIGTERM, no step that was reported
is lost, and across all incarnations each step is trained once (at most one step — the one in
flight at SIGTERM — redone per interruption).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fermata_dev.kubelet import LocalKubelet
from fermata_dev.synthetic import make_mtat_tree
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for
from tests.s3_fixture import s3_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.chaos, pytest.mark.cluster, pytest.mark.trainer]

INTERRUPTIONS = 20
MAX_STEPS = 400


def upload_tree(s3: Any, bucket: str, root: Path, prefix: str) -> str:
    c = s3.client()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            c.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


def trainer_spec(data: str, bucket: str, name: str, **training: Any) -> dict[str, Any]:
    return spec(
        model={"base": "tiny://seed=0"},
        dataset={"uri": data, "minTags": 3, "segmentSeconds": 2.0, "validationFraction": 0.25},
        training={
            "epochs": 1000,
            "maxSteps": MAX_STEPS,
            "batchSize": 4,
            "learningRate": 0.003,
            "warmupSteps": 2,
            "checkpointEverySteps": 1000,
            "evaluateEverySteps": 1000,
            **training,
        },
        evaluation={"clipSeconds": 1.0, "prompts": ["amapiano log drum"]},
        storage={
            "checkpoints": f"s3://{bucket}/runs/{name}/",
            "credentialsSecret": "s3-creds",
            "keepLast": 3,
        },
        idle={"timeout": "5m", "minGpuUtilization": 0.0},
        failures={"maxRetries": 0},
        spot={
            "maxInterruptions": INTERRUPTIONS + 5,
            "fallbackToOnDemandAfter": 0,
            "backoffSeconds": 0,
            "maxBackoffSeconds": 0,
        },
    )


def events(log: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == name:
                out.append(record)
    return out


def test_twenty_interruptions_of_the_real_trainer_keep_step_continuity(
    runs: Runs,
    operator_factory: Any,
    kubelet: LocalKubelet,
    s3_server: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    bucket = s3_server.make_bucket("chaos-evict")
    data = upload_tree(
        s3_server, bucket, make_mtat_tree(tmp_path / "mtat", clips=8, seconds=(2.5, 3.0)).root, "mtat"
    )
    secret = {k: v for k, v in s3_server.env().items() if k.startswith("AWS_") and k != "AWS_DEFAULT_REGION"}
    runs.core.create_namespaced_secret(runs.ns, {"metadata": {"name": "s3-creds"}, "stringData": secret})
    kubelet.executables["fermata-train"] = str(Path(sys.executable).parent / "fermata-train")
    kubelet.set_mode("exec")
    op: OperatorProcess = operator_factory(runs.ns, FERMATA_TRAINER_HEARTBEAT_SECONDS="0.2")
    runs.create("evict", trainer_spec(data, bucket, "evict"))

    observed: list[int] = []  # last step seen in status before each eviction
    checkpointed: list[int] = []  # the SIGTERM checkpoint of each interrupted incarnation
    started = time.monotonic()
    for i in range(INTERRUPTIONS):
        pod = f"evict-{i}"
        floor = checkpointed[-1] if checkpointed else 0
        st = wait_for(
            lambda pod=pod, floor=floor: (s := runs.status("evict")).get("progress")
            and s["progress"].get("podName") == pod
            and s["progress"].get("state") == "Training"
            and s["progress"]["step"] > floor
            and s,
            timeout=90,
            interval=0.1,
            what=f"{pod} training past step {floor}",
        )
        observed.append(st["progress"]["step"])
        kubelet.evict(runs.ns, pod)
        st = wait_for(
            lambda i=i: (s := runs.status("evict")).get("interruptions") == i + 1 and s,
            timeout=60,
            interval=0.1,
            what=f"interruption {i + 1} counted",
        )
        ckpt = st["lastCheckpoint"]
        # Written on SIGTERM ("signal"), or just before it for the eviction's DisruptionTarget
        # notice ("request") when no step was taken in between.
        assert ckpt["reason"] in ("signal", "request"), (pod, ckpt)
        checkpointed.append(ckpt["step"])
        assert ckpt["step"] >= observed[-1], f"{pod}: reported step {observed[-1]} lost, checkpoint {ckpt}"
    st = wait_for(
        lambda: (s := runs.status("evict")).get("phase") in {"Succeeded", "Failed"} and s,
        timeout=300,  # the last pod trains to the end: minutes on a loaded 2-core machine
        what="completion",
    )
    elapsed = time.monotonic() - started
    last = f"evict-{INTERRUPTIONS}"
    assert st["phase"] == "Succeeded", (
        st.get("message"),
        kubelet.logs(runs.ns, last)[-3000:],
        op.log()[-3000:],
    )
    assert st["interruptions"] == INTERRUPTIONS and st["failures"] == 0
    assert st["progress"]["step"] == MAX_STEPS and st["progress"]["podName"] == last

    # Step continuity, from the trainers' own logs.
    trained: list[int] = []
    for i in range(INTERRUPTIONS + 1):
        log = kubelet.logs(runs.ns, f"evict-{i}")
        resumed = events(log, "resumed")
        if i == 0:
            assert resumed == [], resumed
        else:
            assert [r["step"] for r in resumed] == [checkpointed[i - 1]], (i, resumed, checkpointed)
        steps = [r["step"] for r in events(log, "train_step")]
        if i < INTERRUPTIONS:
            signal_ckpts = [
                r["step"] for r in events(log, "checkpoint_written") if r.get("reason") == "signal"
            ]
            assert signal_ckpts == [checkpointed[i]], (i, signal_ckpts)
            assert not steps or steps[-1] == checkpointed[i], (i, steps[-3:], checkpointed[i])
        trained += steps
    redone = len(trained) - len(set(trained))
    assert sorted(set(trained)) == list(range(1, MAX_STEPS + 1)), trained
    assert redone <= INTERRUPTIONS, trained
    print(
        f"{INTERRUPTIONS} interruptions in {elapsed:.0f}s; SIGTERM checkpoints at {checkpointed}; "
        f"{redone} steps trained twice"
    )
