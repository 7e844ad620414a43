"""Dataset preparation: MagnaTagATune (filtered by proxy tags) or a generic JSONL manifest.

Preparation turns the configured source into a *manifest*: one JSON line per usable clip with its
audio URI, text prompt, split (train/validation, by a hash of the clip id), sha256 digest and
size. The manifest and a JSON report of everything skipped (and why) are written to
``<storage>/dataset/``, with ``files.json``: each listed file's identity (size + mtime, or size
+ ETag on S3) and what checking it found. A later run re-lists the source: when the settings, the
listing and every identity match, the manifest is reused as it is; otherwise it is prepared again
incrementally — only new and changed files are fetched, decoded and hashed — and the report's
``files`` says how many were new, reused, changed and removed. The recorded digests are verified
before any file is tokenized, so a change the identity misses is still caught.

Problems that retrying cannot fix raise :class:`DatasetError` subclasses with readable
messages; the CLI turns them into :data:`~fermata_api.contract.EXIT_CONFIG_ERROR`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from fermata_api import DatasetSource, DatasetSpec
from fermata_trainer.audio_io import TRUNCATION_RATIO, AudioFacts, UnreadableAudioError, inspect_audio
from fermata_trainer.curation import curate, mix_group
from fermata_trainer.errors import ObjectNotFoundError, TrainerConfigError
from fermata_trainer.folder_source import EmptyFolderError, save_folder_manifest, scan_folder
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.prompts import prompt_from_tags
from fermata_trainer.storage import (
    Storage,
    fetch_uri_to_file,
    is_s3_uri,
    join_uri,
    local_path_of,
    open_storage,
    parse_s3_uri,
    read_uri_bytes,
    sha256_bytes,
    sha256_file,
)

log = get_logger(__name__)

MTAT_ANNOTATIONS = "annotations_final.csv"
MTAT_ID_COLUMN = "clip_id"
MTAT_PATH_COLUMN = "mp3_path"
MTAT_AUDIO_DIRS = ("mp3", "")

DATASET_FORMAT_VERSION = 2
MANIFEST_KEY = "dataset/manifest.jsonl"
REPORT_KEY = "dataset/report.json"
#: what each listed file was (its identity) and what checking it found, for the next preparation
FILES_KEY = "dataset/files.json"

TRAIN = "train"
VALIDATION = "validation"


class DatasetError(TrainerConfigError):
    """The dataset cannot be used as configured."""


class MissingColumnError(DatasetError):
    """A required column (clip_id, mp3_path or a proxy tag) is absent from the CSV."""


class EmptySubsetError(DatasetError):
    """No clip is left after filtering and checking the files."""


class ManifestFormatError(DatasetError):
    """A line of a generic manifest is not valid."""


class ChecksumMismatchError(DatasetError):
    """An audio file no longer matches the sha256 recorded in the manifest."""


__all__ = [
    "ChecksumMismatchError",
    "ClipEntry",
    "DatasetError",
    "EmptySubsetError",
    "ManifestFormatError",
    "MissingColumnError",
    "PreparedDataset",
    "UnreadableAudioError",
    "prepare_dataset",
]


@dataclass(frozen=True)
class ClipEntry:
    """One usable clip of the manifest."""

    id: str
    audio: str
    description: str
    split: str
    sha256: str
    size: int
    duration: float
    tags: tuple[str, ...] = ()
    bpm: float | None = None
    key: str | None = None
    group: str | None = None  # its source (dataset.sources) or mix.by value: see curation.py

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClipEntry:
        return cls(
            id=str(data["id"]),
            audio=str(data["audio"]),
            description=str(data["description"]),
            split=str(data["split"]),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            duration=float(data.get("duration", 0.0)),
            tags=tuple(data.get("tags") or ()),
            bpm=float(data["bpm"]) if data.get("bpm") is not None else None,
            key=str(data["key"]) if data.get("key") is not None else None,
            group=str(data["group"]) if data.get("group") is not None else None,
        )


@dataclass(frozen=True)
class Candidate:
    """A clip the source lists, before its file is checked."""

    id: str
    audio: str
    description: str
    tags: tuple[str, ...] = ()
    bpm: float | None = None
    key: str | None = None
    group: str | None = None  # its source (dataset.sources) or mix.by value: see curation.py


@dataclass
class Skipped:
    id: str
    audio: str
    reason: str


@dataclass
class PreparedDataset:
    entries: list[ClipEntry]
    report: dict[str, Any]
    manifest_digest: str
    reused: bool = False
    manifest_uri: str = ""

    def split(self, name: str) -> list[ClipEntry]:
        return [e for e in self.entries if e.split == name]

    @property
    def train(self) -> list[ClipEntry]:
        return self.split(TRAIN)

    @property
    def validation(self) -> list[ClipEntry]:
        return self.split(VALIDATION)


@dataclass
class _Scan:
    candidates: list[Candidate]
    rows: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    #: rows the source's own filter removed, by reason (``fewer than 3 proxy tags``)
    filtered: dict[str, int] = field(default_factory=dict)  # a plain dict: asdict() breaks a Counter
    missing_proxy_tags: list[str] = field(default_factory=list)

    @property
    def filtered_out(self) -> int:
        return sum(self.filtered.values())


# ----------------------------------------------------------------------------- helpers


def dataset_fingerprint(
    spec: DatasetSpec, scan: _Scan | None = None, identities: Mapping[str, str | None] | None = None
) -> str:
    """What makes two preparations equal: the dataset settings, what the source lists (the scan:
    candidates with their prompts, rows, skipped rows) and the identity of every listed file
    (:func:`file_identities`). A prepared manifest is reused as it is only when all three match,
    so a file added, changed or removed under the same storage path is noticed."""
    settings = spec.model_dump(mode="json", by_alias=True, exclude={"segment_seconds", "verify_checksums"})
    settings["uri"] = spec.uri.rstrip("/")
    payload: dict[str, Any] = {"version": DATASET_FORMAT_VERSION, "settings": settings}
    if scan is not None:
        payload["scan"] = sha256_bytes(json.dumps(asdict(scan), sort_keys=True, default=str).encode())
    if identities is not None:
        payload["files"] = sha256_bytes(json.dumps(sorted(identities.items())).encode())
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def split_score(clip_id: str) -> float:
    """A number in [0, 1) fixed by the clip id: below the validation fraction → validation."""
    digest = hashlib.sha256(f"fermata-split:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def assign_splits(ids: Sequence[str], validation_fraction: float) -> dict[str, str]:
    """Deterministic split; with two or more clips, both splits get at least one."""
    scores = {clip_id: split_score(clip_id) for clip_id in ids}
    splits = {c: VALIDATION if s < validation_fraction else TRAIN for c, s in scores.items()}
    if len(ids) >= 2:
        if VALIDATION not in splits.values():
            splits[min(scores, key=lambda c: scores[c])] = VALIDATION
        if TRAIN not in splits.values():
            splits[max(scores, key=lambda c: scores[c])] = TRAIN
    return splits


class AudioFetcher:
    """Local copies of audio URIs: local files are used in place, s3:// objects downloaded once."""

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir / "audio"

    def local(self, uri: str) -> Path:
        if not is_s3_uri(uri):
            return local_path_of(uri)
        name = uri.rstrip("/").rpartition("/")[2] or "audio"
        path = self.dir / hashlib.sha256(uri.encode()).hexdigest()[:16] / name
        if not path.is_file():
            fetch_uri_to_file(uri, path)
        return path


