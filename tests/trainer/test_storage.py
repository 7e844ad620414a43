"""Storage: a local folder and a real S3-compatible server (versitygw on loopback)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError

from fermata_trainer.errors import ObjectNotFoundError
from fermata_trainer.storage import (
    TMP_PREFIX,
    LocalStorage,
    RetryPolicy,
    S3Storage,
    Storage,
    TransferSettings,
    is_transient,
    make_s3_client,
    open_storage,
    retry_call,
)
from tests.s3_fixture import FaultProxy, S3Server

pytestmark = pytest.mark.trainer

FAST_RETRY = RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05)


def _client_error(status: int, code: str) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


def _exercise(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("a/one.bin", b"one")
    storage.write_text("a/b/two.txt", "two")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 70_000)
    storage.upload_file(src, "big/blob.bin")
    assert storage.get_bytes("a/one.bin") == b"one"
    assert storage.read_text("a/b/two.txt") == "two"
    assert storage.exists("a/one.bin") and not storage.exists("a/none")
    assert [(o.key, o.size) for o in storage.list("a/")] == [("a/b/two.txt", 3), ("a/one.bin", 3)]
    child = storage.child("a")
    assert child.get_bytes("b/two.txt") == b"two"
    assert child.uri == storage.uri_of("a")
    out = tmp_path / "down" / "blob.bin"
    storage.download_file("big/blob.bin", out)
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(ObjectNotFoundError):
        storage.get_bytes("a/missing")
    with pytest.raises(ObjectNotFoundError):
        storage.download_file("a/missing", tmp_path / "nothing")
    assert storage.delete_prefix("a/") == 2
    storage.delete("a/one.bin")  # absent: fine
    assert [o.key for o in storage.list()] == ["big/blob.bin"]


def test_local_storage(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "root"))
    assert isinstance(storage, LocalStorage)
    _exercise(storage, tmp_path)
    assert not list((tmp_path / "root").rglob(f"{TMP_PREFIX}*"))
    with pytest.raises(ValueError, match=r"\.\."):
        storage.put_bytes("../escape", b"")


def test_retry_backs_off_on_transient_errors_only() -> None:
    delays: list[float] = []
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise _client_error(503, "SlowDown")
        if calls["n"] == 2:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    policy = RetryPolicy(attempts=5, base_delay=1.0, max_delay=8.0)
    assert retry_call(flaky, what="test", policy=policy, sleep=delays.append) == "ok"
    assert calls["n"] == 3 and len(delays) == 2
    assert 0.75 <= delays[0] <= 1.25 and 1.5 <= delays[1] <= 2.5  # exponential

    for status, code in [(403, "AccessDenied"), (404, "NoSuchKey"), (400, "InvalidRequest")]:
        assert not is_transient(_client_error(status, code))
    for status, code in [(500, "InternalError"), (400, "RequestTimeout"), (429, "TooManyRequests")]:
        assert is_transient(_client_error(status, code))

    def denied() -> None:
        raise _client_error(403, "AccessDenied")

    with pytest.raises(ClientError):
        retry_call(denied, what="test", policy=policy, sleep=delays.append)
    assert len(delays) == 2  # no retry for a permanent error


def _upload_failed(cause: ClientError | None) -> S3UploadFailedError:
    """An S3UploadFailedError as boto3's upload_file raises it: inside ``except ClientError``."""
    try:
        if cause is None:
            raise S3UploadFailedError("Failed to upload /tmp/x to b/k: connection lost")
        try:
            raise cause
        except ClientError as e:
            raise S3UploadFailedError(f"Failed to upload /tmp/x to b/k: {e}")  # noqa: B904
    except S3UploadFailedError as exc:
        return exc


def test_failed_uploads_are_transient_unless_the_request_was_refused() -> None:
    for status, code in [(503, "SlowDown"), (500, "InternalError"), (400, "RequestTimeout")]:
        assert is_transient(_upload_failed(_client_error(status, code))), code
    assert is_transient(_upload_failed(None))  # nothing chained: worth another try
    for status, code in [(403, "AccessDenied"), (404, "NoSuchBucket")]:
        assert not is_transient(_upload_failed(_client_error(status, code))), code

    delays: list[float] = []
    calls = {"n": 0}

    def upload() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise _upload_failed(_client_error(503, "SlowDown"))
        return "uploaded"

    assert retry_call(upload, what="upload", policy=FAST_RETRY, sleep=delays.append) == "uploaded"
    assert calls["n"] == 3 and len(delays) == 2

    def refused() -> None:
        raise _upload_failed(_client_error(403, "AccessDenied"))

    with pytest.raises(S3UploadFailedError, match="AccessDenied"):
        retry_call(refused, what="upload", policy=FAST_RETRY, sleep=delays.append)
    assert len(delays) == 2


