"""Dataset preparation: MagnaTagATune (filtered by proxy tags) or a generic JSONL manifest.

Preparation turns the configured source into a *manifest*: one JSON line per usable clip with its
audio URI, text prompt, split (train/validation, by a hash of the clip id), sha256 digest and
size. The manifest and a JSON report of everything skipped (and why) are written to
``<storage>/dataset/``. A later run with the same dataset settings reuses that manifest; the
recorded digests are verified before any file is tokenized, so a dataset changed under a run is
caught instead of silently trained on.

Problems that retrying cannot fix raise :class:`DatasetError` subclasses with readable
messages; the CLI turns them into :data:`~fermata_api.contract.EXIT_CONFIG_ERROR`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fermata_api import DatasetSource, DatasetSpec
from fermata_trainer.audio_io import UnreadableAudioError, probe_audio
from fermata_trainer.errors import ObjectNotFoundError, TrainerConfigError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.prompts import prompt_from_tags
from fermata_trainer.storage import (
    Storage,
    fetch_uri_to_file,
    is_s3_uri,
    join_uri,
    local_path_of,
    open_storage,
    read_uri_bytes,
    sha256_bytes,
    sha256_file,
)

log = get_logger(__name__)

MTAT_ANNOTATIONS = "annotations_final.csv"
MTAT_ID_COLUMN = "clip_id"
MTAT_PATH_COLUMN = "mp3_path"
MTAT_AUDIO_DIRS = ("mp3", "")

DATASET_FORMAT_VERSION = 1
MANIFEST_KEY = "dataset/manifest.jsonl"
REPORT_KEY = "dataset/report.json"

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
    filtered_out: int = 0
    missing_proxy_tags: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers


def dataset_fingerprint(spec: DatasetSpec) -> str:
    """What makes two preparations equal (the file checks aside)."""
    payload = {
        "version": DATASET_FORMAT_VERSION,
        "source": spec.source.value,
        "uri": spec.uri.rstrip("/"),
        "proxyTags": sorted(spec.proxy_tags) if spec.source is DatasetSource.magnatagatune else [],
        "minTags": spec.min_tags if spec.source is DatasetSource.magnatagatune else 0,
        "validationFraction": spec.validation_fraction,
    }
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
        filtered_out=parsed.filtered_out,
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


def _scan_manifest(spec: DatasetSpec) -> _Scan:
    try:
        text = read_uri_bytes(spec.uri).decode("utf-8")
    except ObjectNotFoundError:
        raise DatasetError(f"manifest {spec.uri} not found") from None
    except UnicodeDecodeError as exc:
        raise ManifestFormatError(f"manifest {spec.uri} is not UTF-8 text: {exc}") from None
    base = spec.uri.rstrip("/").rpartition("/")[0]
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
        if not (is_s3_uri(audio) or audio.startswith("/") or audio.startswith("file://")):
            audio = join_uri(base, audio) if base else audio
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
            )
        )
    return _Scan(candidates, rows=len(candidates))


# ----------------------------------------------------------------------------- checking files


@dataclass(frozen=True)
class _FileCheck:
    candidate: Candidate
    sha256: str = ""
    size: int = 0
    duration: float = 0.0
    problem: str | None = None


def _check_file(candidate: Candidate, fetcher: AudioFetcher) -> _FileCheck:
    try:
        path = fetcher.local(candidate.audio)
    except ObjectNotFoundError:
        return _FileCheck(candidate, problem="missing file")
    except Exception as exc:  # storage trouble after retries: record and go on
        return _FileCheck(candidate, problem=f"cannot fetch: {type(exc).__name__}: {exc}")
    if not path.is_file():
        return _FileCheck(candidate, problem="missing file")
    try:
        info = probe_audio(path)
    except UnreadableAudioError as exc:
        return _FileCheck(candidate, problem=f"unreadable audio: {exc}")
    return _FileCheck(
        candidate,
        sha256=sha256_file(path),
        size=path.stat().st_size,
        duration=round(info.duration, 3),
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


def _load_existing(storage: Storage, fingerprint: str) -> PreparedDataset | None:
    try:
        report = json.loads(storage.read_text(REPORT_KEY))
        manifest = storage.get_bytes(MANIFEST_KEY)
    except (ObjectNotFoundError, json.JSONDecodeError):
        return None
    if report.get("fingerprint") != fingerprint:
        return None
    if report.get("manifestDigest") != f"sha256:{sha256_bytes(manifest)}":
        log.warning("dataset_manifest_digest_mismatch", uri=storage.uri_of(MANIFEST_KEY))
        return None
    entries = [ClipEntry.from_json(json.loads(line)) for line in manifest.decode().splitlines() if line]
    return PreparedDataset(
        entries=entries,
        report=report,
        manifest_digest=sha256_bytes(manifest),
        reused=True,
        manifest_uri=storage.uri_of(MANIFEST_KEY),
    )


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
    fingerprint = dataset_fingerprint(spec)
    fetcher = AudioFetcher(work_dir)
    if reuse:
        existing = _load_existing(storage, fingerprint)
        if existing is not None:
            log.info(
                "dataset_manifest_reused",
                uri=existing.manifest_uri,
                clips=len(existing.entries),
                train=len(existing.train),
                validation=len(existing.validation),
            )
            if verify_reused and spec.verify_checksums:
                problems = verify_all(existing.entries, fetcher)
                if problems:
                    raise ChecksumMismatchError(
                        f"{len(problems)} file(s) differ from the manifest: " + "; ".join(problems[:5])
                    )
            return existing

    scan = _scan_mtat(spec) if spec.source is DatasetSource.magnatagatune else _scan_manifest(spec)
    checks = _check_files(scan.candidates, fetcher)
    skipped = list(scan.skipped)
    good: list[_FileCheck] = []
    for check in checks:
        if check.problem is not None:
            skipped.append(Skipped(check.candidate.id, check.candidate.audio, check.problem))
        else:
            good.append(check)
    for item in skipped:
        log.warning("dataset_clip_skipped", clip=item.id, audio=item.audio, reason=item.reason)

    reasons = Counter(s.reason.split(":")[0] for s in skipped)
    if scan.filtered_out:
        reasons[f"fewer than {spec.min_tags} proxy tags"] = scan.filtered_out
    if not good:
        raise EmptySubsetError(_empty_message(spec, scan, skipped))

    splits = assign_splits([c.candidate.id for c in good], spec.validation_fraction)
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
            bpm=c.candidate.bpm,
            key=c.candidate.key,
        )
        for c in good
    ]
    manifest = _manifest_bytes(entries)
    report: dict[str, Any] = {
        "fingerprint": fingerprint,
        "formatVersion": DATASET_FORMAT_VERSION,
        "createdAt": datetime.now(UTC).isoformat(),
        "source": spec.source.value,
        "uri": spec.uri,
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
        "manifestUri": storage.uri_of(MANIFEST_KEY),
        "manifestDigest": f"sha256:{sha256_bytes(manifest)}",
    }
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
    )
    return PreparedDataset(
        entries=entries,
        report=report,
        manifest_digest=sha256_bytes(manifest),
        reused=False,
        manifest_uri=storage.uri_of(MANIFEST_KEY),
    )


def _empty_message(spec: DatasetSpec, scan: _Scan, skipped: list[Skipped]) -> str:
    if spec.source is DatasetSource.magnatagatune:
        head = (
            f"no usable clip in {spec.uri}: {scan.rows} rows, {scan.filtered_out} with fewer than "
            f"{spec.min_tags} of the proxy tags {spec.proxy_tags}"
        )
    else:
        head = f"no usable clip in manifest {spec.uri}: {scan.rows} entries"
    if skipped:
        reasons = Counter(s.reason.split(":")[0] for s in skipped)
        head += ", skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    return head