# ----------------------------------------------------------------------------- MagnaTagATune


@dataclass
class MtatRows:
    kept: list[tuple[str, str, tuple[str, ...]]]
    rows: int
    filtered_out: int
    skipped: list[Skipped]
    missing_proxy_tags: list[str]


def parse_mtat_annotations(text: str, proxy_tags: Sequence[str], min_tags: int) -> MtatRows:
    """Rows of a MagnaTagATune ``annotations_final.csv`` (TAB-separated) that carry at least
    ``min_tags`` of ``proxy_tags``: ``(clip_id, mp3_path, tags)``; plus the row count, how many
    rows the tag filter removed, malformed rows and proxy tags the CSV does not have.

    A missing ``clip_id``/``mp3_path`` column is an error; so are proxy tags of which fewer than
    ``min_tags`` exist as columns (no clip could qualify). Other absent proxy tags are reported.
    """
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DatasetError(f"{MTAT_ANNOTATIONS} is empty (no header row)") from None
    columns = {name: i for i, name in enumerate(header)}
    missing = [c for c in (MTAT_ID_COLUMN, MTAT_PATH_COLUMN) if c not in columns]
    if missing:
        raise MissingColumnError(
            f"{MTAT_ANNOTATIONS} lacks the required column(s) "
            f"{', '.join(repr(c) for c in missing)}; its header has {len(header)} columns "
            f"starting {header[:3]} (is it the TAB-separated MagnaTagATune annotations file?)"
        )
    missing_tags = [t for t in proxy_tags if t not in columns]
    present_tags = [t for t in proxy_tags if t in columns]
    if len(present_tags) < min_tags:
        raise MissingColumnError(
            f"{MTAT_ANNOTATIONS} has only {len(present_tags)} of the proxy tag columns "
            f"{list(proxy_tags)} (missing: {missing_tags}), fewer than minTags={min_tags}, so no "
            f"clip can qualify; choose proxyTags among the CSV's tag columns"
        )
    if missing_tags:
        log.warning("proxy_tags_missing", missing=missing_tags, present=present_tags)
    tag_columns = [
        (i, name) for i, name in enumerate(header) if name not in (MTAT_ID_COLUMN, MTAT_PATH_COLUMN)
    ]
    proxy_set = set(proxy_tags)
    kept: list[tuple[str, str, tuple[str, ...]]] = []
    skipped: list[Skipped] = []
    rows = filtered = 0
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        rows += 1
        if len(row) != len(header):
            skipped.append(
                Skipped(
                    row[0].strip() if row else f"line-{line_no}",
                    "",
                    f"malformed row: line {line_no} has {len(row)} fields, expected {len(header)}",
                )
            )
            continue
        clip_id = row[columns[MTAT_ID_COLUMN]].strip()
        mp3_path = row[columns[MTAT_PATH_COLUMN]].strip()
        tags = tuple(name for i, name in tag_columns if row[i].strip() == "1")
        if sum(1 for t in tags if t in proxy_set) < min_tags:
            filtered += 1
            continue
        if not clip_id or not mp3_path:
            skipped.append(
                Skipped(clip_id, mp3_path, f"malformed row: line {line_no} lacks clip_id or mp3_path")
            )
            continue
        if mp3_path.startswith(("/", "\\")) or ".." in mp3_path.replace("\\", "/").split("/"):
            skipped.append(
                Skipped(
                    clip_id,
                    mp3_path,
                    f"malformed row: line {line_no} mp3_path {mp3_path!r} leaves the dataset root",
                )
            )
            continue
        kept.append((clip_id, mp3_path, tags))
    return MtatRows(kept, rows, filtered, skipped, missing_tags)


