"""Checkpoints in storage: written atomically, verified before use, pruned keep-N.

Layout::

    <storage>/checkpoints/step-000001234/lm.pt
                                        /optimizer.pt
                                        /state.pt
                                        /metrics.json
                                        /manifest.json   ← written last

A checkpoint exists only once its ``manifest.json`` does; the manifest lists every object with
its sha256 and size, and the manifest's own sha256 is the checkpoint's digest
(``sha256:<hex>`` in ``status.lastCheckpoint``). The manifest also records how long the
checkpoint took (``serializeSeconds`` writing the files locally, ``uploadSeconds`` hashing and
uploading them, ``durationSeconds`` both) and its ``sizeBytes``; ``status.lastCheckpoint``
carries ``durationSeconds`` (there including the manifest's own upload) and ``sizeBytes``, which
the operator holds against the pod's grace period (the ``CheckpointAtRisk`` condition). Manifests
from before these were recorded still verify: the duration is then unknown.

"Latest" is the newest checkpoint whose objects all verify; a checkpoint with a missing
manifest, a missing object or a digest mismatch is skipped with a warning for the one before it.
Pruning keeps the newest ``keepLast`` intact checkpoints and never deletes the newest one known to
verify.

One run per prefix: before it writes anything the trainer claims ``storage.checkpoints`` with
``<storage>/.fermata/owner.json`` (uid, namespace, name and time of its TrainingRun), created
only if absent (S3 ``If-None-Match: *``, an exclusive create on a local folder), so of two runs
racing for one prefix exactly one wins; a prefix claimed by another run is refused with a
config error (:func:`claim_prefix`). Every manifest records the run that wrote it (``run``:
uid, namespace, name); a store opened for a run only ever resumes from, or counts as its own,
manifests that run recorded, and a resume source named in ``FERMATA_RESUME_FROM`` must match the
digest the operator expects (``FERMATA_RESUME_DIGEST``) and, unless the user chose it
(``spec.resumeFrom``, ``FERMATA_RESUME_EXPLICIT``), have been recorded by this run
(:meth:`CheckpointStore.resolve_resume`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fermata_api import CheckpointRef, RunRef, parse_time
from fermata_trainer.errors import ObjectNotFoundError, TrainerConfigError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.storage import (
    ObjectInfo,
    S3Storage,
    Storage,
    open_storage,
    same_location,
    sha256_bytes,
    sha256_file,
)

log = get_logger(__name__)

CHECKPOINTS_PREFIX = "checkpoints"
MANIFEST_NAME = "manifest.json"
CHECKPOINT_FORMAT_VERSION = 1
#: The claim on a ``storage.checkpoints`` prefix, relative to it.
OWNER_KEY = ".fermata/owner.json"
_STEP_DIR = re.compile(r"^step-(\d{9})$")
#: ``<base>/checkpoints/step-NNNNNNNNN`` with an optional ``/manifest.json``.
_CHECKPOINT_URI = re.compile(r"^(?P<base>.*)/checkpoints/step-(?P<step>\d{9})(?:/manifest\.json)?$")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


# ----------------------------------------------------------------------------- run identity


def run_identity(run: RunRef) -> dict[str, Any]:
    """What a claim and a manifest record about the run that wrote them."""
    return {"uid": run.uid or None, "namespace": run.namespace, "name": run.name}


def same_run(recorded: dict[str, Any], run: RunRef) -> bool:
    """Whether ``recorded`` (a claim's or a manifest's ``run``) names ``run``: by uid when either
    has one (a run without a uid never matches one with), else by namespace and name."""
    uid = recorded.get("uid") or None
    if uid or run.uid:
        return uid == (run.uid or None)
    return str(recorded.get("name") or "") == run.name and str(recorded.get("namespace") or "default") == (
        run.namespace or "default"
    )


def describe_run(recorded: dict[str, Any]) -> str:
    """``TrainingRun team-a/run-x (uid 1234)`` and the like, for messages."""
    name = str(recorded.get("name") or "")
    namespace = str(recorded.get("namespace") or "default")
    uid = recorded.get("uid") or None
    who = (
        f"TrainingRun {namespace}/{name}"
        if name
        else "a trainer run outside Kubernetes (no TrainingRun name)"
    )
    if uid:
        return f"{who} (uid {uid})"
    return f"{who} (no uid: run outside Kubernetes)" if name else who


def _timing(serialize_seconds: float, upload_seconds: float) -> dict[str, float]:
    """A checkpoint's seconds as its manifest records them (milliseconds)."""
    return {
        "serializeSeconds": round(serialize_seconds, 3),
        "uploadSeconds": round(upload_seconds, 3),
        "durationSeconds": round(serialize_seconds + upload_seconds, 3),
    }


