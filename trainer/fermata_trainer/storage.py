"""Object storage for checkpoints, code shards, samples and reports: a local folder or S3.

Every location is a URI: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path (used as
it is: inside a pod, a path on the pod's file system). A :class:`Storage` is rooted at
one such URI and addresses objects by keys relative to it (``checkpoints/step-000000010/lm.pt``).

S3 calls go through :func:`retry_call`: throttling, 5xx answers and connection errors are
retried with exponential backoff and jitter; anything else (403, 404, bad request) fails at once.
boto3 honours ``AWS_ENDPOINT_URL_S3`` (or an explicit endpoint) for S3-compatible servers, with
path-style addressing in that case.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import tempfile
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fermata_trainer.errors import ObjectNotFoundError, TrainerConfigError
from fermata_trainer.logging_setup import get_logger

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

log = get_logger(__name__)

T = TypeVar("T")

#: Temporary files written next to their final name start with this prefix; listings skip them.
TMP_PREFIX = ".tmp-"

_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "SlowDown",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
    }
)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base * 2**attempt`` seconds, capped, with ±25 % jitter."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int) -> float:
        raw = min(self.max_delay, self.base_delay * (2**attempt))
        return float(raw * random.uniform(0.75, 1.25))


DEFAULT_RETRY = RetryPolicy()


def _client_error_code(exc: BaseException) -> tuple[str, int]:
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: S3 5xx, throttling, timeouts, dropped connections.

    ``upload_file``/``upload_fileobj`` report a failed request as boto3's
    ``S3UploadFailedError`` (its message carries the request's error, which is chained as the
    exception's context): transient, unless the chained error is a permanent one such as
    AccessDenied or NoSuchBucket.
    """
    try:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            HTTPClientError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    if isinstance(exc, S3UploadFailedError):
        underlying = exc.__cause__ or exc.__context__
        return not isinstance(underlying, ClientError) or is_transient(underlying)
    if isinstance(exc, ClientError):
        code, status = _client_error_code(exc)
        return status >= 500 or status == 429 or code in _THROTTLE_CODES
    return isinstance(exc, BotoConnectionError | HTTPClientError | ConnectionError | TimeoutError)


def is_not_found(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ClientError
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, ClientError):
        code, status = _client_error_code(exc)
        return status == 404 or code in _NOT_FOUND_CODES
    return False


def retry_call(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient storage errors with backoff."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == policy.attempts - 1:
                raise
            delay = policy.delay(attempt)
            log.warning(
                "storage_retry",
                operation=what,
                attempt=attempt + 1,
                delay_s=round(delay, 3),
                error=f"{type(exc).__name__}: {exc}",
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object; ``etag`` (S3) and ``mtime_ns`` (a local file) tell versions apart."""

    key: str
    size: int
    etag: str = ""
    mtime_ns: int = 0


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _clean_key(key: str) -> str:
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"storage key may not contain '..': {key!r}")
    return "/".join(parts)


def _list_prefix(prefix: str) -> str:
    """A listing prefix: cleaned, keeping a trailing ``/`` (``a/`` must not match ``ab/x``)."""
    clean = _clean_key(prefix)
    return f"{clean}/" if clean and prefix.endswith("/") else clean


def join_key(*parts: str) -> str:
    return _clean_key("/".join(p for p in parts if p))


class Storage(ABC):
    """Objects under one root URI. Keys use ``/``; listing is recursive."""

    uri: str

    @abstractmethod
    def child(self, prefix: str) -> Storage:
        """The same storage rooted at ``<root>/<prefix>``."""

    def uri_of(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has that key: True when this call created it,
        False when one existed already (left as it was). Of two callers racing for one key,
        exactly one gets True."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raises :class:`ObjectNotFoundError` when absent."""

    @abstractmethod
    def upload_file(self, local: Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local: Path) -> None:
        """Raises :class:`ObjectNotFoundError` when absent. Written atomically."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (keys relative to the root)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object (absent is fine)."""

    def delete_prefix(self, prefix: str) -> int:
        items = self.list(prefix)
        for item in items:
            self.delete(item.key)
        return len(items)

    def local_path(self, key: str) -> Path | None:
        """Where the object lives on this machine, when the storage is a local folder."""
        return None

    def read_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))