def _scan_mtat(spec: DatasetSpec) -> _Scan:
    csv_uri = join_uri(spec.uri, MTAT_ANNOTATIONS)
    try:
        text = read_uri_bytes(csv_uri).decode("utf-8", errors="replace")
    except ObjectNotFoundError:
        raise DatasetError(
            f"{csv_uri} not found: dataset.uri must be the MagnaTagATune root holding "
            f"{MTAT_ANNOTATIONS} and the mp3 folders"
        ) from None
    parsed = parse_mtat_annotations(text, spec.proxy_tags, spec.min_tags)
    rows_kept = parsed.kept
    root = open_storage(spec.uri)
    audio_dir = _mtat_audio_dir(root, [p for _, p, _ in rows_kept[:20]])
    candidates = [
        Candidate(
            id=clip_id,
            audio=root.uri_of(f"{audio_dir}/{mp3_path}" if audio_dir else mp3_path),
            description=prompt_from_tags(clip_id, list(tags)),
            tags=tags,
        )
        for clip_id, mp3_path, tags in rows_kept
    ]
    return _Scan(
        candidates,
        rows=parsed.rows,
        skipped=parsed.skipped,
        filtered={f"fewer than {spec.min_tags} proxy tags": parsed.filtered_out}
        if parsed.filtered_out
        else {},
        missing_proxy_tags=parsed.missing_proxy_tags,
    )


def _mtat_audio_dir(root: Storage, sample_paths: list[str]) -> str:
    """``mp3`` when the files sit under ``<root>/mp3/`` (the usual unpacking), else ``""``."""
    for directory in MTAT_AUDIO_DIRS:
        for path in sample_paths:
            if root.exists(f"{directory}/{path}" if directory else path):
                return directory
    return ""


# ----------------------------------------------------------------------------- generic manifest


