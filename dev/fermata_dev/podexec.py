"""Runs one container of a pod from its image's root file system, as a container runtime would.

The development kubelet (:mod:`fermata_dev.kubelet`) starts this module as root inside a private
mount namespace (``unshare --mount --propagation private``) with a JSON description of the
container (:class:`ContainerSpec`). It

1. lays a per-container overlay over the image's root file system (built by ``make images``:
   the image is never written, and a container writes only its own upper layer);
2. creates the mount points, then makes the root read-only when the container asks for
   ``readOnlyRootFilesystem``;
3. mounts ``/proc``, a minimal ``/dev`` (null, zero, full, random, urandom, tty) and the node's
   ``/etc/hosts`` and ``/etc/resolv.conf``, and bind-mounts each volume (ConfigMaps, Secrets, the
   projected service-account token, emptyDirs, materialised by the kubelet) at its real path,
   read-only where the pod says so;
4. gives the container a network namespace of its own (as a pod has: its ports are its own, two
   replicas may both listen on 8080) with loopback up, where the node's services it needs — the
   API server, an S3 server on the node's loopback — answer on their usual ``127.0.0.1`` ports
   through a small relay left in the node's namespace (``forward_ports``);
5. enters the root with ``chroot``, takes the container's uid/gid (no supplementary groups but
   its own gid and ``fsGroup``), changes to its working directory and ``exec``\\s its command with
   its environment, so the container's process keeps this process's pid: the kubelet's signals
   reach it directly.

OCI runtimes (crun, runc) cannot run on these machines (setrlimit fails), which is why this exists.
It is part of the development harness and never ships in an image.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    rootfs: str
    scratch: str
    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    working_dir: str = "/"
    read_only_root: bool = False
    groups: list[int] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    #: Node loopback TCP ports reachable from the container's own network namespace; ``None``:
    #: the container shares the node's network (``hostNetwork``).
    forward_ports: list[int] | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {**self.__dict__, "mounts": [m.__dict__ for m in self.mounts]}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ContainerSpec:
        data = json.loads(text)
        data["mounts"] = [Mount(**m) for m in data.get("mounts") or []]
        return cls(**data)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, stdin=subprocess.DEVNULL)


def _inside(root: Path, path: str, _depth: int = 0) -> Path:
    """``path`` of the container under ``root`` on the node, its symlinks followed *inside* the
    root (an image's ``/var/run`` is a link to ``/run``: it must not lead to the node's)."""
    current = root
    parts = [p for p in path.split("/") if p and p != "."]
    for index, part in enumerate(parts):
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            if _depth > 40:
                raise OSError(f"too many levels of symbolic links in {path}")
            target = os.readlink(candidate)
            base = "/" if target.startswith("/") else "/" + str(current.relative_to(root))
            rest = "/".join(parts[index + 1 :])
            return _inside(root, f"{base}/{target}/{rest}", _depth + 1)
        current = candidate
    return current


def _make_point(target: Path, like: Path) -> None:
    """A mount point at ``target`` of the kind ``like`` is (directory or file)."""
    if not target.is_symlink() and (target.is_dir() if like.is_dir() else target.is_file()):
        return
    if target.is_symlink():
        target.unlink()
    if like.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        target.touch(exist_ok=True)


def prepare_root(spec: ContainerSpec) -> Path:
    """Mount the container's root file system and everything in it; return the root."""
    scratch = Path(spec.scratch)
    upper, work, root = scratch / "upper", scratch / "work", scratch / "root"
    for path in (upper, work, root):
        path.mkdir(parents=True, exist_ok=True)
    _mount(
        "-t", "overlay", "overlay", "-o", f"lowerdir={spec.rootfs},upperdir={upper},workdir={work}", str(root)
    )

    node_files = [Path("/etc/hosts"), Path("/etc/resolv.conf")]
    for point in ("proc", "dev"):
        _inside(root, point).mkdir(parents=True, exist_ok=True)
    for node_file in node_files:
        _make_point(_inside(root, str(node_file)), node_file)
    mounts = sorted(spec.mounts, key=lambda m: len(Path(m.target).parts))  # parents first
    for mount in mounts:
        _make_point(_inside(root, mount.target), Path(mount.source))
    _make_point(_inside(root, spec.working_dir), Path("/"))
    if spec.read_only_root:
        _mount("-o", "remount,ro", str(root))

    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(_inside(root, "proc")))
    dev = _inside(root, "dev")
    _mount("-t", "tmpfs", "-o", "nosuid,mode=755,size=65536k", "tmpfs", str(dev))
    for name in DEVICES:
        (dev / name).touch()
        _mount("--bind", f"/dev/{name}", str(dev / name))
    for link, to in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        (dev / link).symlink_to(to)
    (dev / "pts").mkdir()
    for node_file in node_files:
        _bind(str(node_file), _inside(root, str(node_file)), read_only=True)
    for mount in mounts:
        target = _inside(root, mount.target)
        _make_point(target, Path(mount.source))  # again: under /dev or a volume mounted since
        _bind(mount.source, target, read_only=mount.read_only)
    return root


