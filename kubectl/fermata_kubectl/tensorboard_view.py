"""``kubectl fermata tensorboard NAME``: the run's TensorBoard events, mirrored locally and served.

The trainer's :class:`~fermata_trainer.telemetry.TensorBoardSink` writes its event files under
``<spec.storage.checkpoints>/tensorboard/`` (S3 or a path). :func:`sync_events` mirrors that
folder into a local cache, downloading only the objects whose size differs from the local copy
(event files only grow, and the trainer uploads them whole; a grown file gets the new bytes
appended in place, as TensorBoard reads an open file on) and removing local files that are
gone from storage. The cache holds one folder per run, ``<cache>/<namespace>/<name>/``, served
as TensorBoard's logdir; the events are in its ``<name>/`` subfolder, so TensorBoard names the
run after the TrainingRun. While TensorBoard runs, the mirror is synced again every
``--refresh`` seconds.

S3 is read with the user's own AWS environment (``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``..., SSO,
``AWS_ENDPOINT_URL_S3``), never with the run's ``spec.storage.credentialsSecret``, which is only
named in the output.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fermata_kubectl.plugin import PluginError

if TYPE_CHECKING:
    from fermata_trainer.storage import Storage

DEFAULT_PORT = 6006
DEFAULT_REFRESH_SECONDS = 60.0
#: Loopback only: the events may be private, and TensorBoard has no authentication.
HOST = "127.0.0.1"
#: Prefix of the temporary files Storage.download_file writes before renaming (never mirrored).
_TMP_PREFIX = ".tmp-"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fermata/tensorboard`` (default ``~/.cache/fermata/tensorboard``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fermata" / "tensorboard"


@dataclass(frozen=True)
class RunView:
    """One run's local mirror: ``logdir`` is served; ``events_dir`` holds the event files."""

    namespace: str
    name: str
    storage: str
    credentials_secret: str | None
    logdir: Path

    @property
    def events_dir(self) -> Path:
        return self.logdir / self.name

    @property
    def events_uri(self) -> str:
        return f"{self.storage.rstrip('/')}/tensorboard/"


def run_view(run: dict[str, Any], cache_dir: Path) -> RunView:
    """Where the run's events are in storage and where they are mirrored locally."""
    meta, spec = run["metadata"], run.get("spec") or {}
    storage = spec.get("storage") or {}
    uri = storage.get("checkpoints")
    if not uri:
        raise PluginError(f"trainingrun {meta['namespace']}/{meta['name']} has no spec.storage.checkpoints")
    return RunView(
        namespace=meta["namespace"],
        name=meta["name"],
        storage=str(uri),
        credentials_secret=storage.get("credentialsSecret"),
        logdir=cache_dir / meta["namespace"] / meta["name"],
    )


@dataclass
class SyncResult:
    downloaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def files(self) -> int:
        return len(self.downloaded) + self.unchanged


def _local_files(root: Path) -> dict[str, int]:
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(_TMP_PREFIX)
    }


def _fetch(source: Storage, key: str, path: Path, local_size: int | None, remote_size: int) -> None:
    """Download one object; a file that grew is appended to in place, not replaced: TensorBoard
    keeps an event file open and reads on from where it stopped, so a replaced file (a new
    inode) would never show the new steps."""
    if local_size is None or local_size > remote_size:
        source.download_file(key, path)
        return
    with tempfile.TemporaryDirectory(prefix="fermata-tb-") as tmp:
        fresh = Path(tmp) / "object"
        source.download_file(key, fresh)
        with fresh.open("rb") as new, path.open("ab") as old:
            new.seek(local_size)
            shutil.copyfileobj(new, old)


def sync_events(storage_uri: str, target: Path) -> SyncResult:
    """Mirror ``<storage_uri>/tensorboard/`` into ``target`` incrementally (see the module)."""
    from fermata_trainer.storage import open_storage

    source = open_storage(storage_uri).child("tensorboard")
    remote = {o.key: o.size for o in source.list()}
    local = _local_files(target)
    result = SyncResult()
    for key, size in sorted(remote.items()):
        if local.get(key) == size:
            result.unchanged += 1
            continue
        _fetch(source, key, target / key, local.get(key), size)
        result.downloaded.append(key)
    for key in sorted(set(local) - set(remote)):
        (target / key).unlink(missing_ok=True)
        result.removed.append(key)
    return result