def _resolve_manifest_audio(manifest_uri: str, line_no: int, audio: str) -> str:
    """The URI of a manifest's ``audio`` value: s3:// URIs, file:// URIs and absolute paths as
    given; a relative path resolved against the manifest's folder, which it may not leave."""
    if is_s3_uri(audio) or audio.startswith(("/", "file://")):
        return audio
    where = f"{manifest_uri} line {line_no}"
    if "://" in audio:
        raise ManifestFormatError(
            f"{where}: audio {audio!r} has an unsupported scheme: use a path relative to the "
            f"manifest's folder, an absolute path, a file:// or an s3:// URI"
        )
    base = manifest_uri.rstrip("/").rpartition("/")[0]
    relative = posixpath.normpath(audio)
    if relative == ".." or relative.startswith("../"):
        raise ManifestFormatError(
            f"{where}: audio path {audio!r} leaves the manifest's folder ({base or '.'}): relative "
            f"paths are resolved against the folder holding the manifest and may not escape it; "
            f"move the file under that folder or give an absolute path or an s3:// URI"
        )
    if base.startswith("file://"):  # a file:// URI is percent-encoded: keep a literal '%' one
        relative = relative.replace("%", "%25")
    return join_uri(base, relative) if base else relative


def _scan_manifest(spec: DatasetSpec) -> _Scan:
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first line
        text = read_uri_bytes(spec.uri).decode("utf-8-sig")
    except ObjectNotFoundError:
        raise DatasetError(f"manifest {spec.uri} not found") from None
    except UnicodeDecodeError as exc:
        raise ManifestFormatError(f"manifest {spec.uri} is not UTF-8 text: {exc}") from None
    candidates: list[Candidate] = []
    seen: set[str] = set()
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestFormatError(f"{spec.uri} line {line_no}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ManifestFormatError(f"{spec.uri} line {line_no}: expected a JSON object")
        audio, description = data.get("audio"), data.get("description")
        if not isinstance(audio, str) or not audio:
            raise ManifestFormatError(f"{spec.uri} line {line_no}: 'audio' (a URI) is required")
        if not isinstance(description, str) or not description.strip():
            raise ManifestFormatError(f"{spec.uri} line {line_no}: 'description' is required")
        audio = _resolve_manifest_audio(spec.uri, line_no, audio)
        clip_id = str(data.get("id") or hashlib.sha256(audio.encode()).hexdigest()[:16])
        if clip_id in seen:
            raise ManifestFormatError(f"{spec.uri} line {line_no}: duplicate id {clip_id!r}")
        seen.add(clip_id)
        tags = data.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ManifestFormatError(f"{spec.uri} line {line_no}: 'tags' must be a string list")
        bpm = data.get("bpm")
        if bpm is not None and not isinstance(bpm, int | float):
            raise ManifestFormatError(f"{spec.uri} line {line_no}: 'bpm' must be a number")
        key = data.get("key")
        candidates.append(
            Candidate(
                id=clip_id,
                audio=audio,
                description=description.strip(),
                tags=tuple(tags),
                bpm=float(bpm) if bpm is not None else None,
                key=str(key) if key is not None else None,
                group=mix_group(data, spec.mix),
            )
        )
    return _Scan(candidates, rows=len(candidates))


# ----------------------------------------------------------------------------- folder of audio


def _scan_folder(
    uri: str, genre: str | None, storage: Storage, fetcher: AudioFetcher, name: str | None = None
) -> _Scan:
    """Every audio file under ``uri``, described from its tags and estimated BPM/key
    (:mod:`fermata_trainer.folder_source`); the descriptions are saved as an editable manifest
    (one per source ``name`` of dataset.sources)."""
    try:
        folder = scan_folder(uri, fetcher.local, storage, file_identities, genre)
    except EmptyFolderError as exc:
        raise EmptySubsetError(str(exc)) from None
    save_folder_manifest(storage, folder.clips, name)
    candidates = [Candidate(c.id, c.audio, c.description, c.tags, c.bpm, c.key) for c in folder.clips]
    skipped = [Skipped(p.id, p.audio, p.reason) for p in folder.problems]
    return _Scan(candidates, rows=folder.audio_files, skipped=skipped)


def _scan_source(
    spec: DatasetSpec, storage: Storage, fetcher: AudioFetcher, name: str | None = None
) -> _Scan:
    """One source's scan; ``name``: its name in dataset.sources (names a folder's manifest)."""
    if spec.source is DatasetSource.magnatagatune:
        return _scan_mtat(spec)
    if spec.source is DatasetSource.folder:
        return _scan_folder(spec.uri, spec.genre, storage, fetcher, name)
    return _scan_manifest(spec)


def _scan(spec: DatasetSpec, storage: Storage, fetcher: AudioFetcher) -> _Scan:
    """The candidates of dataset.source/uri, or of every dataset.sources entry: those get ids
    ``<source name>/<id>`` (unique across sources) and the source name as their group."""
    if not spec.sources:
        return _scan_source(spec, storage, fetcher)
    merged = _Scan([])
    for source in spec.sources:
        settings = source.model_dump(include={"source", "uri", "proxy_tags", "min_tags", "genre"})
        part = _scan_source(
            spec.model_copy(update={**settings, "sources": None}), storage, fetcher, source.name
        )
        merged.candidates += [
            replace(c, id=f"{source.name}/{c.id}", group=source.name) for c in part.candidates
        ]
        merged.skipped += [replace(k, id=f"{source.name}/{k.id}") for k in part.skipped]
        merged.rows += part.rows
        for reason, count in part.filtered.items():
            merged.filtered[reason] = merged.filtered.get(reason, 0) + count
        merged.missing_proxy_tags += [
            t for t in part.missing_proxy_tags if t not in merged.missing_proxy_tags
        ]
    return merged


# ----------------------------------------------------------------------------- checking files


@dataclass(frozen=True)
class _FileCheck:
    candidate: Candidate
    sha256: str = ""
    size: int = 0
    duration: float = 0.0
    problem: str | None = None
    facts: AudioFacts | None = None


def _check_file(candidate: Candidate, fetcher: AudioFetcher) -> _FileCheck:
    """Fetch and decode one candidate: its digest, size and decoded length, or why it is
    skipped (``missing file``, ``cannot fetch: ...``, ``unreadable audio: ...``,
    ``truncated audio: ...``; the report counts reasons by the text before the colon)."""
    try:
        path = fetcher.local(candidate.audio)
    except ObjectNotFoundError:
        return _FileCheck(candidate, problem="missing file")
    except Exception as exc:  # storage trouble after retries: record and go on
        return _FileCheck(candidate, problem=f"cannot fetch: {type(exc).__name__}: {exc}")
    if not path.is_file():
        return _FileCheck(candidate, problem="missing file")
    try:
        facts, _samples = inspect_audio(path)
    except UnreadableAudioError as exc:
        return _FileCheck(candidate, problem=f"unreadable audio: {exc}")
    del _samples  # only the facts are kept: eight threads of decoded audio add up
    if facts.truncated:
        header = facts.header_duration
        if header and facts.duration < TRUNCATION_RATIO * header:
            problem = (
                f"truncated audio: decodes to {facts.duration:.2f} s of the header's {header:.2f} s "
                f"(a partial download or a cut-off copy?)"
            )
        else:
            problem = (
                f"truncated audio: the decoder stopped after {facts.duration:.2f} s: {facts.stream_error}"
            )
        return _FileCheck(candidate, duration=round(facts.duration, 3), problem=problem, facts=facts)
    return _FileCheck(
        candidate,
        sha256=sha256_file(path),
        size=path.stat().st_size,
        duration=round(facts.duration, 3),
        facts=facts,
    )


def _check_files(candidates: list[Candidate], fetcher: AudioFetcher) -> list[_FileCheck]:
    if len(candidates) <= 4:
        return [_check_file(c, fetcher) for c in candidates]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda c: _check_file(c, fetcher), candidates))


