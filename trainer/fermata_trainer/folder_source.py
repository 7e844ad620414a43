"""``source: folder``: a folder (local or ``s3://``) of the user's own audio, no manifest needed.

Every audio file under the folder (recursively; :data:`~fermata_trainer.audio_io.AUDIO_EXTENSIONS`,
hidden files such as macOS ``._x.mp3`` left out) becomes a clip. Its description is written from
what the file says about itself — embedded tags (:mod:`fermata_trainer.audio_tags`) — and, where
the tags give no BPM or key, from estimates on the first minute of audio
(:mod:`fermata_trainer.audio_analysis`)::

    soulful amapiano track at 113 BPM in A minor, piano and log drums

The genre comes from the genre tag, else from ``dataset.genre``; moods, instruments and vocals
from words of the genre, mood and comment tags. The clip id is a readable slug of the file's path
relative to the folder plus a hash of that path, so it is stable across runs and machines.

The clips are written as a JSONL manifest in the format ``source: manifest`` reads
(``{id, audio, description, tags, bpm, key, title, artist, album, year}``) to
``<storage>/dataset/folder-manifest.jsonl``: edit the descriptions there and train from it with
``source: manifest``.

Reading tags and estimating tempo/key costs a decode per file, so what each file said is kept in
``<storage>/dataset/folder-analysis.json`` under the file's identity (size and mtime, or size and
ETag on S3): a later preparation analyses only new or changed files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fermata_trainer.audio_analysis import analysis_mono, key_of_mono, tempo_of_mono
from fermata_trainer.audio_io import AUDIO_EXTENSIONS, UnreadableAudioError, decode_audio
from fermata_trainer.audio_tags import AudioTags, read_tags
from fermata_trainer.errors import ObjectNotFoundError, TrainerConfigError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.prompts import (
    KNOWN_TAGS,
    describe_track,
    instruments_of,
    moods_of,
    tag_terms,
    vocals_of,
)
from fermata_trainer.storage import Storage, open_storage

log = get_logger(__name__)

FOLDER_MANIFEST_KEY = "dataset/folder-manifest.jsonl"
ANALYSIS_KEY = "dataset/folder-analysis.json"
ANALYSIS_VERSION = 1
MAX_WORKERS = 4  # each worker holds one decoded file: bounded memory


class EmptyFolderError(TrainerConfigError):
    """The folder holds no audio file."""


@dataclass(frozen=True)
class FolderClip:
    """One audio file of the folder, described."""

    id: str
    audio: str
    description: str
    tags: tuple[str, ...] = ()
    bpm: float | None = None
    key: str | None = None
    bpm_source: str | None = None  # "tag" or "estimate"
    key_source: str | None = None
    title: str | None = None
    artist: str | None = None
    album: str | None = None
    year: int | None = None

    def to_manifest_line(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "audio": self.audio,
            "description": self.description,
            "tags": list(self.tags),
            "bpm": self.bpm,
            "key": self.key,
            "title": self.title,
            "artist": self.artist,
            "album": self.album,
            "year": self.year,
        }
        return {k: v for k, v in data.items() if v is not None}


@dataclass(frozen=True)
class FolderProblem:
    id: str
    audio: str
    reason: str


@dataclass
class FolderScan:
    clips: list[FolderClip]
    problems: list[FolderProblem]
    audio_files: int
    other_files: int


def clip_id_of(relative: str) -> str:
    """Readable and stable: ``"Album A/01 Intro.mp3"`` → ``"album-a-01-intro-<8 hex>"``."""
    stem = relative.rsplit(".", 1)[0] if "." in relative.rpartition("/")[2] else relative
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:48].strip("-") or "clip"
    return f"{slug}-{hashlib.sha256(relative.encode()).hexdigest()[:8]}"


def is_audio_key(key: str) -> bool:
    """An audio file by its extension, not hidden (``._x.mp3``, nothing under ``.Trash/``)."""
    parts = key.split("/")
    return not any(p.startswith(".") for p in parts) and Path(parts[-1]).suffix.lower() in AUDIO_EXTENSIONS


def list_audio(root: Storage) -> tuple[list[str], int]:
    """Keys of the audio files under ``root`` (sorted) and how many other files it holds."""
    keys = [o.key for o in root.list("")]
    audio = [k for k in keys if is_audio_key(k)]
    return audio, len(keys) - len(audio)


def _tag_terms(tags: AudioTags) -> list[str]:
    """Words that may name moods, instruments or vocals: whole genre items ("Soulful" among the
    genres) and every term of the mood and comment tags (not the words inside a genre name:
    "Deep House" is no "deep" mood)."""
    return [g.lower() for g in tags.genres] + tag_terms([*tags.moods, *tags.comments])


def describe(tags: AudioTags, genre: str | None, bpm: float | None, key: str | None) -> tuple[str, list[str]]:
    """The description and the manifest tags of a file: genre (tag, else the collection's),
    moods, instruments and vocals named by its tag words, BPM and key."""
    terms = _tag_terms(tags)
    genre_name = tags.genres[0].lower() if tags.genres else (genre.strip().lower() if genre else None)
    description = describe_track(
        genre=genre_name,
        moods=moods_of(terms),
        instruments=instruments_of(terms),
        vocals=vocals_of(terms),
        bpm=bpm,
        key=key,
    )
    named = [g.lower() for g in tags.genres] or ([genre_name] if genre_name else [])
    return description, list(dict.fromkeys([*named, *(t for t in terms if t in KNOWN_TAGS)]))


@dataclass(frozen=True)
class FileFacts:
    """What one file says about itself: its tags and estimates of the BPM/key they lack."""

    tags: AudioTags
    bpm_estimate: float | None = None
    key_estimate: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileFacts:
        tags = dict(data["tags"])
        for name in ("genres", "moods", "comments"):
            tags[name] = tuple(tags.get(name) or ())
        return cls(AudioTags(**tags), data.get("bpm_estimate"), data.get("key_estimate"))


def file_facts(path: Path) -> FileFacts:
    """Tags of ``path``; the first minute decoded and analysed only for what they lack. A file
    that does not decode gets no estimates (the dataset's file check then skips it, with the
    reason)."""
    tags = read_tags(path)
    if tags.bpm is not None and tags.key is not None:
        return FileFacts(tags)
    try:
        samples, rate = decode_audio(path)
    except UnreadableAudioError as exc:
        log.debug("folder_file_not_analysed", path=str(path), error=str(exc))
        return FileFacts(tags)
    mono = analysis_mono(samples, rate)
    del samples
    return FileFacts(
        tags,
        bpm_estimate=tempo_of_mono(mono) if tags.bpm is None else None,
        key_estimate=key_of_mono(mono) if tags.key is None else None,
    )


def clip_of(relative: str, uri: str, facts: FileFacts, genre: str | None) -> FolderClip:
    """The clip of one file: tags win over estimates for BPM and key."""
    tags = facts.tags
    bpm = tags.bpm if tags.bpm is not None else facts.bpm_estimate
    key = tags.key if tags.key is not None else facts.key_estimate
    description, manifest_tags = describe(tags, genre, bpm, key)
    return FolderClip(
        id=clip_id_of(relative),
        audio=uri,
        description=description,
        tags=tuple(manifest_tags),
        bpm=bpm,
        key=key,
        bpm_source=_source_of(tags.bpm, facts.bpm_estimate),
        key_source=_source_of(tags.key, facts.key_estimate),
        title=tags.title,
        artist=tags.artist,
        album=tags.album,
        year=tags.year,
    )


def _source_of(tagged: object | None, estimated: object | None) -> str | None:
    return "tag" if tagged is not None else ("estimate" if estimated is not None else None)


def _facts_of(uri: str, fetch: Callable[[str], Path]) -> FileFacts | str:
    """The facts of one file, or why it cannot be had (``missing file``, ``cannot fetch: ...``)."""
    try:
        path = fetch(uri)
    except ObjectNotFoundError:
        return "missing file"
    except Exception as exc:  # storage trouble after retries: record and go on
        return f"cannot fetch: {type(exc).__name__}: {exc}"
    return file_facts(path)


def _load_analysis(storage: Storage) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(storage.read_text(ANALYSIS_KEY))
    except (ObjectNotFoundError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != ANALYSIS_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _recorded(old: dict[str, Any] | None, identity: str | None) -> FileFacts | None:
    if old is None or identity is None or old.get("identity") != identity:
        return None
    try:
        return FileFacts.from_json(old["facts"])
    except (KeyError, TypeError, ValueError):
        return None


def scan_folder(
    uri: str,
    fetch: Callable[[str], Path],
    storage: Storage,
    identify: Callable[[list[str]], Mapping[str, str | None]],
    genre: str | None = None,
) -> FolderScan:
    """Every audio file under ``uri`` described (new or changed files analysed, the others'
    facts read back from ``storage``); raises :class:`EmptyFolderError` when there is none.
    ``identify`` gives each file URI its identity (None: unknown, analysed every time)."""
    root = open_storage(uri)
    keys, other = list_audio(root)
    if not keys:
        raise EmptyFolderError(
            f"dataset folder {uri} holds no audio file ({', '.join(sorted(AUDIO_EXTENSIONS))}); "
            f"it has {other} other file(s)"
        )
    uris = [root.uri_of(k) for k in keys]
    identities = identify(uris)
    previous = _load_analysis(storage)
    facts: list[FileFacts | str | None] = [_recorded(previous.get(u), identities.get(u)) for u in uris]
    pending = [i for i, f in enumerate(facts) if f is None]
    log.info(
        "folder_scan_started", uri=uri, audio_files=len(keys), other_files=other, to_analyse=len(pending)
    )
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(pending)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, result in zip(pending, pool.map(lambda i: _facts_of(uris[i], fetch), pending), strict=True):
            facts[i] = result
    clips: list[FolderClip] = []
    problems: list[FolderProblem] = []
    listed = set(uris)  # other folders' files (dataset.sources) keep their entries
    prefix = root.uri_of("").rstrip("/") + "/"
    record = {u: r for u, r in previous.items() if not u.startswith(prefix) and u not in listed}
    for key, file_uri, fact in zip(keys, uris, facts, strict=True):
        if not isinstance(fact, FileFacts):
            problems.append(FolderProblem(clip_id_of(key), file_uri, str(fact)))
            continue
        clips.append(clip_of(key, file_uri, fact, genre))
        if identities.get(file_uri) is not None:
            record[file_uri] = {"identity": identities[file_uri], "facts": fact.to_json()}
    storage.write_text(
        ANALYSIS_KEY, json.dumps({"version": ANALYSIS_VERSION, "files": record}, sort_keys=True)
    )
    log.info(
        "folder_scanned",
        uri=uri,
        clips=len(clips),
        problems=len(problems),
        analysed=len(pending),
        bpm_from_tags=sum(1 for c in clips if c.bpm_source == "tag"),
        bpm_estimated=sum(1 for c in clips if c.bpm_source == "estimate"),
        key_from_tags=sum(1 for c in clips if c.key_source == "tag"),
        key_estimated=sum(1 for c in clips if c.key_source == "estimate"),
    )
    return FolderScan(clips, problems, len(keys), other)


def folder_manifest_bytes(clips: list[FolderClip]) -> bytes:
    return "".join(json.dumps(c.to_manifest_line(), sort_keys=True) + "\n" for c in clips).encode()


def folder_manifest_key(name: str | None = None) -> str:
    """``dataset/folder-manifest.jsonl``; ``dataset/folder-manifest-<name>.jsonl`` for a named
    source of ``dataset.sources``."""
    return FOLDER_MANIFEST_KEY if not name else FOLDER_MANIFEST_KEY.replace(".jsonl", f"-{name}.jsonl")


def save_folder_manifest(storage: Storage, clips: list[FolderClip], name: str | None = None) -> str:
    """Write the clips as an editable ``source: manifest`` JSONL; returns its URI."""
    key = folder_manifest_key(name)
    storage.put_bytes(key, folder_manifest_bytes(clips))
    target = storage.uri_of(key)
    log.info(
        "folder_manifest_written",
        uri=target,
        clips=len(clips),
        hint=f"edit it and train from it with dataset.source: manifest, dataset.uri: {target}",
    )
    return target