def _seconds(value: Any) -> float | None:
    """A recorded duration, or None where a manifest has none (written before they were
    recorded) or something that is not a non-negative number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def normalize_digest(digest: str) -> str:
    digest = digest.strip().lower()
    return digest if digest.startswith("sha256:") else f"sha256:{digest}"


# ----------------------------------------------------------------------------- the prefix claim


@dataclass(frozen=True)
class PrefixClaim:
    """The claim on a checkpoints prefix this run holds."""

    uri: str
    owner: dict[str, Any]
    #: this call wrote the claim (first use of the prefix)
    created: bool


def claim_prefix(storage: Storage, run: RunRef, attempts: int = 5) -> PrefixClaim:
    """Claim ``storage`` (a run's ``storage.checkpoints``) for ``run``, or confirm it holds it.

    The claim is created only if absent, so of two runs racing for a new prefix exactly one
    wins; it is then read back and compared (which also catches a server that ignored the
    condition, and a claim written by a retry of our own request). A claim by the same run
    (same uid; without a uid: same namespace and name) is fine: a resume, a new incarnation.
    Raises :class:`TrainerConfigError` naming the owner when another run holds the prefix.
    """
    prefix_uri = storage.uri.rstrip("/") + "/"
    claim_uri = storage.uri_of(OWNER_KEY)
    body = json.dumps(
        {**run_identity(run), "claimedAt": datetime.now(UTC).isoformat()}, indent=2, sort_keys=True
    ).encode()
    existing: dict[str, Any] | None = None
    created = False
    for attempt in range(attempts):
        created = storage.put_bytes_if_absent(OWNER_KEY, body)
        try:
            raw = storage.get_bytes(OWNER_KEY)
        except ObjectNotFoundError:  # removed in between: claim again
            continue
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            existing = parsed
            break
        # not JSON (yet): a claim still being written where there are no atomic creates
        time.sleep(0.2 * (attempt + 1))
    if existing is None:
        raise TrainerConfigError(
            f"storage.checkpoints {prefix_uri} has an owner claim {claim_uri} that cannot be read; "
            "give this run its own prefix"
        )
    if not same_run(existing, run):
        log.error(
            "checkpoints_prefix_taken",
            storage=prefix_uri,
            claim=claim_uri,
            owner=existing,
            run=run_identity(run),
        )
        raise TrainerConfigError(
            f"storage.checkpoints {prefix_uri} belongs to {describe_run(existing)}; "
            "give this run its own prefix"
        )
    log.info(
        "checkpoints_prefix_claimed" if created else "checkpoints_prefix_owned",
        storage=prefix_uri,
        claim=claim_uri,
        claimed_at=existing.get("claimedAt"),
    )
    return PrefixClaim(uri=claim_uri, owner=existing, created=created)


# ----------------------------------------------------------------------------- the store


@dataclass
class VerifiedCheckpoint:
    """A checkpoint whose every object matched its manifest, with local copies of them."""

    ref: CheckpointRef
    manifest: dict[str, Any]
    files: dict[str, Path]
    #: the run the manifest names, when that is not the store's own (an explicit start)
    other_run: dict[str, Any] | None = None
    #: the checkpoint lives under the store's own prefix
    in_store: bool = True

    @property
    def step(self) -> int:
        return self.ref.step


class CheckpointStore:
    """The checkpoints under one storage prefix.

    ``owner``: the run this store works for. Its manifests record it, and only manifests it
    recorded are resumed from, counted or pruned (a manifest from before run identities were
    recorded counts as the owner's when its ``runName`` is the owner's name). Without an owner
    (tools, tests) every manifest counts.
    """

    def __init__(
        self, storage: Storage, keep_last: int, local_dir: Path, owner: RunRef | None = None
    ) -> None:
        self.storage = storage
        self.keep_last = max(1, keep_last)
        self.local_dir = local_dir
        self.owner = owner
        #: steps this process wrote or fully verified / found broken
        self.known_good: set[int] = set()
        self.known_bad: set[int] = set()
        #: steps whose manifest another run recorded: never resumed from, counted or pruned
        self.known_foreign: set[int] = set()
        self._warned_foreign = False

    def owns(self, manifest: dict[str, Any]) -> bool:
        """Whether ``manifest`` was recorded by this store's owner."""
        if self.owner is None:
            return True
        recorded = manifest.get("run")
        if isinstance(recorded, dict):
            return same_run(recorded, self.owner)
        # written before manifests recorded the run: its name is all there is
        return str(manifest.get("runName") or "") == self.owner.name

    @staticmethod
    def recorded_run(manifest: dict[str, Any]) -> dict[str, Any]:
        recorded = manifest.get("run")
        if isinstance(recorded, dict):
            return recorded
        return {"uid": None, "name": manifest.get("runName") or ""}

    # ------------------------------------------------------------------ naming

    def dir_key(self, step: int) -> str:
        return f"{CHECKPOINTS_PREFIX}/{step_dir_name(step)}"

    def manifest_uri(self, step: int) -> str:
        return self.storage.uri_of(f"{self.dir_key(step)}/{MANIFEST_NAME}")

    # ------------------------------------------------------------------ writing

    def write(
        self,
        step: int,
        epoch: int,
        reason: str,
        files: dict[str, Path],
        extra: dict[str, Any] | None = None,
        serialize_seconds: float = 0.0,
    ) -> CheckpointRef:
        """Upload ``files`` (name → local path), then the manifest that makes them a checkpoint.

        ``serialize_seconds``: how long the caller took to write ``files``; the checkpoint's
        duration is that plus this upload, through the manifest's.
        """
        started = time.monotonic()
        prefix = self.dir_key(step)
        # a stale manifest from an earlier incarnation at the same step must not vouch for
        # objects that are about to be replaced
        self.storage.delete(f"{prefix}/{MANIFEST_NAME}")
        objects = self._upload_objects(prefix, files)
        size = sum(int(o["size"]) for o in objects)
        now = datetime.now(UTC)
        manifest = {
            "formatVersion": CHECKPOINT_FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "reason": reason,
            "time": now.isoformat(),
            "objects": objects,
            "sizeBytes": size,
            **_timing(serialize_seconds, time.monotonic() - started),
            **(extra or {}),
        }
        if self.owner is not None:
            manifest["run"] = run_identity(self.owner)
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        self.storage.put_bytes(f"{prefix}/{MANIFEST_NAME}", body)
        timing = _timing(serialize_seconds, time.monotonic() - started)
        self.known_good.add(step)
        self.known_bad.discard(step)
        self.known_foreign.discard(step)
        ref = CheckpointRef(
            uri=self.manifest_uri(step),
            step=step,
            epoch=epoch,
            digest=f"sha256:{sha256_bytes(body)}",
            time=now,
            reason=reason,
            duration_seconds=timing["durationSeconds"],
            size_bytes=size,
        )
        log.info(
            "checkpoint_written",
            step=step,
            epoch=epoch,
            reason=reason,
            uri=ref.uri,
            digest=ref.digest,
            bytes=size,
            serialize_seconds=timing["serializeSeconds"],
            upload_seconds=timing["uploadSeconds"],
            duration_seconds=timing["durationSeconds"],
        )
        return ref

    def _upload_objects(self, prefix: str, files: dict[str, Path]) -> list[dict[str, Any]]:
        """Hash and upload every file under ``prefix``: the manifest's ``objects``."""
        objects: list[dict[str, Any]] = []
        for name in sorted(files):
            path = files[name]
            objects.append({"name": name, "sha256": sha256_file(path), "size": path.stat().st_size})
            self.storage.upload_file(path, f"{prefix}/{name}")
        return objects

    # ------------------------------------------------------------------ reading

    def _listing(self) -> dict[int, dict[str, ObjectInfo]]:
        by_step: dict[int, dict[str, ObjectInfo]] = defaultdict(dict)
        for obj in self.storage.list(f"{CHECKPOINTS_PREFIX}/"):
            parts = obj.key.split("/")
            if len(parts) != 3:
                continue
            match = _STEP_DIR.match(parts[1])
            if match:
                by_step[int(match.group(1))][parts[2]] = obj
        return dict(by_step)

    def steps(self) -> list[int]:
        """Steps that have at least one object, newest first."""
        return sorted(self._listing(), reverse=True)

    def _read_manifest(self, step: int) -> tuple[dict[str, Any], bytes] | None:
        try:
            body = self.storage.get_bytes(f"{self.dir_key(step)}/{MANIFEST_NAME}")
        except ObjectNotFoundError:
            return None
        try:
            manifest = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("objects"), list):
            return None
        return manifest, body

    def verify(self, step: int) -> VerifiedCheckpoint | None:
        """Download (or locate) every object of ``step`` and check size and sha256; a
        checkpoint another run recorded is skipped without downloading anything."""
        read = self._read_manifest(step)
        if read is not None and not self.owns(read[0]):
            self.known_foreign.add(step)
            log.warning(
                "checkpoint_skipped",
                step=step,
                uri=self.manifest_uri(step),
                reason=f"written by another run: {describe_run(self.recorded_run(read[0]))}",
            )
            return None
        return self._verify_read(step, read)

    def _verify_read(self, step: int, read: tuple[dict[str, Any], bytes] | None) -> VerifiedCheckpoint | None:
        problem, result = self._verify(step, read)
        if result is None:
            self.known_bad.add(step)
            log.warning("checkpoint_skipped", step=step, uri=self.manifest_uri(step), reason=problem)
        else:
            self.known_good.add(step)
        return result

    def _verify(
        self, step: int, read: tuple[dict[str, Any], bytes] | None
    ) -> tuple[str, VerifiedCheckpoint | None]:
        if read is None:
            return "manifest.json missing or unreadable (half-written checkpoint)", None
        manifest, body = read
        prefix = self.dir_key(step)
        files: dict[str, Path] = {}
        for obj in manifest["objects"]:
            name = str(obj.get("name", ""))
            if not name or "/" in name or name == MANIFEST_NAME:
                return f"manifest lists an invalid object name {name!r}", None
            local = self.storage.local_path(f"{prefix}/{name}")
            if local is None:
                local = self.local_dir / step_dir_name(step) / name
                try:
                    self.storage.download_file(f"{prefix}/{name}", local)
                except ObjectNotFoundError:
                    return f"object {name} missing", None
            elif not local.is_file():
                return f"object {name} missing", None
            size = local.stat().st_size
            if size != int(obj.get("size", -1)):
                return f"object {name}: size {size} != manifest {obj.get('size')}", None
            digest = sha256_file(local)
            if digest != obj.get("sha256"):
                return f"object {name}: sha256 {digest} != manifest {obj.get('sha256')}", None
            files[name] = local
        ref = CheckpointRef(
            uri=self.manifest_uri(step),
            step=int(manifest.get("step", step)),
            epoch=int(manifest.get("epoch", 0)),
            digest=f"sha256:{sha256_bytes(body)}",
            time=parse_time(manifest.get("time")) or datetime.now(UTC),
            reason=manifest.get("reason"),
            duration_seconds=_seconds(manifest.get("durationSeconds")),
            size_bytes=sum(local.stat().st_size for local in files.values()),
        )
        return "", VerifiedCheckpoint(ref=ref, manifest=manifest, files=files)

    def latest_verified(self) -> VerifiedCheckpoint | None:
        """The newest checkpoint of the owner whose objects all verify (older ones tried in
        turn; other runs' manifests are skipped)."""
        for step in self.steps():
            verified = self.verify(step)
            if verified is not None:
                return verified
        return None

    def step_of_uri(self, uri: str) -> int | None:
        """The step a checkpoint URI (its folder or its manifest) names."""
        match = re.search(r"step-(\d{9})(?:/(?:manifest\.json)?)?$", uri.rstrip("/"))
        if not match:
            return None
        return int(match.group(1))

    def _source_of(self, uri: str) -> tuple[CheckpointStore, int] | None:
        """The store holding the checkpoint ``uri`` names (this one, or one opened at another
        location, read-only) and its step; None when ``uri`` names no checkpoint."""
        match = _CHECKPOINT_URI.match(uri.rstrip("/"))
        if not match:
            return None
        step = int(match.group("step"))
        base = match.group("base") or "/"
        if same_location(base, self.storage.uri):
            return self, step
        client = self.storage.client if isinstance(self.storage, S3Storage) else None
        other = open_storage(base, s3_client=client)
        if isinstance(other, S3Storage) and isinstance(self.storage, S3Storage):
            other.retry = self.storage.retry
            other.transfer = self.storage.transfer
        return CheckpointStore(other, self.keep_last, self.local_dir / "resume-source", self.owner), step

    def resolve_resume(
        self,
        resume_from: str | None,
        *,
        expected_digest: str | None = None,
        explicit: bool = False,
    ) -> VerifiedCheckpoint | None:
        """The checkpoint to resume from: ``resume_from`` when it verifies, else the owner's
        newest verified checkpoint here (None: start fresh).

        ``resume_from`` must be what the operator expects (``expected_digest``: the manifest's
        sha256, else :class:`TrainerConfigError` naming both) and a manifest this store's owner
        recorded (else :class:`TrainerConfigError`) — unless ``explicit``: the user chose it
        (``spec.resumeFrom``), so another run's checkpoint is accepted (its objects are still
        verified, and one that does not verify is an error, not a fresh start); even then the
        owner's own newest checkpoint here, once there is one, takes precedence.
        """
        if not resume_from:
            return self.latest_verified()
        source = self._source_of(resume_from)
        if source is None:
            if explicit:
                raise TrainerConfigError(
                    f"resumeFrom {resume_from} is not a checkpoint manifest URI "
                    "(<storage>/checkpoints/step-<9 digits>/manifest.json)"
                )
            log.warning(
                "resume_from_ignored",
                resume_from=resume_from,
                reason=f"not a checkpoint under {self.storage.uri_of(CHECKPOINTS_PREFIX)}",
            )
            return self.latest_verified()
        if explicit:
            own = self.latest_verified()
            if own is not None:
                log.info("resume_from_superseded", resume_from=resume_from, own=own.ref.uri)
                return own
        store, step = source
        read = store._read_manifest(step)
        if read is not None and expected_digest:
            actual = f"sha256:{sha256_bytes(read[1])}"
            if actual != normalize_digest(expected_digest):
                raise TrainerConfigError(
                    f"checkpoint {resume_from} has digest {actual}, not the "
                    f"{normalize_digest(expected_digest)} of status.lastCheckpoint: it was "
                    "rewritten after this run recorded it; refusing to resume from it"
                )
        other_run: dict[str, Any] | None = None
        if read is not None and not self.owns(read[0]):
            other_run = self.recorded_run(read[0])
            if not explicit:
                who = describe_run(run_identity(self.owner)) if self.owner else "this run"
                raise TrainerConfigError(
                    f"checkpoint {resume_from} was written by {describe_run(other_run)}, not by "
                    f"{who}; refusing to resume from it (spec.resumeFrom starts a run from "
                    "another run's checkpoint)"
                )
        verified = store._verify_read(step, read)
        if verified is None:
            if explicit:
                raise TrainerConfigError(
                    f"resumeFrom {resume_from} does not verify (missing or corrupt objects, see "
                    "the checkpoint_skipped log line)"
                )
            log.warning("resume_from_unverified", resume_from=resume_from)
            return self.latest_verified()
        verified.other_run = other_run
        verified.in_store = store is self
        return verified

    # ------------------------------------------------------------------ pruning

    def _intact(
        self, step: int, objects: dict[str, ObjectInfo], read: tuple[dict[str, Any], bytes] | None
    ) -> bool:
        """Cheap check from the listing: manifest present and every object at its size."""
        if step in self.known_bad or MANIFEST_NAME not in objects or read is None:
            return False
        for obj in read[0]["objects"]:
            info = objects.get(str(obj.get("name")))
            if info is None or info.size != int(obj.get("size", -1)):
                return False
        return True

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep_last`` intact checkpoints, and broken ones (a folder
        without a manifest only when older than the newest intact checkpoint: it may still be
        being written). The newest checkpoint that verifies is always kept. Only objects under
        ``<storage>/checkpoints/step-NNNNNNNNN/`` are ever deleted, and never those of a
        checkpoint whose manifest another run recorded."""
        listing = self._listing()
        manifests = self._own_manifests(listing)
        steps = sorted(manifests, reverse=True)
        intact = [s for s in steps if self._intact(s, listing[s], manifests[s])]
        # find the newest checkpoint that really verifies: normally the one just written (known
        # good, no download); otherwise verify intact ones newest first until one passes
        newest_good: int | None = None
        for step in list(intact):
            if step in self.known_good:
                newest_good = step
                break
            if self._verify_read(step, manifests[step]) is not None:
                newest_good = step
                break
            intact.remove(step)
        if not intact:
            return []
        keep = set(intact[: self.keep_last])
        if newest_good is not None:
            keep.add(newest_good)
        newest_intact = intact[0]
        deleted: list[int] = []
        for step in steps:
            if step in keep:
                continue
            if step > newest_intact and MANIFEST_NAME not in listing[step]:
                continue  # no manifest yet: possibly still being written elsewhere, leave it
            # manifest first: an interrupted prune leaves a half-deleted checkpoint that no
            # longer claims to be complete (and is skipped, then removed by the next prune)
            self.storage.delete(f"{self.dir_key(step)}/{MANIFEST_NAME}")
            for name in listing[step]:
                if name != MANIFEST_NAME:
                    self.storage.delete(f"{self.dir_key(step)}/{name}")
            local = self.local_dir / step_dir_name(step)
            if local.exists():
                shutil.rmtree(local, ignore_errors=True)
            deleted.append(step)
        if deleted:
            log.info("checkpoints_pruned", deleted=deleted, kept=sorted(keep, reverse=True))
        return deleted

    def _own_manifests(
        self, listing: dict[int, dict[str, ObjectInfo]]
    ) -> dict[int, tuple[dict[str, Any], bytes] | None]:
        """Step → its manifest (None: absent, unreadable or known bad) for every listed step
        but those whose manifest another run recorded (left alone, with one warning)."""
        manifests: dict[int, tuple[dict[str, Any], bytes] | None] = {}
        for step, objects in listing.items():
            read = (
                self._read_manifest(step) if MANIFEST_NAME in objects and step not in self.known_bad else None
            )
            if read is not None and not self.owns(read[0]):
                self.known_foreign.add(step)
            if step not in self.known_foreign:
                manifests[step] = read
        foreign = sorted(self.known_foreign & set(listing), reverse=True)
        if foreign and not self._warned_foreign:
            self._warned_foreign = True
            log.warning("checkpoints_of_other_runs_left", steps=foreign, storage=self.storage.uri)
        return manifests