def verify_entry(entry: ClipEntry, fetcher: AudioFetcher) -> Path:
    """The local file of ``entry`` after checking it against the recorded sha256."""
    try:
        path = fetcher.local(entry.audio)
    except ObjectNotFoundError:
        raise ChecksumMismatchError(
            f"{entry.audio} (clip {entry.id}) listed in the manifest no longer exists"
        ) from None
    if not path.is_file():
        raise ChecksumMismatchError(
            f"{entry.audio} (clip {entry.id}) listed in the manifest no longer exists"
        )
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ChecksumMismatchError(
            f"{entry.audio} (clip {entry.id}) changed since the manifest was written: "
            f"sha256 {digest} != recorded {entry.sha256}; delete <storage>/{MANIFEST_KEY} "
            f"to prepare the dataset again"
        )
    return path


def verify_all(entries: Iterable[ClipEntry], fetcher: AudioFetcher) -> list[str]:
    """Problems (one line each) of every entry whose file is missing or changed."""
    problems: list[str] = []
    for entry in entries:
        try:
            verify_entry(entry, fetcher)
        except ChecksumMismatchError as exc:
            problems.append(str(exc))
    return problems


# ----------------------------------------------------------------------------- preparation


def _manifest_bytes(entries: list[ClipEntry]) -> bytes:
    lines = [json.dumps(e.to_json(), sort_keys=True) for e in entries]
    return ("\n".join(lines) + "\n").encode() if lines else b""