def _s3_storage(server: S3Server, bucket: str, prefix: str, *, faults: bool = False) -> S3Storage:
    client = make_s3_client(
        endpoint_url=server.fault_endpoint_url if faults else server.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
        boto_max_attempts=1,  # only the trainer's own retries, which this test exercises
    )
    return S3Storage(bucket, prefix, client=client, retry=FAST_RETRY)


def test_s3_storage(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("trainer-storage")
    storage = _s3_storage(s3_server, bucket, "runs/demo")
    assert storage.uri == f"s3://{bucket}/runs/demo"
    _exercise(storage, tmp_path)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["runs/demo/big/blob.bin"]


def test_s3_endpoint_from_standard_environment(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.make_bucket("trainer-env")
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage = open_storage(f"s3://{bucket}/p")
    storage.put_bytes("k", b"v")
    assert s3_server.client().get_object(Bucket=bucket, Key="p/k")["Body"].read() == b"v"


def test_s3_retries_through_server_faults(s3_server: S3Server) -> None:
    bucket = s3_server.make_bucket("trainer-faults")
    storage = _s3_storage(s3_server, bucket, "ckpt", faults=True)
    proxy = s3_server.faults
    try:
        proxy.fail_next(4, "error", status=503, code="SlowDown")
        storage.put_bytes("a.bin", b"survived")  # retried with backoff
        proxy.fail_next(3, "drop")
        assert storage.get_bytes("a.bin") == b"survived"
        proxy.http_error(500, "InternalError")
        storage.retry = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
        with pytest.raises(ClientError, match="InternalError"):
            storage.put_bytes("b.bin", b"never")  # gives up after the last attempt
    finally:
        proxy.passthrough()
    assert [o.key for o in storage.list()] == ["a.bin"]


def test_s3_upload_file_retries_through_server_faults(s3_server: S3Server, tmp_path: Path) -> None:
    """upload_file reports a failed request as S3UploadFailedError: retried like any other."""
    bucket = s3_server.make_bucket("trainer-upload-faults")
    storage = _s3_storage(s3_server, bucket, "ckpt", faults=True)
    src = tmp_path / "lm.pt"
    src.write_bytes(b"w" * 70_000)
    proxy = s3_server.faults
    try:
        proxy.fail_next(2, "error", status=503, code="SlowDown")
        storage.upload_file(src, "step/lm.pt")
    finally:
        proxy.passthrough()
    assert storage.get_bytes("step/lm.pt") == src.read_bytes()


def _in_flight(proxy: FaultProxy, fn: Callable[[], None]) -> int:
    """The most requests ``fn`` had in flight at once through the proxy."""
    proxy.reset_peak()
    fn()
    return proxy.peak_forwarding


# in flight at once: one stream has one request (and at most the one before still closing)
@pytest.mark.parametrize(("concurrency", "fewest", "most"), [(4, 3, 4 + 1), (1, 1, 2)])
def test_s3_large_files_move_as_parallel_multipart_transfers(
    s3_server: S3Server, tmp_path: Path, concurrency: int, fewest: int, most: int
) -> None:
    """A file over the threshold goes up in parts (a multipart ETag ``<md5>-<parts>``), several in
    flight at once with ``max_concurrency`` > 1, and comes down in parallel ranges, intact."""
    bucket = s3_server.make_bucket(f"trainer-multipart-{concurrency}")
    mib = 1024 * 1024
    transfer = TransferSettings(multipart_threshold=5 * mib, chunk_size=5 * mib, max_concurrency=concurrency)
    client = _s3_storage(s3_server, bucket, "", faults=True).client
    storage = S3Storage(bucket, "ckpt", client=client, retry=FAST_RETRY, transfer=transfer)
    assert storage.child("step").transfer == transfer
    src = tmp_path / "optimizer.pt"
    src.write_bytes(os.urandom(4 * 5 * mib + 123))  # 4 full parts and a short fifth
    copy = tmp_path / "copy.pt"
    proxy = s3_server.faults
    try:
        proxy.latency(0.002)  # every part takes a moment, so parallel parts overlap
        up = _in_flight(proxy, lambda: storage.upload_file(src, "step/optimizer.pt"))
        down = _in_flight(proxy, lambda: storage.download_file("step/optimizer.pt", copy))
    finally:
        proxy.passthrough()
    etag = s3_server.client().head_object(Bucket=bucket, Key="ckpt/step/optimizer.pt")["ETag"]
    assert etag.strip('"').endswith("-5")
    assert copy.read_bytes() == src.read_bytes()
    assert fewest <= up <= most and fewest <= down <= most, (up, down)


def test_transfer_settings_defaults_are_parallel_multipart() -> None:
    config = TransferSettings().config()
    assert config.max_concurrency == 16 and config.use_threads
    assert config.multipart_threshold == config.multipart_chunksize == 64 * 1024 * 1024
    assert TransferSettings(max_concurrency=1).config().use_threads is False
