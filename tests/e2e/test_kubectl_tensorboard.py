"""``kubectl fermata tensorboard``: the mirror of ``<checkpoints>/tensorboard/`` and TensorBoard.

The event files are written by the trainer's own ``TensorBoardSink`` to a real S3 server
(versitygw on loopback) or a folder; the mirror is read back with TensorBoard's own reader, and
the real ``tensorboard`` serves it on a free loopback port, asked over HTTP for the run and its
scalars. ``--print`` is checked through ``render_commands`` (the CLI only adds reading the run).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fermata_kubectl.tensorboard_view import (
    RunView,
    render_commands,
    run_view,
    start_tensorboard,
    stop,
    sync_events,
    watch,
)
from tests.s3_fixture import S3Server, s3_server  # noqa: F401  (the S3 server fixture)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _run(storage: str, secret: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"storage": {"checkpoints": storage}}
    if secret:
        spec["storage"]["credentialsSecret"] = secret
    return {"metadata": {"name": "plug", "namespace": "ml"}, "spec": spec}


def _sink(storage_uri: str, work: Path) -> Any:
    from fermata_trainer.storage import open_storage
    from fermata_trainer.telemetry import TensorBoardSink

    return TensorBoardSink(work, open_storage(storage_uri).child("tensorboard"))


def _steps(events_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: list[int] = []
    for path in sorted(events_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return steps


def test_sync_from_s3_downloads_only_what_changed(
    s3_server: S3Server,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    pytest.importorskip("tensorboard")
    for name, value in s3_server.env().items():  # the user's own AWS environment
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_server.make_bucket('tb-sync')}/runs/plug"
    view = run_view(_run(uri, secret="s3-creds"), tmp_path / "cache")
    assert view.events_dir == tmp_path / "cache" / "ml" / "plug" / "plug"

    sink = _sink(uri, tmp_path / "work")
    for step in range(1, 6):
        sink.scalars(step, {"train/loss": 3.0 - 0.1 * step, "cost/accrued_usd": 0.01 * step})
    sink.sync()
    first = sync_events(view.storage, view.events_dir)
    assert len(first.downloaded) == 1 and first.unchanged == 0
    assert _steps(view.events_dir, "train/loss") == [1, 2, 3, 4, 5]

    again = sync_events(view.storage, view.events_dir)
    assert again.downloaded == [] and again.unchanged == 1

    sink.scalars(6, {"train/loss": 2.3})  # the trainer goes on: the event file grows
    sink.sync()
    grown = sync_events(view.storage, view.events_dir)
    assert grown.downloaded == first.downloaded
    assert _steps(view.events_dir, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert _steps(view.events_dir, "cost/accrued_usd") == [1, 2, 3, 4, 5]
    sink.close()

    s3_server.client().delete_object(
        Bucket=uri.split("/")[2], Key=f"runs/plug/tensorboard/{first.downloaded[0]}"
    )
    gone = sync_events(view.storage, view.events_dir)
    assert gone.removed == first.downloaded and not list(view.events_dir.glob("events.*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> Any:
    with _NO_PROXY.open(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def _wait_for(port: int, path: str, ok: Any, timeout: float = 90.0) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = _get(port, path)
            if ok(last):
                return last
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{path} never became ready: {last!r}")


def test_serve_shows_the_run_and_picks_up_new_steps(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    storage = str(tmp_path / "storage")
    view: RunView = run_view(_run(storage), tmp_path / "cache")
    sink = _sink(storage, tmp_path / "work")
    for step in range(1, 4):
        sink.scalars(step, {"train/loss": 3.0 - 0.1 * step, "cost/accrued_usd": 0.02 * step})
    sink.sync()
    sync_events(view.storage, view.events_dir)

    port = _free_port()
    proc = start_tensorboard(view.logdir, port)
    syncs: list[int] = []

    def resync() -> None:
        syncs.append(len(sync_events(view.storage, view.events_dir).downloaded))

    watcher = threading.Thread(target=lambda: syncs.append(-watch(proc, resync, 0.5)), daemon=True)
    try:
        watcher.start()
        assert _wait_for(port, "/data/runs", lambda runs: runs) == ["plug"]
        tags = _get(port, "/data/plugin/scalars/tags")["plug"]
        assert {"train/loss", "cost/accrued_usd"} <= set(tags)

        sink.scalars(4, {"train/loss": 2.6})  # mirrored by the watcher's resync, reloaded by TensorBoard
        sink.sync()
        points = _wait_for(
            port,
            "/data/plugin/scalars/scalars?run=plug&tag=train/loss",
            lambda pts: pts and pts[-1][1] == 4,
        )
        assert [p[1] for p in points] == [1, 2, 3, 4]
        assert 1 in syncs
    finally:
        stop(proc)
        sink.close()
    watcher.join(timeout=20)
    assert not watcher.is_alive() and proc.returncode is not None


def test_print_names_the_commands_and_whose_credentials() -> None:
    view = run_view(_run("s3://ml-runs/plug/", secret="s3-creds"), Path("/c"))
    text = render_commands(view, 7007)
    assert text.splitlines() == [
        "# TrainingRun ml/plug: TensorBoard events in s3://ml-runs/plug/tensorboard/",
        "# S3 is read with your own AWS environment (profile, AWS_* variables, SSO); "
        "the run's pods use Secret ml/s3-creds, which is not read",
        "mkdir -p /c/ml/plug/plug",
        "aws s3 sync --delete s3://ml-runs/plug/tensorboard/ /c/ml/plug/plug/",
        "tensorboard --logdir /c/ml/plug --port 7007 --host 127.0.0.1",
    ]
    local = render_commands(run_view(_run("/data/runs/plug"), Path("/c")), 6006)
    assert "rsync -a --delete --exclude '.tmp-*' /data/runs/plug/tensorboard/ /c/ml/plug/plug/" in local
    assert "tensorboard --logdir /c/ml/plug --port 6006 --host 127.0.0.1" in local