def tensorboard_executable() -> list[str]:
    """TensorBoard from this Python (the ``plugin`` extra), else ``tensorboard`` on PATH."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        found = shutil.which("tensorboard")
        if found is None:
            raise PluginError(
                "serving needs TensorBoard: pip install 'fermata[plugin]' (or tensorboard); "
                "--print shows the commands instead"
            ) from None
        return [found]
    return [sys.executable, "-m", "tensorboard.main"]


def tensorboard_command(logdir: Path, port: int, executable: list[str] | None = None) -> list[str]:
    return [*(executable or ["tensorboard"]), "--logdir", str(logdir), "--port", str(port), "--host", HOST]


def sync_command(view: RunView) -> list[str]:
    """The shell equivalent of :func:`sync_events` (``--print``)."""
    if view.storage.startswith("s3://"):
        return ["aws", "s3", "sync", "--delete", view.events_uri, f"{view.events_dir}/"]
    from fermata_trainer.storage import local_path_of

    source = local_path_of(view.storage.rstrip("/")) / "tensorboard"
    return ["rsync", "-a", "--delete", "--exclude", f"{_TMP_PREFIX}*", f"{source}/", f"{view.events_dir}/"]


def credentials_note(view: RunView) -> str:
    if not view.storage.startswith("s3://"):
        return f"storage is a local path: read directly ({view.storage})"
    secret = (
        f"; the run's pods use Secret {view.namespace}/{view.credentials_secret}, which is not read"
        if view.credentials_secret
        else ""
    )
    return f"S3 is read with your own AWS environment (profile, AWS_* variables, SSO){secret}"


def render_commands(view: RunView, port: int) -> str:
    """What ``--print`` prints: the sync and serve commands, one a line, and a note on credentials."""
    lines = [
        f"# TrainingRun {view.namespace}/{view.name}: TensorBoard events in {view.events_uri}",
        f"# {credentials_note(view)}",
        shlex.join(["mkdir", "-p", str(view.events_dir)]),
        shlex.join(sync_command(view)),
        shlex.join(tensorboard_command(view.logdir, port)),
    ]
    return "\n".join(lines) + "\n"


def start_tensorboard(
    logdir: Path, port: int, executable: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """TensorBoard on ``127.0.0.1:port`` serving ``logdir`` (its output goes to this terminal)."""
    return subprocess.Popen(tensorboard_command(logdir, port, executable or tensorboard_executable()))


def watch(proc: subprocess.Popen[bytes], resync: Callable[[], None], refresh_seconds: float) -> int:
    """Wait for TensorBoard to exit, calling ``resync`` every ``refresh_seconds`` (0: never);
    TensorBoard is stopped when this returns or raises (Ctrl-C)."""
    try:
        while True:
            try:
                return proc.wait(timeout=refresh_seconds if refresh_seconds > 0 else None)
            except subprocess.TimeoutExpired:
                resync()
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], grace_seconds: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_seconds)


def describe_sync(view: RunView, result: SyncResult) -> str:
    text = (
        f"{view.events_uri} -> {view.events_dir}: {len(result.downloaded)} downloaded, "
        f"{result.unchanged} unchanged"
    )
    return text + (f", {len(result.removed)} removed" if result.removed else "")


def serve(view: RunView, port: int, refresh_seconds: float, out: Any, err: Any) -> int:
    """Sync, start TensorBoard, keep the mirror synced until TensorBoard exits or Ctrl-C."""

    def resync(first: bool = False) -> None:
        try:
            result = sync_events(view.storage, view.events_dir)
        except Exception as exc:  # storage unreachable for a moment: keep serving what is here
            if first:
                raise PluginError(f"reading {view.events_uri}: {exc} ({credentials_note(view)})") from exc
            err.write(f"warning: sync of {view.events_uri} failed: {exc}\n")
            return
        if first or result.downloaded or result.removed:
            out.write(describe_sync(view, result) + "\n")
            out.flush()
        if first and not result.files:
            err.write(f"warning: no TensorBoard events under {view.events_uri} yet\n")

    executable = tensorboard_executable()  # before any download
    resync(first=True)
    proc = start_tensorboard(view.logdir, port, executable)
    out.write(f"TensorBoard for {view.namespace}/{view.name}: http://{HOST}:{port}/ (Ctrl-C stops it)\n")
    out.flush()
    return watch(proc, resync, refresh_seconds)
