"""``make demo``: local mode end to end with the real trainer.

1. ``fermata local up`` with the test kubelet in ``exec`` mode: pods run from the trainer image
   when ``make images`` has built it (and says so), else as local processes from ``.venv``;
2. a synthetic MagnaTagATune-like dataset on local disk;
3. a TrainingRun using the tiny in-code MusicGen (``tiny://``): a preparation pod tokenizes the
   dataset on the CPU node, then the training pod trains for real on the CPU,
   checkpoints to local storage, reports progress to its status and passes a step gate;
4. ``kubectl get trainingruns`` printed each time it changes, until the run completes;
5. ``kubectl describe``, then ``fermata local down``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fermata_dev import local_mode


def _kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    from fermata_dev.cluster import find_testcluster_binary

    return subprocess.run(
        [str(find_testcluster_binary()), "kubectl", *args],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


def built_trainer_image() -> str | None:
    """The trainer image `make images` built, if it is up to date (the demo then runs it)."""
    from fermata_dev.cluster import repo_root
    from fermata_dev.images import TRAINER, ImageError, by_target, load_index

    root = repo_root()
    status = subprocess.run(
        ["bash", str(root / "tools" / "images" / "build.sh"), "--status"],
        capture_output=True,
        text=True,
        check=False,
    )
    if status.returncode != 0 or os.geteuid() != 0:
        return None
    try:
        return by_target(load_index(), TRAINER).ref
    except ImageError:
        return None


def demo_run(data: Path, storage: Path, image: str = "fermata-trainer:local") -> dict[str, object]:
    return {
        "apiVersion": "fermata.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "amapiano-tiny", "namespace": "ml"},
        "spec": {
            "model": {"base": "tiny://seed=0"},
            "dataset": {"source": "magnatagatune", "uri": str(data), "minTags": 3, "segmentSeconds": 2.0},
            "training": {
                "epochs": 6,
                "batchSize": 4,
                "learningRate": 0.003,
                "warmupSteps": 5,
                "checkpointEverySteps": 10,
                "evaluateEverySteps": 10,
            },
            "evaluation": {"clipSeconds": 2.0},
            "resources": {
                "image": image,
                "gpus": 1,
                "cpu": "1",
                "memory": "4Gi",
                "instanceTypes": ["g4dn.xlarge"],
                "capacity": "spot",
            },
            "budget": {"maxUSD": 5, "warnAtFraction": 0.8},
            "idle": {"timeout": "5m", "minGpuUtilization": 0.0},
            "gates": [
                {
                    "name": "step-20",
                    "at": {"step": 20},
                    "require": {"maxValidationLoss": 6.0, "maxCostUSD": 5},
                }
            ],
            "storage": {"checkpoints": str(storage), "keepLast": 2},
            # the default, spelled out: a preparation pod tokenizes on local mode's CPU node first
            "preparation": {"mode": "Pod", "resources": {"cpu": "1", "memory": "2Gi"}},
        },
    }


def main(timeout: float = 900.0) -> int:
    from fermata_dev.synthetic import make_mtat_tree

    root = local_mode.state_dir().parent / "demo"
    shutil.rmtree(root, ignore_errors=True)
    if local_mode.status_quiet() is None:
        shutil.rmtree(local_mode.state_dir(), ignore_errors=True)  # a fresh cluster for the demo
    data, storage = root / "magnatagatune", root / "storage"
    make_mtat_tree(data, clips=16, seconds=(2.5, 3.0, 2.2, 3.5))
    storage.mkdir(parents=True)
    storage.chmod(0o777)  # the trainer image runs as uid 1000
    image = built_trainer_image()
    if image is not None:
        print(f"pods run from the images `make images` built: {image} (its root file system,", flush=True)
        print(f"uid 1000, read-only root; {root} is the node's local disk)", flush=True)
        os.environ["FERMATA_LOCAL_IMAGES"] = "1"
        os.environ["FERMATA_LOCAL_NODE_MOUNTS"] = str(root)
    else:
        print("the images are not built (or not up to date): pods run the trainer from .venv", flush=True)
        print("(`make images` builds them; the demo then runs the trainer image)", flush=True)
    os.environ["FERMATA_LOCAL_KUBELET_MODE"] = "exec"
    os.environ.setdefault("FERMATA_TRAINER_HEARTBEAT_SECONDS", "2")
    if local_mode.up() != 0:
        return 1
    kubeconfig = local_mode.state_dir() / "kubeconfig"
    try:
        _kubectl(kubeconfig, "create", "namespace", "ml")
        _kubectl(kubeconfig, "label", "namespace", "ml", "pod-security.kubernetes.io/enforce=restricted")
        run = demo_run(data, storage, image or "fermata-trainer:local")
        applied = _kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(run))
        print(applied.stdout.strip() or applied.stderr.strip(), flush=True)
        if applied.returncode != 0:
            return 1
        print("\n$ kubectl get trainingruns -n ml   (printed on every change)", flush=True)
        last_rows = ""
        header_shown = False
        deadline = time.monotonic() + timeout
        phase = ""
        while time.monotonic() < deadline:
            out = _kubectl(kubeconfig, "get", "trainingruns", "-n", "ml").stdout.splitlines()
            if len(out) >= 2:
                if not header_shown:
                    print(out[0], flush=True)
                    header_shown = True
                rows = "\n".join(out[1:])
                ageless = "\n".join(line.rsplit(None, 1)[0] for line in out[1:])  # AGE always moves
                if ageless != last_rows:
                    print(rows, flush=True)
                    last_rows = ageless
            phase = _kubectl(
                kubeconfig, "get", "tr", "amapiano-tiny", "-n", "ml", "-o", "jsonpath={.status.phase}"
            ).stdout
            if phase in {"Succeeded", "Failed", "BudgetExceeded", "IdleStopped", "Stopped"}:
                break
            time.sleep(1.0)
        print("\n$ kubectl get trainingruns -n ml -o wide", flush=True)
        print(_kubectl(kubeconfig, "get", "trainingruns", "-n", "ml", "-o", "wide").stdout, flush=True)
        print("$ kubectl describe trainingrun amapiano-tiny -n ml  (events)", flush=True)
        described = _kubectl(kubeconfig, "describe", "trainingrun", "amapiano-tiny", "-n", "ml").stdout
        print(described[described.find("Events:") :], flush=True)
        print(f"checkpoints and samples: {storage}", flush=True)
        return 0 if phase == "Succeeded" else 1
    finally:
        local_mode.down()


if __name__ == "__main__":
    sys.exit(main())