def _bind(source: str, target: Path, read_only: bool) -> None:
    _mount("--bind", source, str(target))
    if read_only:
        _mount("-o", "remount,bind,ro", str(target))


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def isolate_network(ports: list[int]) -> None:
    """Move this process into a new network namespace with loopback up; for each of ``ports``
    listen on its 127.0.0.1 and relay to the same port of the node's loopback, from a child
    left in the node's namespace that lives exactly as long as this process (the container)."""
    node_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, stdin=subprocess.DEVNULL)
    listeners = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        listeners.append(sock)
    parent = os.getpid()
    if os.fork() == 0:  # the relay
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the container's grace period needs it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _check(_libc.setns(node_ns, CLONE_NEWNET), "setns")
            os.setsid()
            # Not PR_SET_PDEATHSIG: the container drops to its uid, and a parent of another uid
            # cannot signal this root process. Its parent changes when the container is gone.
            threading.Thread(target=_relay, args=(listeners,), daemon=True).start()
            while os.getppid() == parent:
                time.sleep(0.2)
        finally:
            os._exit(0)
    os.close(node_ns)
    for sock in listeners:
        sock.close()


def _relay(listeners: list[socket.socket]) -> None:
    def serve(listener: socket.socket) -> None:
        port = listener.getsockname()[1]
        while True:
            inside, _ = listener.accept()
            threading.Thread(target=_pair, args=(inside, port), daemon=True).start()

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in listeners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _pair(inside: socket.socket, port: int) -> None:
    try:
        outside = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        inside.close()
        return
    outside.settimeout(None)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                with contextlib.suppress(OSError):
                    sock.shutdown(how)

    back = threading.Thread(target=pump, args=(outside, inside), daemon=True)
    back.start()
    pump(inside, outside)
    back.join()
    inside.close()
    outside.close()


def enter(spec: ContainerSpec, root: Path) -> None:
    """chroot, drop to the container's user, exec its command (does not return)."""
    os.chroot(root)
    os.setgroups(sorted({spec.gid, *spec.groups}))
    os.setgid(spec.gid)
    os.setuid(spec.uid)
    os.chdir(spec.working_dir)
    os.umask(0o022)
    os.execvpe(spec.argv[0], spec.argv, spec.env)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m fermata_dev.podexec CONTAINER.json", file=sys.stderr)
        return 2
    spec = ContainerSpec.from_json(Path(args[0]).read_text())
    try:
        root = prepare_root(spec)
        if spec.forward_ports is not None:
            isolate_network(spec.forward_ports)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"podexec: cannot prepare the container's root: {exc}", file=sys.stderr)
        return 128
    try:
        enter(spec, root)
    except OSError as exc:  # the command is missing or not executable: a runtime's StartError
        print(f"podexec: cannot run {spec.argv[0]!r}: {exc}", file=sys.stderr)
        return 127
    return 0  # pragma: no cover - execvpe does not return


if __name__ == "__main__":
    raise SystemExit(main())