@dataclass
class _Previous:
    """The preparation last written at a storage path: its manifest and its file record."""

    prepared: PreparedDataset
    files: dict[str, dict[str, Any]]


def _load_existing(storage: Storage) -> _Previous | None:
    """The previous preparation at ``storage`` (None when there is none or it is unreadable)."""
    try:
        report = json.loads(storage.read_text(REPORT_KEY))
        manifest = storage.get_bytes(MANIFEST_KEY)
    except (ObjectNotFoundError, json.JSONDecodeError):
        return None
    if report.get("manifestDigest") != f"sha256:{sha256_bytes(manifest)}":
        log.warning("dataset_manifest_digest_mismatch", uri=storage.uri_of(MANIFEST_KEY))
        return None
    entries = [ClipEntry.from_json(json.loads(line)) for line in manifest.decode().splitlines() if line]
    prepared = PreparedDataset(
        entries=entries,
        report=report,
        manifest_digest=sha256_bytes(manifest),
        reused=True,
        manifest_uri=storage.uri_of(MANIFEST_KEY),
    )
    return _Previous(prepared, _load_file_record(storage))


def pinned_dataset(storage: Storage, digest: str | None = None) -> PreparedDataset | None:
    """The manifest a run already trains on, as recorded at ``storage``, without looking at the
    source again: a run's data is fixed once it has trained (a resumed pod replays the same
    segments; files added to a growing collection meanwhile are picked up by the next run).
    ``digest``: the manifest must be exactly this one (the verified preparation's). None when
    there is no such manifest."""
    previous = _load_existing(storage)
    if previous is None:
        return None
    if digest is not None and previous.prepared.manifest_digest != digest.removeprefix("sha256:"):
        return None
    log.info(
        "dataset_manifest_pinned",
        uri=previous.prepared.manifest_uri,
        digest=previous.prepared.manifest_digest,
        clips=len(previous.prepared.entries),
    )
    return previous.prepared


def _load_file_record(storage: Storage) -> dict[str, dict[str, Any]]:
    try:
        record = json.loads(storage.read_text(FILES_KEY))
    except (ObjectNotFoundError, json.JSONDecodeError):
        return {}
    if not isinstance(record, dict) or record.get("version") != DATASET_FORMAT_VERSION:
        return {}
    files = record.get("files")
    return files if isinstance(files, dict) else {}


# ----------------------------------------------------------------------------- incremental checks

#: Problems that say nothing about a file's content (it may be back, or readable, next time).
_TRANSIENT_PROBLEMS = ("missing file", "cannot fetch")
_LISTING_WORKERS = 8


def _s3_identities(bucket: str, folder: str, uris: list[str]) -> dict[str, str | None]:
    """``size:etag`` of the objects of one folder, from a single listing."""
    storage = open_storage(f"s3://{bucket}")
    try:
        listed = {o.key: o for o in storage.list(f"{folder}/" if folder else "")}
    except Exception as exc:  # no s3:ListBucket, say: every file of the folder is checked in full
        log.warning(
            "dataset_listing_failed", folder=storage.uri_of(folder), error=f"{type(exc).__name__}: {exc}"
        )
        return dict.fromkeys(uris)
    out: dict[str, str | None] = {}
    for uri in uris:
        info = listed.get(parse_s3_uri(uri)[1])
        if info is not None:
            out[uri] = f"size={info.size},etag={info.etag}"
    return out


def file_identities(uris: Iterable[str]) -> dict[str, str | None]:
    """The identity of every listed audio file that exists — ``size,mtime_ns`` for a local file,
    ``size,etag`` for an S3 object (one listing per folder, not a request per file) — or None
    where it cannot be told. Files that do not exist are left out. One place for every source:
    the MagnaTagATune CSV, a JSONL manifest or a folder all end in candidates' audio URIs."""
    out: dict[str, str | None] = {}
    folders: dict[tuple[str, str], list[str]] = {}
    for uri in dict.fromkeys(uris):
        if is_s3_uri(uri):
            bucket, key = parse_s3_uri(uri)
            folders.setdefault((bucket, key.rpartition("/")[0]), []).append(uri)
            continue
        try:
            stat = local_path_of(uri).stat()
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:  # unreachable or unreadable: checked in full
            log.warning("dataset_identity_unknown", audio=uri, error=f"{type(exc).__name__}: {exc}")
            out[uri] = None
            continue
        out[uri] = f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    with ThreadPoolExecutor(max_workers=_LISTING_WORKERS) as pool:
        for found in pool.map(lambda item: _s3_identities(item[0][0], item[0][1], item[1]), folders.items()):
            out.update(found)
    return out


