"""A real S3-compatible server for tests: the Versity S3 Gateway (versitygw) on loopback.

``s3_server`` (session scope) builds ``tests/s3server/bin/versitygw`` with
``tests/s3server/build.sh`` (a no-op when up to date; a cold build takes a few minutes), starts it
with its posix backend on a free 127.0.0.1 port, a temporary data directory and root
credentials, waits until it answers HTTP and yields an :class:`S3Server`. It skips only when the
server cannot be built at all (no Go toolchain, or Go modules that cannot be downloaded); a
compile error or a server that does not come up fails the test. ``FERMATA_VERSITYGW=/path`` uses
a prebuilt binary instead of building.

Fault injection: :attr:`S3Server.faults` is a small loopback TCP proxy (:class:`FaultProxy`) in
front of the same server, at :attr:`S3Server.fault_endpoint_url` (``env(faults=True)`` points
clients at it). By default it passes traffic through unchanged; it can add latency, reset
connections, answer HTTP errors (503 SlowDown by default) or hang, for every new connection or for
the next *n* only.

The server is shared by the whole session: a test that calls ``stop()``/``kill()`` must
``start()`` it again (in a ``finally``), and one that sets a fault must reset it with
``faults.passthrough()``.

Use it from a test module with ``from tests.s3_fixture import s3_server`` (or list
``tests.s3_fixture`` in ``pytest_plugins`` of the root conftest).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "s3server" / "build.sh"
DEFAULT_BINARY = HERE / "s3server" / "bin" / "versitygw"
BUILD_TIMEOUT_S = 1800.0
START_TIMEOUT_S = 30.0

#: Loopback needs no HTTP proxy, whatever the environment says.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

FaultMode = Literal["pass", "drop", "error", "hang"]

#: Build failures that mean "cannot build here" (offline without a module cache), not a bug.
_UNBUILDABLE = re.compile(
    r"dial tcp|no such host|connection refused|i/o timeout|proxy\.golang\.org|"
    r"GOPROXY|module lookup disabled|cannot find module|TLS handshake timeout",
    re.IGNORECASE,
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed or overloaded peer would.

    ``shutdown`` first: a bare ``close`` does not interrupt another thread blocked in ``recv`` on
    the socket (the proxy's pumps), so the connection would stay open and a client waiting for
    an answer would hang until its read timeout instead of seeing the connection drop.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def build_versitygw() -> Path:
    """Path of a versitygw binary: ``$FERMATA_VERSITYGW`` or build.sh's output (skips if unbuildable)."""
    override = os.environ.get("FERMATA_VERSITYGW")
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            pytest.fail(f"FERMATA_VERSITYGW={override} is not an executable file")
        return path
    if shutil.which("go") is None:
        if os.access(DEFAULT_BINARY, os.X_OK):
            return DEFAULT_BINARY  # built before; cannot check staleness without Go
        pytest.skip("cannot build the S3 test server (versitygw): no Go toolchain on PATH")
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{BUILD_SCRIPT} did not finish in {BUILD_TIMEOUT_S:.0f} s")
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        if _UNBUILDABLE.search(output):
            pytest.skip(f"cannot build the S3 test server (versitygw): {output[-600:]}")
        pytest.fail(f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{output[-4000:]}")
    return DEFAULT_BINARY


@dataclass
class _Fault:
    mode: FaultMode = "pass"
    latency_s: float = 0.0
    status: int = 503
    code: str = "SlowDown"


class FaultProxy:
    """Loopback TCP proxy in front of the S3 server that can slow, reset, fail or hang connections.

    Faults apply per TCP connection, when it is accepted: ``drop`` resets it, ``error`` reads one
    request and answers an S3-style XML error (``Connection: close``), ``hang`` accepts and never
    answers, ``pass`` forwards bytes, delaying every forwarded chunk (both directions) by
    ``latency_s``. Switching to a fault closes pass-through connections opened before (unless
    ``close_existing=False``) so that pooled keep-alive connections do not bypass it.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self._lock = threading.Lock()
        self._default = _Fault()
        self._next: list[_Fault] = []
        self._sockets: set[socket.socket] = set()
        self._closed = threading.Event()
        self.counts: dict[str, int] = {"pass": 0, "drop": 0, "error": 0, "hang": 0}
        #: Connections being forwarded now, and the most at once since :meth:`reset_peak` (how
        #: many requests a client had in flight together: parallel multipart parts).
        self.forwarding = 0
        self.peak_forwarding = 0
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- configuration --------------------------------------------------------------------------

    def configure(
        self,
        mode: FaultMode = "pass",
        *,
        latency_s: float = 0.0,
        status: int = 503,
        code: str = "SlowDown",
        close_existing: bool = True,
    ) -> None:
        """Fault for every new connection from now on (clears any ``fail_next`` queue)."""
        with self._lock:
            self._default = _Fault(mode, latency_s, status, code)
            self._next.clear()
        if close_existing and (mode != "pass" or latency_s > 0):
            self.close_connections()

    def passthrough(self) -> None:
        """Back to normal: forward everything without delay."""
        self.configure("pass", close_existing=False)

    def latency(self, seconds: float, *, close_existing: bool = True) -> None:
        """Forward traffic, delaying each forwarded chunk by ``seconds`` (both directions)."""
        self.configure("pass", latency_s=seconds, close_existing=close_existing)

    def drop(self) -> None:
        """Reset every new connection (clients see ECONNRESET / connection closed)."""
        self.configure("drop")

    def http_error(self, status: int = 503, code: str = "SlowDown") -> None:
        """Answer every request with an S3 XML error, e.g. 503 SlowDown or 500 InternalError."""
        self.configure("error", status=status, code=code)

    def hang(self) -> None:
        """Accept connections and never answer (client read timeouts)."""
        self.configure("hang")

    def fail_next(
        self,
        n: int,
        mode: FaultMode = "error",
        *,
        status: int = 503,
        code: str = "SlowDown",
        close_existing: bool = True,
    ) -> None:
        """Apply a fault to the next ``n`` new connections only, then the default again."""
        with self._lock:
            self._next.extend(_Fault(mode, 0.0, status, code) for _ in range(n))
        if close_existing:
            self.close_connections()

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_forwarding = self.forwarding

    def close_connections(self) -> None:
        """Reset every open proxied connection."""
        with self._lock:
            sockets = list(self._sockets)
            self._sockets.clear()
        for s in sockets:
            _reset(s)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.close_connections()
        self._thread.join(timeout=5)

    # -- machinery ------------------------------------------------------------------------------

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets.update(socks)

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._sockets.discard(s)

    def _count_forwarding(self, delta: int) -> None:
        with self._lock:
            self.forwarding += delta
            self.peak_forwarding = max(self.peak_forwarding, self.forwarding)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                fault = self._next.pop(0) if self._next else self._default
                self.counts[fault.mode] += 1
            threading.Thread(
                target=self._handle, args=(client, fault), name="s3-fault-conn", daemon=True
            ).start()

    def _handle(self, client: socket.socket, fault: _Fault) -> None:
        client.settimeout(None)
        if fault.mode == "drop":
            _reset(client)
        elif fault.mode == "error":
            self._answer_error(client, fault)
        elif fault.mode == "hang":
            self._track(client)
            with contextlib.suppress(OSError):
                while client.recv(65536):
                    pass
            self._untrack(client)
            with contextlib.suppress(OSError):
                client.close()
        else:
            self._forward(client, fault.latency_s)

    def _answer_error(self, client: socket.socket, fault: _Fault) -> None:
        try:
            client.settimeout(10.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = client.recv(65536)
                if not chunk:
                    break
                head += chunk
            header_end = head.find(b"\r\n\r\n")
            headers = head[:header_end].decode("latin-1").lower() if header_end >= 0 else ""
            method = headers.split(" ", 1)[0].upper()
            body_seen = len(head) - (header_end + 4) if header_end >= 0 else 0
            length_match = re.search(r"\r\ncontent-length:\s*(\d+)", headers)
            remaining = int(length_match.group(1)) - body_seen if length_match else 0
            if "100-continue" in headers:
                remaining = 0  # the client waits for us before it sends the body
            while remaining > 0:
                chunk = client.recv(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{fault.code}</Code><Message>Injected by the Fermata test fault "
                "proxy</Message><RequestId>fermata-fault</RequestId></Error>"
            ).encode()
            reason = {500: "Internal Server Error", 503: "Slow Down"}.get(fault.status, "Error")
            response = (
                f"HTTP/1.1 {fault.status} {reason}\r\n"
                "Content-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n"
                "Server: fermata-fault-proxy\r\n\r\n"
            ).encode()
            client.sendall(response if method == "HEAD" else response + body)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def _forward(self, client: socket.socket, latency_s: float) -> None:
        try:
            upstream = socket.create_connection((self.host, self.target_port), timeout=5.0)
        except OSError:
            _reset(client)  # server down: the client sees its connection reset
            return
        upstream.settimeout(None)
        self._track(client, upstream)
        self._count_forwarding(+1)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if latency_s > 0:
                        time.sleep(latency_s)
                    dst.sendall(data)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
            except OSError:
                _reset(dst)
                _reset(src)

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join()
        self._count_forwarding(-1)
        self._untrack(client, upstream)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.close()


@dataclass
class S3Server:
    """A running versitygw (posix backend) on loopback with root credentials."""

    binary: Path
    data_dir: Path
    log_path: Path
    port: int = field(default_factory=_free_port)
    access_key: str = "fermata-test-root"
    secret_key: str = "fermata-test-root-secret-key-0123456789"
    region: str = "us-east-1"
    host: str = "127.0.0.1"
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _faults: FaultProxy | None = field(default=None, repr=False)
    _buckets: set[str] = field(default_factory=set, repr=False)
    _suffix: Iterator[int] = field(default_factory=lambda: itertools.count(2), repr=False)
    _sidecar: Path | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def faults(self) -> FaultProxy:
        """The fault-injection proxy in front of this server (created on first use)."""
        if self._faults is None:
            self._faults = FaultProxy(self.port, self.host)
        return self._faults

    @property
    def fault_endpoint_url(self) -> str:
        return self.faults.endpoint_url

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self, *, faults: bool = False) -> dict[str, str]:
        """AWS SDK environment for a subprocess (``faults=True``: through the fault proxy)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.fault_endpoint_url if faults else self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, *, faults: bool = False, **config: Any) -> S3Client:
        """A boto3 S3 client for this server; ``config`` goes to ``botocore.config.Config``."""
        import boto3
        from botocore.config import Config

        config.setdefault("proxies", {})  # loopback: ignore any HTTP(S)_PROXY in the environment
        return boto3.client(
            "s3",
            endpoint_url=self.fault_endpoint_url if faults else self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, name: str) -> str:
        """Create a fresh, empty bucket and return its name.

        ``name`` is made S3-valid (lower case, ``[a-z0-9-]``, 3-63 chars); a name already used in
        this session gets a ``-2``, ``-3``... suffix, so every call yields a new bucket.
        """
        base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:56] or "bucket"
        base = base if len(base) >= 3 else f"{base}-bk"
        bucket = base
        while bucket in self._buckets:
            bucket = f"{base}-{next(self._suffix)}"
        self.client().create_bucket(Bucket=bucket)
        self._buckets.add(bucket)
        return bucket

    # -- process control ------------------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start (or restart) the server on the same port with the same data directory."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [str(self.binary), "--port", f"{self.host}:{self.port}", "--quiet", "posix"]
        if self._needs_sidecar():
            self._sidecar = self.data_dir.parent / f"{self.data_dir.name}-meta"
            self._sidecar.mkdir(exist_ok=True)
            args += ["--sidecar", str(self._sidecar)]
        args.append(str(self.data_dir))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VGW_", "ROOT_"))},
            "ROOT_ACCESS_KEY_ID": self.access_key,
            "ROOT_SECRET_ACCESS_KEY": self.secret_key,
            "VGW_REGION": self.region,
        }
        with self.log_path.open("ab") as log:
            log.write(f"--- start {' '.join(args)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait_ready(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM, then SIGKILL); the data directory stays."""
        self._terminate(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        self._terminate(signal.SIGKILL, 5.0)

    def close(self) -> None:
        self.stop()
        if self._faults is not None:
            self._faults.close()
            self._faults = None

    def _terminate(self, sig: signal.Signals, timeout_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)

    def _needs_sidecar(self) -> bool:
        """versitygw keeps metadata in xattrs; use a sidecar directory where they are missing."""
        try:
            os.setxattr(self.data_dir, "user.fermata.probe", b"1")
            os.removexattr(self.data_dir, "user.fermata.probe")
        except OSError:
            return True
        return False

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(f"versitygw exited ({code}) while starting:\n{self._log_tail()}")
            try:
                with _NO_PROXY.open(self.endpoint_url + "/", timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer (403 for an anonymous request) means it is serving
            except (OSError, urllib.error.URLError) as exc:
                last = repr(exc)
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"versitygw did not answer in {timeout_s} s ({last}):\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A versitygw S3 server on loopback for the whole session (see the module docstring)."""
    binary = build_versitygw()
    root = tmp_path_factory.mktemp("s3server")
    server = S3Server(binary=binary, data_dir=root / "data", log_path=root / "versitygw.log")
    server.start()
    try:
        yield server
    finally:
        server.close()


__all__ = ["FaultProxy", "S3Server", "build_versitygw", "s3_server"]
