"""The S3 test server (versitygw on loopback) and its fault proxy, exercised with boto3."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from tests.s3_fixture import S3Server, s3_server  # noqa: F401  (the fixture)

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

MIB = 1024 * 1024


def test_put_get_list_delete(s3_server: S3Server) -> None:  # noqa: F811
    s3 = s3_server.client()
    bucket = s3_server.make_bucket("basic")
    s3.put_object(Bucket=bucket, Key="runs/a/ckpt-1.pt", Body=b"one")
    s3.put_object(Bucket=bucket, Key="runs/a/ckpt-2.pt", Body=b"two" * 1000)
    s3.put_object(Bucket=bucket, Key="runs/b/ckpt-1.pt", Body=b"")
    assert s3.get_object(Bucket=bucket, Key="runs/a/ckpt-1.pt")["Body"].read() == b"one"
    head = s3.head_object(Bucket=bucket, Key="runs/a/ckpt-2.pt")
    assert head["ContentLength"] == 3000

    listed = s3.list_objects_v2(Bucket=bucket, Prefix="runs/a/")
    assert [o["Key"] for o in listed.get("Contents", [])] == ["runs/a/ckpt-1.pt", "runs/a/ckpt-2.pt"]
    dirs = s3.list_objects_v2(Bucket=bucket, Prefix="runs/", Delimiter="/")
    assert [p["Prefix"] for p in dirs.get("CommonPrefixes", [])] == ["runs/a/", "runs/b/"]

    s3.delete_object(Bucket=bucket, Key="runs/a/ckpt-1.pt")
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket=bucket, Key="runs/a/ckpt-1.pt")
    assert err.value.response["Error"]["Code"] == "NoSuchKey"
    remaining = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert sorted(o["Key"] for o in remaining) == ["runs/a/ckpt-2.pt", "runs/b/ckpt-1.pt"]


def test_make_bucket_gives_fresh_buckets(s3_server: S3Server) -> None:  # noqa: F811
    first = s3_server.make_bucket("Fresh_Bucket")
    second = s3_server.make_bucket("Fresh_Bucket")
    assert first == "fresh-bucket" and second != first
    names = {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    assert {first, second} <= names


def test_multipart_upload(s3_server: S3Server) -> None:  # noqa: F811
    s3 = s3_server.client()
    bucket = s3_server.make_bucket("multipart")
    parts_data = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(123_457)]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big.bin")
    parts: list[CompletedPartTypeDef] = []
    for number, data in enumerate(parts_data, start=1):
        etag = s3.upload_part(
            Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"], PartNumber=number, Body=data
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    listed = s3.list_parts(Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"])
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2, 3]
    s3.complete_multipart_upload(
        Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert body == b"".join(parts_data)
    ranged = s3.get_object(Bucket=bucket, Key="big.bin", Range=f"bytes={5 * MIB}-{5 * MIB + 9}")
    assert ranged["Body"].read() == parts_data[1][:10]

    aborted = s3.create_multipart_upload(Bucket=bucket, Key="aborted.bin")
    s3.upload_part(Bucket=bucket, Key="aborted.bin", UploadId=aborted["UploadId"], PartNumber=1, Body=b"x")
    s3.abort_multipart_upload(Bucket=bucket, Key="aborted.bin", UploadId=aborted["UploadId"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["big.bin"]


def test_managed_transfer_uses_multipart(s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    from boto3.s3.transfer import TransferConfig

    s3 = s3_server.client()
    bucket = s3_server.make_bucket("transfer")
    src = tmp_path / "src.bin"
    data = os.urandom(12 * MIB)
    src.write_bytes(data)
    config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    s3.upload_file(str(src), bucket, "ckpt/model.pt", Config=config)
    head = s3.head_object(Bucket=bucket, Key="ckpt/model.pt")
    assert head["ContentLength"] == len(data)
    assert str(head["ETag"]).strip('"').endswith("-3")  # a 3-part multipart ETag
    dst = tmp_path / "dst.bin"
    s3.download_file(bucket, "ckpt/model.pt", str(dst), Config=config)
    assert dst.read_bytes() == data


def test_stop_start_keeps_data(s3_server: S3Server) -> None:  # noqa: F811
    s3 = s3_server.client()
    bucket = s3_server.make_bucket("durable")
    s3.put_object(Bucket=bucket, Key="state.json", Body=b'{"step": 42}')
    port = s3_server.port

    s3_server.stop()
    try:
        assert not s3_server.running
        down = s3_server.client(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1)
        with pytest.raises(EndpointConnectionError):
            down.list_objects_v2(Bucket=bucket)
    finally:
        s3_server.start()  # the server is shared by the session: leave it running
    assert s3_server.running and s3_server.port == port
    assert s3.get_object(Bucket=bucket, Key="state.json")["Body"].read() == b'{"step": 42}'

    s3_server.kill()  # a crash, not a clean shutdown
    s3_server.start()  # data written before the crash is still there
    assert s3.get_object(Bucket=bucket, Key="state.json")["Body"].read() == b'{"step": 42}'


def test_env_drives_a_subprocess(s3_server: S3Server) -> None:  # noqa: F811
    bucket = s3_server.make_bucket("subprocess")
    code = (
        "import boto3, sys; s3 = boto3.client('s3'); "
        "s3.put_object(Bucket=sys.argv[1], Key='from-env', Body=b'ok'); "
        "print(s3.get_object(Bucket=sys.argv[1], Key='from-env')['Body'].read().decode())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env())
    env["NO_PROXY"] = "127.0.0.1,localhost"
    out = subprocess.run(
        [sys.executable, "-c", code, bucket], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert set(s3_server.env()) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    }


def test_fault_proxy(s3_server: S3Server) -> None:  # noqa: F811
    bucket = s3_server.make_bucket("faults")
    proxy = s3_server.faults
    no_retry = s3_server.client(faults=True, retries={"max_attempts": 1, "mode": "standard"}, read_timeout=1)
    try:
        no_retry.put_object(Bucket=bucket, Key="k", Body=b"v")  # pass-through
        assert no_retry.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"

        proxy.http_error(503)
        with pytest.raises(ClientError) as err:
            no_retry.get_object(Bucket=bucket, Key="k")
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert err.value.response["Error"]["Code"] == "SlowDown"
        with pytest.raises(ClientError):
            no_retry.put_object(Bucket=bucket, Key="k2", Body=b"x" * 100_000)

        proxy.drop()
        with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
            no_retry.get_object(Bucket=bucket, Key="k")

        proxy.hang()
        with pytest.raises(Exception, match="timed out|Read timeout"):
            no_retry.get_object(Bucket=bucket, Key="k")

        proxy.latency(0.2)
        start = time.monotonic()
        assert no_retry.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
        assert time.monotonic() - start >= 0.4  # request + response chunks each delayed

        # Two 503s, then success: a client with retries gets through.
        proxy.passthrough()
        proxy.fail_next(2, "error", status=503)
        retrying = s3_server.client(faults=True, retries={"max_attempts": 3, "mode": "standard"})
        before = proxy.counts["error"]
        assert retrying.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
        assert proxy.counts["error"] - before == 2
    finally:
        proxy.passthrough()