def _record_of(check: _FileCheck) -> dict[str, Any]:
    return {k: v for k, v in asdict(check).items() if k != "candidate"}


def _check_from_record(candidate: Candidate, record: dict[str, Any]) -> _FileCheck | None:
    """The recorded check of an unchanged file, for ``candidate``; None if it cannot be read
    back (written by another version)."""
    fields = dict(record)
    facts = fields.get("facts")
    try:
        fields["facts"] = AudioFacts(**facts) if isinstance(facts, dict) else None
        return _FileCheck(candidate, **fields)
    except TypeError:
        return None


@dataclass
class _Incremental:
    checks: list[_FileCheck]
    counts: dict[str, int]
    record: dict[str, dict[str, Any]]


def _check_incrementally(
    candidates: list[Candidate],
    identities: Mapping[str, str | None],
    previous: Mapping[str, dict[str, Any]],
    fetcher: AudioFetcher,
) -> _Incremental:
    """Check the files that are new or changed since ``previous`` (the last file record); reuse
    the recorded checks (sha256, size, decoded facts or unreadable verdict) of the others."""
    results: list[_FileCheck | None] = [None] * len(candidates)
    counts = Counter({"new": 0, "reused": 0, "changed": 0, "removed": 0})
    for i, candidate in enumerate(candidates):
        if candidate.audio not in identities:  # absent: the check reports it missing
            continue
        identity, old = identities[candidate.audio], previous.get(candidate.audio)
        if old is None:
            counts["new"] += 1
            continue
        if identity is not None and old.get("identity") == identity:
            results[i] = _check_from_record(candidate, old.get("check") or {})
        counts["reused" if results[i] is not None else "changed"] += 1
    pending = [i for i, r in enumerate(results) if r is None]
    for i, check in zip(pending, _check_files([candidates[i] for i in pending], fetcher), strict=True):
        results[i] = check
    checks = [r for r in results if r is not None]
    present = {c.audio for c in candidates if c.audio in identities}
    counts["removed"] = sum(
        1
        for uri, old in previous.items()
        if uri not in present and not (old.get("check") or {}).get("problem")
    )
    record = {
        c.candidate.audio: {"identity": identities[c.candidate.audio], "check": _record_of(c)}
        for c in checks
        if identities.get(c.candidate.audio) is not None
        and not (c.problem or "").startswith(_TRANSIENT_PROBLEMS)
    }
    return _Incremental(checks, dict(counts), record)


def _file_record_text(record: dict[str, dict[str, Any]]) -> str:
    return json.dumps({"version": DATASET_FORMAT_VERSION, "files": record}, sort_keys=True) + "\n"


def _reuse_previous(
    prepared: PreparedDataset, spec: DatasetSpec, fetcher: AudioFetcher, verify: bool, listed: int
) -> PreparedDataset:
    """The previous manifest, unchanged: the same settings, listing and file identities."""
    log.info(
        "dataset_manifest_reused",
        uri=prepared.manifest_uri,
        clips=len(prepared.entries),
        train=len(prepared.train),
        validation=len(prepared.validation),
    )
    if verify and spec.verify_checksums:
        problems = verify_all(prepared.entries, fetcher)
        if problems:
            raise ChecksumMismatchError(
                f"{len(problems)} file(s) differ from the manifest: " + "; ".join(problems[:5])
            )
    prepared.report = {**prepared.report, "files": {"new": 0, "reused": listed, "changed": 0, "removed": 0}}
    return prepared


