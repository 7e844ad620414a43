"""Local mode: a real control plane, fake GPU nodes and the operator, on this machine.

``fermata local up`` starts a supervisor process in the background that owns everything:
kube-apiserver (+ etcd), controller-manager and scheduler (:mod:`.cluster`), the test kubelet
playing four GPU nodes and a CPU node for preparation pods (:mod:`.kubelet`, in ``auto`` mode: pods go Running at once; set
``FERMATA_LOCAL_KUBELET_MODE=exec`` to run the real trainer command), the CRD, and the operator
(``fermata operator``) as a child process. It writes the admin kubeconfig to
``.fermata/local/kubeconfig`` and prints it. ``fermata local down`` stops the supervisor, which
stops all of its children: no process is left behind. The ``fermata`` command reaches this
module through the plugin in :mod:`fermata_dev.commands`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from fermata_dev.cluster import LocalControlPlane, ensure_built, repo_root
from fermata_operator.crdgen import render as render_crd

STATE_DIR_ENV = "FERMATA_LOCAL_DIR"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or (repo_root() / ".fermata" / "local")).resolve()


def _pid_file() -> Path:
    return state_dir() / "supervisor.pid"


def _ready_file() -> Path:
    return state_dir() / "ready"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid() -> int | None:
    try:
        pid = int(_pid_file().read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def up(timeout: float = 600.0) -> int:
    if _read_pid() is not None:
        print(f"local mode already running; kubeconfig: {state_dir() / 'kubeconfig'}")
        return 0
    ensure_built()
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    _ready_file().unlink(missing_ok=True)
    log = (d / "supervisor.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fermata_dev.local_mode", "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, STATE_DIR_ENV: str(d)},
    )
    _pid_file().write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready_file().exists():
            kubeconfig = d / "kubeconfig"
            print(
                f"local control plane, 4 fake GPU nodes, a CPU node and the operator are up (pid {proc.pid})"
            )
            print(f"export KUBECONFIG={kubeconfig}")
            return 0
        if proc.poll() is not None:
            print(f"local mode failed to start; see {d / 'supervisor.log'}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print("local mode did not become ready in time; stopping it", file=sys.stderr)
    down()
    return 1


def down(timeout: float = 60.0) -> int:
    pid = _read_pid()
    if pid is None:
        print("local mode is not running")
        _pid_file().unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    # Anything left in the supervisor's session (it is the group leader) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _pid_file().unlink(missing_ok=True)
    _ready_file().unlink(missing_ok=True)
    print("local mode stopped")
    return 0


def status_quiet() -> int | None:
    """The supervisor's pid if local mode is running."""
    return _read_pid()


def status() -> int:
    pid = _read_pid()
    if pid is None:
        print("local mode is not running")
        return 1
    print(f"local mode running (pid {pid}); kubeconfig: {state_dir() / 'kubeconfig'}")
    return 0


def serve() -> int:
    """The supervisor: run everything until SIGTERM."""
    from fermata_dev.kubelet import DEFAULT_NODES, LocalKubelet, NodeSpec

    # a CPU node (a built-in price) for the preparation pods of spec.preparation.mode Pod
    cpu_node = NodeSpec("cpu-1", "m5.xlarge", "on-demand", "us-east-1a", gpus=0, cpu="8", memory="32Gi")

    d = state_dir()
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    d.mkdir(parents=True, exist_ok=True)
    crd = d / "crd.yaml"
    crd.write_text(render_crd())
    cp = LocalControlPlane(d / "cluster", crds=[crd])
    operator: subprocess.Popen[bytes] | None = None
    kubelet: LocalKubelet | None = None
    try:
        cp.start()
        (d / "kubeconfig").write_text(cp.kubeconfig.read_text())
        mode = os.environ.get("FERMATA_LOCAL_KUBELET_MODE", "auto")
        venv_bin = Path(sys.executable).parent
        kubelet = LocalKubelet(
            cp.kubeconfig,
            (*DEFAULT_NODES, cpu_node),
            mode=mode,  # type: ignore[arg-type]
            workdir=d / "kubelet",
            executables={"fermata-train": str(venv_bin / "fermata-train")},
        )
        if os.environ.get("FERMATA_LOCAL_IMAGES") == "1":
            from fermata_dev.images import load_index

            kubelet.images.update(load_index())
            kubelet.node_mounts = [
                Path(p) for p in os.environ.get("FERMATA_LOCAL_NODE_MOUNTS", "").split(":") if p
            ]
        kubelet.start()
        env = {
            **os.environ,
            "KUBECONFIG": str(cp.kubeconfig),
            "FERMATA_LOG_FORMAT": "json",
            "FERMATA_RESYNC_SECONDS": os.environ.get("FERMATA_RESYNC_SECONDS", "10"),
        }
        op_log = (d / "operator.log").open("ab")
        operator = subprocess.Popen(
            [sys.executable, "-m", "fermata_operator"], stdout=op_log, stderr=subprocess.STDOUT, env=env
        )
        _ready_file().write_text("ready\n")
        while not stopping:
            if operator.poll() is not None:
                print(f"operator exited with {operator.returncode}; restarting", flush=True)
                operator = subprocess.Popen(
                    [sys.executable, "-m", "fermata_operator"],
                    stdout=op_log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            time.sleep(0.5)
        return 0
    finally:
        if operator is not None and operator.poll() is None:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        if kubelet is not None:
            kubelet.stop()
        cp.stop()
        _ready_file().unlink(missing_ok=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        raise SystemExit(serve())
    raise SystemExit(f"usage: {sys.argv[0]} serve")
