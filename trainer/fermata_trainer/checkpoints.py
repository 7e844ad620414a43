"""Checkpoints in storage: written atomically, verified before use, pruned keep-N.

Layout::

    <storage>/checkpoints/step-000001234/lm.pt
                                        /optimizer.pt
                                        /state.pt
                                        /metrics.json
                                        /manifest.json   ← written last

A checkpoint exists only once its ``manifest.json`` does; the manifest lists every object with
its sha256 and size, and the manifest's own sha256 is the checkpoint's digest
(``sha256:<hex>`` in ``status.lastCheckpoint``). "Latest" is the newest checkpoint whose objects
all verify; a checkpoint with a missing manifest, a missing object or a digest mismatch is
skipped with a warning for the one before it. Pruning keeps the newest ``keepLast`` intact
checkpoints and never deletes the newest one known to verify.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fermata_api import CheckpointRef, parse_time
from fermata_trainer.errors import ObjectNotFoundError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.storage import ObjectInfo, Storage, sha256_bytes, sha256_file

log = get_logger(__name__)

CHECKPOINTS_PREFIX = "checkpoints"
MANIFEST_NAME = "manifest.json"
CHECKPOINT_FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


@dataclass
class VerifiedCheckpoint:
    """A checkpoint whose every object matched its manifest, with local copies of them."""

    ref: CheckpointRef
    manifest: dict[str, Any]
    files: dict[str, Path]

    @property
    def step(self) -> int:
        return self.ref.step


class CheckpointStore:
    def __init__(self, storage: Storage, keep_last: int, local_dir: Path) -> None:
        self.storage = storage
        self.keep_last = max(1, keep_last)
        self.local_dir = local_dir
        #: steps this process wrote or fully verified / found broken
        self.known_good: set[int] = set()
        self.known_bad: set[int] = set()

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
    ) -> CheckpointRef:
        """Upload ``files`` (name → local path), then the manifest that makes them a checkpoint."""
        prefix = self.dir_key(step)
        # a stale manifest from an earlier incarnation at the same step must not vouch for
        # objects that are about to be replaced
        self.storage.delete(f"{prefix}/{MANIFEST_NAME}")
        objects: list[dict[str, Any]] = []
        for name in sorted(files):
            path = files[name]
            objects.append({"name": name, "sha256": sha256_file(path), "size": path.stat().st_size})
            self.storage.upload_file(path, f"{prefix}/{name}")
        now = datetime.now(UTC)
        manifest = {
            "formatVersion": CHECKPOINT_FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "reason": reason,
            "time": now.isoformat(),
            "objects": objects,
            **(extra or {}),
        }
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        self.storage.put_bytes(f"{prefix}/{MANIFEST_NAME}", body)
        self.known_good.add(step)
        self.known_bad.discard(step)
        ref = CheckpointRef(
            uri=self.manifest_uri(step),
            step=step,
            epoch=epoch,
            digest=f"sha256:{sha256_bytes(body)}",
            time=now,
            reason=reason,
        )
        log.info(
            "checkpoint_written",
            step=step,
            epoch=epoch,
            reason=reason,
            uri=ref.uri,
            digest=ref.digest,
            bytes=sum(int(o["size"]) for o in objects),
        )
        return ref

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
        """Download (or locate) every object of ``step`` and check size and sha256."""
        problem, result = self._verify(step)
        if result is None:
            self.known_bad.add(step)
            log.warning("checkpoint_skipped", step=step, uri=self.manifest_uri(step), reason=problem)
        else:
            self.known_good.add(step)
        return result

    def _verify(self, step: int) -> tuple[str, VerifiedCheckpoint | None]:
        read = self._read_manifest(step)
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
        )
        return "", VerifiedCheckpoint(ref=ref, manifest=manifest, files=files)

    def latest_verified(self) -> VerifiedCheckpoint | None:
        """The newest checkpoint whose objects all verify (older ones tried in turn)."""
        for step in self.steps():
            verified = self.verify(step)
            if verified is not None:
                return verified
        return None

    def step_of_uri(self, uri: str) -> int | None:
        """The step a checkpoint URI (its folder or its manifest) names; it is looked up in
        this store, which is where the trainer reports its checkpoints from."""
        match = re.search(r"step-(\d{9})(?:/(?:manifest\.json)?)?$", uri.rstrip("/"))
        if not match:
            return None
        return int(match.group(1))

    def resolve_resume(self, resume_from: str | None) -> VerifiedCheckpoint | None:
        """``resume_from`` when it names a checkpoint here that verifies, else the latest."""
        if resume_from:
            step = self.step_of_uri(resume_from)
            if step is None:
                log.warning(
                    "resume_from_ignored",
                    resume_from=resume_from,
                    reason=f"not a checkpoint under {self.storage.uri_of(CHECKPOINTS_PREFIX)}",
                )
            else:
                verified = self.verify(step)
                if verified is not None:
                    return verified
                log.warning("resume_from_unverified", resume_from=resume_from)
        return self.latest_verified()

    # ------------------------------------------------------------------ pruning

    def _intact(self, step: int, objects: dict[str, ObjectInfo]) -> bool:
        """Cheap check from the listing: manifest present and every object at its size."""
        if step in self.known_bad or MANIFEST_NAME not in objects:
            return False
        read = self._read_manifest(step)
        if read is None:
            return False
        for obj in read[0]["objects"]:
            info = objects.get(str(obj.get("name")))
            if info is None or info.size != int(obj.get("size", -1)):
                return False
        return True

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep_last`` intact checkpoints, and broken ones (a folder
        without a manifest only when older than the newest intact checkpoint: it may still be
        being written). The newest checkpoint that verifies is always kept."""
        listing = self._listing()
        steps = sorted(listing, reverse=True)
        intact = [s for s in steps if self._intact(s, listing[s])]
        # find the newest checkpoint that really verifies: normally the one just written (known
        # good, no download); otherwise verify intact ones newest first until one passes
        newest_good: int | None = None
        for step in list(intact):
            if step in self.known_good:
                newest_good = step
                break
            if self.verify(step) is not None:
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