def prepare_dataset(
    spec: DatasetSpec,
    storage: Storage,
    work_dir: Path,
    *,
    reuse: bool = True,
    verify_reused: bool = False,
) -> PreparedDataset:
    """Build (or reuse) the manifest for ``spec`` and write it with its report to ``storage``.

    ``verify_reused`` re-hashes every file of a reused manifest against its recorded digest
    (the ``prepare`` command does; a training run verifies lazily, before tokenizing).
    """
    fetcher = AudioFetcher(work_dir)
    scan = _scan(spec, storage, fetcher)
    identities = file_identities(c.audio for c in scan.candidates)
    fingerprint = dataset_fingerprint(spec, scan, identities)
    previous = _load_existing(storage) if reuse else None
    unchanged = previous is not None and previous.prepared.report.get("fingerprint") == fingerprint
    if previous is not None and unchanged and None not in identities.values():
        return _reuse_previous(previous.prepared, spec, fetcher, verify_reused, len(identities))
    incremental = _check_incrementally(
        scan.candidates, identities, previous.files if previous else {}, fetcher
    )
    checks = incremental.checks
    skipped = list(scan.skipped)
    good: list[_FileCheck] = []
    for check in checks:
        if check.problem is not None:
            skipped.append(Skipped(check.candidate.id, check.candidate.audio, check.problem))
        else:
            good.append(check)
    split = partial(assign_splits, validation_fraction=spec.validation_fraction)
    curated = curate(spec, good, fetcher.local, split)  # filters, mix, stratified split
    good = curated.kept
    skipped += [Skipped(*item) for item in curated.skipped]
    for item in skipped:
        log.warning("dataset_clip_skipped", clip=item.id, audio=item.audio, reason=item.reason)

    reasons = Counter(s.reason.split(":")[0] for s in skipped)
    reasons.update(scan.filtered)
    if not good:
        raise EmptySubsetError(_empty_message(spec, scan, skipped))

    splits = curated.splits
    entries = [
        ClipEntry(
            id=c.candidate.id,
            audio=c.candidate.audio,
            description=c.candidate.description,
            split=splits[c.candidate.id],
            sha256=c.sha256,
            size=c.size,
            duration=c.duration,
            tags=c.candidate.tags,
            bpm=curated.bpm.get(c.candidate.id, c.candidate.bpm),
            key=curated.key.get(c.candidate.id, c.candidate.key),
            group=curated.groups.get(c.candidate.id) or None,
        )
        for c in good
    ]
    manifest = _manifest_bytes(entries)
    report: dict[str, Any] = {
        "fingerprint": fingerprint,
        "formatVersion": DATASET_FORMAT_VERSION,
        "createdAt": datetime.now(UTC).isoformat(),
        "source": spec.source.value,
        "uri": spec.uri or None,
        "sources": [s.model_dump(mode="json", by_alias=True) for s in spec.sources] if spec.sources else None,
        "proxyTags": list(spec.proxy_tags),
        "minTags": spec.min_tags,
        "missingProxyTags": scan.missing_proxy_tags,
        "validationFraction": spec.validation_fraction,
        "rows": scan.rows,
        "kept": len(entries),
        "train": sum(1 for e in entries if e.split == TRAIN),
        "validation": sum(1 for e in entries if e.split == VALIDATION),
        "totalSeconds": round(sum(e.duration for e in entries), 3),
        "skippedCount": len(skipped) + scan.filtered_out,
        "skippedByReason": dict(sorted(reasons.items())),
        "skipped": [asdict(s) for s in skipped],
        "curation": curated.report,
        "manifestUri": storage.uri_of(MANIFEST_KEY),
        "manifestDigest": f"sha256:{sha256_bytes(manifest)}",
    }
    report["files"] = incremental.counts
    storage.write_text(FILES_KEY, _file_record_text(incremental.record))
    storage.put_bytes(MANIFEST_KEY, manifest)
    storage.write_text(REPORT_KEY, json.dumps(report, indent=2) + "\n")
    log.info(
        "dataset_prepared",
        manifest=report["manifestUri"],
        rows=scan.rows,
        kept=len(entries),
        train=report["train"],
        validation=report["validation"],
        skipped=report["skippedCount"],
        **{f"files_{k}": v for k, v in incremental.counts.items()},
    )
    return PreparedDataset(
        entries=entries,
        report=report,
        manifest_digest=sha256_bytes(manifest),
        reused=False,
        manifest_uri=storage.uri_of(MANIFEST_KEY),
    )


def _empty_message(spec: DatasetSpec, scan: _Scan, skipped: list[Skipped]) -> str:
    if spec.sources:
        names = ", ".join(s.name for s in spec.sources)
        head = f"no usable clip in dataset.sources ({names}): {scan.rows} rows or files"
        if scan.filtered:
            head += ", " + ", ".join(f"{n} {r}" for r, n in sorted(scan.filtered.items()))
    elif spec.source is DatasetSource.magnatagatune:
        head = (
            f"no usable clip in {spec.uri}: {scan.rows} rows, {scan.filtered_out} with fewer than "
            f"{spec.min_tags} of the proxy tags {spec.proxy_tags}"
        )
    elif spec.source is DatasetSource.folder:
        head = f"no usable clip in folder {spec.uri}: {scan.rows} audio files"
    else:
        head = f"no usable clip in manifest {spec.uri}: {scan.rows} entries"
    if skipped:
        reasons = Counter(s.reason.split(":")[0] for s in skipped)
        head += ", skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    return head