# ----------------------------------------------------------------------------- local folder


class LocalStorage(Storage):
    """A folder. Writes go to a temporary file first and are renamed into place."""

    def __init__(self, root: Path, uri: str | None = None) -> None:
        self.root = root
        self.uri = uri if uri is not None else str(root)

    def child(self, prefix: str) -> LocalStorage:
        prefix = _clean_key(prefix)
        return LocalStorage(self.root / prefix, self.uri_of(prefix))

    def _path(self, key: str) -> Path:
        key = _clean_key(key)
        return self.root / key if key else self.root

    def local_path(self, key: str) -> Path:
        return self._path(key)

    @staticmethod
    def _atomic_write(target: Path, writer: Callable[[Path], object]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            writer(tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self._path(key), lambda p: p.write_bytes(data))

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """An exclusive create: the content goes to a temporary file that is then hard-linked
        to the final name (``link`` fails when the name exists, and a reader never sees a
        half-written object); where the file system has no hard links, ``open(path, "x")``."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp_name, target)
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE/SMB mounts): exclusive open
                try:
                    with target.open("xb") as out:
                        out.write(data)
                        out.flush()
                        os.fsync(out.fileno())
                except FileExistsError:
                    return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"{self.uri_of(key)} does not exist") from exc

    def upload_file(self, local: Path, key: str) -> None:
        target = self._path(key)
        if local.resolve() == target.resolve():
            return
        self._atomic_write(target, lambda p: shutil.copyfile(local, p))

    def download_file(self, key: str, local: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFoundError(f"{self.uri_of(key)} does not exist")
        if local.exists() and local.resolve() == source.resolve():
            return
        self._atomic_write(local, lambda p: shutil.copyfile(source, p))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        clean = _list_prefix(prefix)
        # walk only the folder the prefix is inside ("a/b/c" → a/b; "a/b/" → a/b)
        folder = clean.rpartition("/")[0]
        start = self.root / folder if folder else self.root
        out: list[ObjectInfo] = []
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(clean):
                    try:
                        stat = full.stat()
                    except FileNotFoundError:  # removed while listing
                        continue
                    out.append(ObjectInfo(key, stat.st_size, mtime_ns=stat.st_mtime_ns))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # tidy empty folders up to the root
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


# ----------------------------------------------------------------------------- S3


def s3_endpoint_from_env(environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


_MIB = 1024 * 1024


@dataclass(frozen=True)
class TransferSettings:
    """How files move to and from S3 (boto3's managed transfer): a file of at least
    ``multipart_threshold`` bytes goes as a multipart upload (a ranged download) of
    ``chunk_size`` parts, ``max_concurrency`` of them in flight at once. A single stream to S3
    tops out around 100 MB/s; parallel parts are what lets a multi-GB checkpoint finish inside a
    spot notice. boto3 raises the part size itself where a file would need over 10,000 parts."""

    multipart_threshold: int = 64 * _MIB
    chunk_size: int = 64 * _MIB
    max_concurrency: int = 16

    def config(self) -> TransferConfig:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.chunk_size,
            max_concurrency=self.max_concurrency,
            use_threads=self.max_concurrency > 1,
        )


DEFAULT_TRANSFER = TransferSettings()


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    boto_max_attempts: int = 2,
    max_pool_connections: int = 2 * DEFAULT_TRANSFER.max_concurrency,
) -> Any:
    """A boto3 S3 client; path-style addressing when an endpoint (S3-compatible server) is set.

    botocore retries once itself (``boto_max_attempts``); :func:`retry_call` adds the longer
    exponential backoff on top. The connection pool is sized for parallel multipart transfers
    (``max_pool_connections``: at least a transfer's ``max_concurrency``).
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or s3_endpoint_from_env()
    region_name = (
        region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    )
    config = Config(
        retries={"max_attempts": boto_max_attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region_name,
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, _clean_key(prefix)


class S3Storage(Storage):
    """A prefix in an S3 bucket. Single PUTs are atomic, so no temporary objects are needed.

    Files go up and come down as parallel multipart transfers (``transfer``, see
    :class:`TransferSettings`); a multipart upload only becomes visible once it is completed.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        transfer: TransferSettings = DEFAULT_TRANSFER,
    ) -> None:
        self.bucket = bucket
        self.prefix = _clean_key(prefix)
        self.client = client if client is not None else make_s3_client()
        self.retry = retry
        self.transfer = transfer
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def child(self, prefix: str) -> S3Storage:
        return S3Storage(self.bucket, join_key(self.prefix, prefix), self.client, self.retry, self.transfer)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return retry_call(fn, what=what, policy=self.retry)
        except Exception as exc:
            if is_not_found(exc):
                raise ObjectNotFoundError(f"{what}: not found") from exc
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._call(
            f"put s3://{self.bucket}/{full}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data),
        )

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """``PutObject`` with ``If-None-Match: *`` (S3 conditional writes): 412
        PreconditionFailed means the object exists. A 409 ConditionalRequestConflict (a
        concurrent conditional write still in flight) is retried, and then normally answers
        412. A server that refuses the header (501 NotImplemented) gets a plain existence check
        and PUT instead, which is not race-free: callers read the object back and compare."""
        full = self._key(key)
        what = f"put-if-absent s3://{self.bucket}/{full}"
        for attempt in range(self.retry.attempts):
            try:
                self._call(
                    what,
                    lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*"),
                )
                return True
            except Exception as exc:
                code, status = _client_error_code(exc)
                if status == 412 or code == "PreconditionFailed":
                    return False
                if (status == 409 or code == "ConditionalRequestConflict") and (
                    attempt < self.retry.attempts - 1
                ):
                    time.sleep(self.retry.delay(attempt))
                    continue
                if status == 501 or code == "NotImplemented":
                    log.warning("conditional_write_unsupported", operation=what, error=str(exc))
                    if self.exists(key):
                        return False
                    self.put_bytes(key, data)
                    return True
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)

        def fetch() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            body: bytes = response["Body"].read()
            return body

        return self._call(f"get s3://{self.bucket}/{full}", fetch)

    def upload_file(self, local: Path, key: str) -> None:
        full = self._key(key)
        self._call(
            f"upload s3://{self.bucket}/{full}",
            lambda: self.client.upload_file(str(local), self.bucket, full, Config=self.transfer.config()),
        )

    def download_file(self, key: str, local: Path) -> None:
        full = self._key(key)
        local.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> None:
            fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=local.parent)
            os.close(fd)
            try:
                self.client.download_file(self.bucket, full, tmp_name, Config=self.transfer.config())
                os.replace(tmp_name, local)
            finally:
                if os.path.exists(tmp_name):
                    os.unlink(tmp_name)

        self._call(f"download s3://{self.bucket}/{full}", fetch)

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self._call(
                f"head s3://{self.bucket}/{full}",
                lambda: self.client.head_object(Bucket=self.bucket, Key=full),
            )
        except ObjectNotFoundError:
            return False
        return True

    def _iter_objects(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page: dict[str, Any] = self._call(
                f"list s3://{self.bucket}/{full_prefix}",
                lambda kw=kwargs: self.client.list_objects_v2(**kw),  # type: ignore[misc]
            )
            yield from page.get("Contents", []) or []
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        clean = _list_prefix(prefix)
        out: list[ObjectInfo] = []
        for obj in self._iter_objects(base + clean):
            key = str(obj["Key"])[len(base) :]
            etag = str(obj.get("ETag", "")).strip('"')
            out.append(ObjectInfo(key, int(obj.get("Size", 0)), etag=etag))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self._call(
                f"delete s3://{self.bucket}/{full}",
                lambda: self.client.delete_object(Bucket=self.bucket, Key=full),
            )
        except ObjectNotFoundError:
            return


# ----------------------------------------------------------------------------- opening URIs


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


class InvalidUriError(TrainerConfigError, ValueError):
    """A location URI that names no place this trainer can reach (a ``file://`` URI of
    another host, say)."""


def local_path_of(uri: str) -> Path:
    """The filesystem path of a local URI: a plain path as it is; a ``file://`` URI
    percent-decoded (``file:///data/my%20song.mp3`` → ``/data/my song.mp3``), with no host or
    ``localhost`` (another host's files are not reachable: :class:`InvalidUriError`)."""
    if not uri.startswith("file://"):
        return Path(uri)
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise InvalidUriError(
            f"{uri!r} names a file on host {parts.netloc!r}: a file:// URI must be local "
            f"(file:///absolute/path or file://localhost/absolute/path)"
        )
    path = urllib.parse.unquote(parts.path)
    if parts.query or parts.fragment:  # '?' and '#' are part of the file name unless encoded
        path += ("?" + urllib.parse.unquote(parts.query) if parts.query else "") + (
            "#" + urllib.parse.unquote(parts.fragment) if parts.fragment else ""
        )
    return Path(path)


def open_storage(uri: str, s3_client: Any | None = None) -> Storage:
    """A :class:`Storage` rooted at ``uri`` (``s3://bucket/prefix`` or a local path)."""
    if is_s3_uri(uri):
        bucket, prefix = parse_s3_uri(uri)
        return S3Storage(bucket, prefix, client=s3_client)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: use s3://bucket/prefix or a path")
    return LocalStorage(local_path_of(uri), uri.rstrip("/") or "/")


def same_location(a: str, b: str) -> bool:
    """Whether two storage URIs name the same place (``s3://b/p/`` = ``s3://b/p``; a local
    path, ``file://`` or not, compared resolved)."""
    if is_s3_uri(a) or is_s3_uri(b):
        if not (is_s3_uri(a) and is_s3_uri(b)):
            return False
        return parse_s3_uri(a) == parse_s3_uri(b)
    if any("://" in u and not u.startswith("file://") for u in (a, b)):
        return a.rstrip("/") == b.rstrip("/")
    return local_path_of(a).resolve() == local_path_of(b).resolve()


def split_uri(uri: str) -> tuple[Storage, str]:
    """The storage of an object's parent folder and the object's key in it."""
    stripped = uri.rstrip("/")
    parent, _, name = stripped.rpartition("/")
    if is_s3_uri(uri) and parent in ("s3:/", "s3:"):
        raise ValueError(f"{uri!r} names a bucket, not an object")
    if not parent:
        parent = "."
    if uri.startswith("file://"):  # keys are plain names; the URI is percent-encoded
        local_path_of(uri)  # another host's file: the error names the whole URI
        name = urllib.parse.unquote(name)
    return open_storage(parent), name


def read_uri_bytes(uri: str) -> bytes:
    storage, key = split_uri(uri)
    return storage.get_bytes(key)


def fetch_uri_to_file(uri: str, local: Path) -> Path:
    """A local copy of ``uri``: the file itself when local, else a download to ``local``."""
    if not is_s3_uri(uri):
        path = local_path_of(uri)
        if not path.is_file():
            raise ObjectNotFoundError(f"{uri} does not exist")
        return path
    storage, key = split_uri(uri)
    storage.download_file(key, local)
    return local


def join_uri(base: str, *parts: str) -> str:
    tail = join_key(*parts)
    if not tail:
        return base
    return f"{base.rstrip('/')}/{tail}"
