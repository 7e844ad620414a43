"""Model mirrors: the base model and its text encoders, fetched once, kept in storage.

A pod's Hugging Face cache is an ``emptyDir``: it starts empty in every new pod. So the first
pod of a run, once it has the base model and its text encoders, copies them to
``<storage.checkpoints>/model/`` with a sha256 manifest (``mirror.json``); every later pod of
the run restores them from there into its cache and loads with the Hub switched off.

The same layout, written by ``fermata-train stage-models --to s3://bucket/models``, is the
air-gapped mode: ``s3://bucket/models/facebook/musicgen-small/`` holds that model and its T5
encoder, and a run whose ``model.base`` points there never touches the Hub.

Layout::

    <prefix>/mirror.json                 ← written last; lists every object with sha256 + size
    <prefix>/hub/<repo id>/<file>        ← Hub repositories (the model, the text encoders)
    <prefix>/base/<file>                 ← a model that came from a folder (a run's export)
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fermata_trainer.errors import StorageError, TrainerConfigError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.model_hub import CachedRepo, write_snapshot
from fermata_trainer.storage import Storage, sha256_file

log = get_logger(__name__)

MIRROR_MANIFEST = "mirror.json"
MIRROR_FORMAT_VERSION = 1
#: ``storage.checkpoints``-relative prefix of a run's own mirror.
RUN_MIRROR_PREFIX = "model"


class MirrorCorruptError(StorageError):
    """A mirrored object is missing or does not match its manifest (transient: written again)."""


@dataclass(frozen=True)
class ModelFiles:
    """What a model load needs, on local disk: the base model and the text encoders."""

    #: the base as ``MusicGen.get_pretrained`` takes it: a Hub id (in the cache) or a folder
    load_from: str
    #: the base model's files (a cached Hub snapshot or a folder)
    model_dir: Path
    #: set when the base is a Hub repository
    model_repo: CachedRepo | None
    text_encoders: tuple[CachedRepo, ...]
    #: where these came from: ``hub``, ``folder``, ``mirror``
    origin: str

    @property
    def compression_file(self) -> Path:
        return self.model_dir / "compression_state_dict.bin"


def _entry(files: dict[str, Path]) -> list[dict[str, Any]]:
    return [
        {"name": name, "sha256": sha256_file(path), "size": path.stat().st_size}
        for name, path in sorted(files.items())
    ]


def _upload(storage: Storage, prefix: str, files: dict[str, Path]) -> list[dict[str, Any]]:
    objects = _entry(files)
    for obj in objects:
        storage.upload_file(files[obj["name"]], f"{prefix}/{obj['name']}")
    return objects


def publish_mirror(
    storage: Storage, base: str, model: ModelFiles, extra: dict[str, Any] | None = None
) -> str:
    """Copy ``model`` to ``storage`` (objects first, manifest last); returns the manifest URI."""
    storage.delete(MIRROR_MANIFEST)
    manifest: dict[str, Any] = {
        "formatVersion": MIRROR_FORMAT_VERSION,
        "base": base,
        "time": datetime.now(UTC).isoformat(),
        "textEncoders": [],
        **(extra or {}),
    }
    if model.model_repo is not None:
        repo = model.model_repo
        manifest["model"] = {
            "kind": "hub",
            "repo": repo.repo_id,
            "revision": repo.revision,
            "objects": _upload(storage, f"hub/{repo.repo_id}", repo.paths()),
        }
    else:
        files = {p.name: p for p in sorted(model.model_dir.iterdir()) if p.is_file()}
        manifest["model"] = {"kind": "folder", "objects": _upload(storage, "base", files)}
    for encoder in model.text_encoders:
        manifest["textEncoders"].append(
            {
                "repo": encoder.repo_id,
                "revision": encoder.revision,
                "objects": _upload(storage, f"hub/{encoder.repo_id}", encoder.paths()),
            }
        )
    storage.put_bytes(MIRROR_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    uri = storage.uri_of(MIRROR_MANIFEST)
    log.info(
        "model_mirrored",
        uri=uri,
        base=base,
        text_encoders=[e.repo_id for e in model.text_encoders],
        bytes=sum(o["size"] for o in _all_objects(manifest)),
    )
    return uri


def _all_objects(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = list(manifest["model"]["objects"])
    for encoder in manifest.get("textEncoders", []):
        out.extend(encoder["objects"])
    return out


def read_mirror(storage: Storage) -> dict[str, Any] | None:
    """The mirror manifest at ``storage``, or None when there is none."""
    if not storage.exists(MIRROR_MANIFEST):
        return None
    raw = storage.get_bytes(MIRROR_MANIFEST)
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise TrainerConfigError(
            f"{storage.uri_of(MIRROR_MANIFEST)} is not a model mirror manifest"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("formatVersion") != MIRROR_FORMAT_VERSION:
        raise TrainerConfigError(
            f"{storage.uri_of(MIRROR_MANIFEST)}: unsupported model mirror format "
            f"{manifest.get('formatVersion') if isinstance(manifest, dict) else '?'}"
        )
    return manifest


def _download(storage: Storage, prefix: str, objects: list[dict[str, Any]], target: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for obj in objects:
        name = str(obj["name"])
        if "/" in name or name in ("", ".", ".."):
            raise TrainerConfigError(f"{storage.uri}: bad object name {name!r} in the mirror manifest")
        local = target / name
        storage.download_file(f"{prefix}/{name}", local)
        if local.stat().st_size != int(obj["size"]) or sha256_file(local) != obj["sha256"]:
            raise MirrorCorruptError(
                f"{storage.uri_of(prefix + '/' + name)} does not match the mirror manifest "
                "(size or sha256); the mirror is written again by the next pod that fetches the model"
            )
        files[name] = local
    return files


def restore_mirror(storage: Storage, manifest: dict[str, Any], cache: Path, work_dir: Path) -> ModelFiles:
    """Download and verify the mirror; Hub repositories go into the cache at ``cache``, a folder
    model under ``work_dir``."""
    encoders: list[CachedRepo] = []
    with tempfile.TemporaryDirectory(prefix="mirror-", dir=_mkdir(work_dir)) as tmp:
        for encoder in manifest.get("textEncoders", []):
            encoders.append(_restore_repo(storage, encoder, cache, Path(tmp)))
        model = manifest["model"]
        if model.get("kind") == "hub":
            repo = _restore_repo(storage, model, cache, Path(tmp))
            files = ModelFiles(repo.repo_id, repo.snapshot, repo, tuple(encoders), "mirror")
        else:
            target = work_dir / "models" / "mirror-base"
            if target.exists():
                shutil.rmtree(target)
            _download(storage, "base", list(model["objects"]), _mkdir(target))
            files = ModelFiles(str(target), target, None, tuple(encoders), "mirror")
    log.info(
        "model_restored_from_mirror",
        uri=storage.uri_of(MIRROR_MANIFEST),
        base=manifest.get("base"),
        text_encoders=[e.repo_id for e in encoders],
    )
    return files


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _restore_repo(storage: Storage, entry: dict[str, Any], cache: Path, tmp: Path) -> CachedRepo:
    repo_id = str(entry.get("repo"))
    revision = str(entry.get("revision"))
    if not _REPO_ID.match(repo_id) or ".." in repo_id or not _REVISION.match(revision):
        raise TrainerConfigError(
            f"{storage.uri_of(MIRROR_MANIFEST)}: bad repository {repo_id!r} or revision {revision!r}"
        )
    target = tmp / repo_id.replace("/", "--")
    downloaded = _download(storage, f"hub/{repo_id}", list(entry["objects"]), _mkdir(target))
    return write_snapshot(cache, repo_id, revision, downloaded)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
