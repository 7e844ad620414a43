"""Tags embedded in audio files (title, artist, album, genre, year, BPM, key, mood, comment).

Read with mutagen from the file's native tag format, so one code path covers them all:

* ID3 (MP3, and WAV/AIFF with an ``id3`` chunk): TIT2, TPE1, TALB, TCON, TDRC/TYER, TBPM,
  **TKEY**, TMOO, COMM. (mutagen's ``easy=True`` view of ID3 has ``bpm`` but no key or comment,
  and it does not apply to ID3 inside WAV, hence the raw frames.)
* Vorbis comments (FLAC, OGG, Opus) and APEv2: TITLE, ARTIST, ALBUM, GENRE, DATE/YEAR,
  BPM/TEMPO, **INITIALKEY**/KEY, MOOD, COMMENT/DESCRIPTION (case-insensitive).
* MP4 (M4A): ©nam, ©ART, ©alb, ©gen, ©day, tmpo, ``----:com.apple.iTunes:initialkey``, ©cmt.

Keys are normalised to ``"A minor"`` / ``"F# major"`` (flats and sharps as in
:data:`~fermata_trainer.audio_analysis.PITCH_NAMES`) from the usual spellings: ``Am``, ``A min``,
``a minor``, ``F#``, ``Gbm``, and Camelot (``8A``) codes. A BPM outside 20-300 or a key that
does not parse is ignored (logged), so a broken tag falls back to the estimate. A file whose tags
cannot be read at all has no tags; the audio itself is judged elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fermata_trainer.audio_analysis import PITCH_NAMES
from fermata_trainer.logging_setup import get_logger

log = get_logger(__name__)

BPM_RANGE = (20.0, 300.0)

_ID3_FRAMES: dict[str, tuple[str, ...]] = {
    "title": ("TIT2",),
    "artist": ("TPE1", "TPE2"),
    "album": ("TALB",),
    "genre": ("TCON",),
    "date": ("TDRC", "TYER", "TDOR"),
    "bpm": ("TBPM",),
    "key": ("TKEY",),
    "mood": ("TMOO",),
    "comment": ("COMM",),
}
_VORBIS_KEYS: dict[str, tuple[str, ...]] = {
    "title": ("title",),
    "artist": ("artist", "albumartist"),
    "album": ("album",),
    "genre": ("genre",),
    "date": ("date", "year", "originaldate"),
    "bpm": ("bpm", "tempo"),
    "key": ("initialkey", "key"),
    "mood": ("mood",),
    "comment": ("comment", "description"),
}
_MP4_KEYS: dict[str, tuple[str, ...]] = {
    "title": ("\xa9nam",),
    "artist": ("\xa9ART", "aART"),
    "album": ("\xa9alb",),
    "genre": ("\xa9gen",),
    "date": ("\xa9day",),
    "bpm": ("tmpo",),
    "key": ("----:com.apple.iTunes:initialkey", "----:com.apple.iTunes:KEY"),
    "mood": ("----:com.apple.iTunes:MOOD",),
    "comment": ("\xa9cmt", "desc"),
}

# Camelot wheel: number → (minor tonic for "A", major tonic for "B").
_CAMELOT: dict[int, tuple[str, str]] = {
    1: ("Ab", "B"),
    2: ("Eb", "F#"),
    3: ("Bb", "C#"),
    4: ("F", "Ab"),
    5: ("C", "Eb"),
    6: ("G", "Bb"),
    7: ("D", "F"),
    8: ("A", "C"),
    9: ("E", "G"),
    10: ("B", "D"),
    11: ("F#", "A"),
    12: ("C#", "E"),
}
_NATURAL = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_KEY_RE = re.compile(r"^([A-Ga-g])\s*([#♯b♭]?)\s*(m|min|minor|maj|major|M)?$")
_CAMELOT_RE = re.compile(r"^(1[0-2]|[1-9])\s*([ABab])$")


@dataclass(frozen=True)
class AudioTags:
    title: str | None = None
    artist: str | None = None
    album: str | None = None
    genres: tuple[str, ...] = ()
    year: int | None = None
    bpm: float | None = None
    key: str | None = None
    moods: tuple[str, ...] = ()
    comments: tuple[str, ...] = ()


def normalize_key(text: str) -> str | None:
    """``"Am"``/``"a minor"``/``"8A"`` → ``"A minor"``; ``"Gb"`` → ``"F# major"``; else ``None``."""
    value = text.strip().replace("♯", "#").replace("♭", "b")
    camelot = _CAMELOT_RE.match(value)
    if camelot:
        minor, major = _CAMELOT[int(camelot.group(1))]
        return f"{minor} minor" if camelot.group(2).upper() == "A" else f"{major} major"
    match = _KEY_RE.match(value)
    if not match:
        return None
    letter, accidental, mode = match.group(1).upper(), match.group(2), match.group(3)
    pitch = (_NATURAL[letter] + (1 if accidental == "#" else -1 if accidental == "b" else 0)) % 12
    is_minor = mode is not None and mode != "M" and mode.lower() in ("m", "min", "minor")
    return f"{PITCH_NAMES[pitch]} {'minor' if is_minor else 'major'}"


def parse_bpm(text: str) -> float | None:
    match = re.search(r"\d+(?:[.,]\d+)?", text)
    if not match:
        return None
    bpm = float(match.group(0).replace(",", "."))
    return bpm if BPM_RANGE[0] <= bpm <= BPM_RANGE[1] else None


def _strings(value: Any) -> list[str]:
    """Text of a tag value: an ID3 frame, an MP4 free-form atom, a list of either, or a scalar."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [s for item in value for s in _strings(item)]
    if hasattr(value, "text"):  # ID3 text frames (text is a list)
        return _strings(value.text)
    if isinstance(value, bytes):
        return [value.decode("utf-8", errors="replace")]
    text = str(value).strip()
    return [text] if text else []


def _id3_values(tags: Any, frames: tuple[str, ...]) -> list[str]:
    return [s for frame in frames for s in _strings(tags.getall(frame))]


def _mapping_values(tags: Any, names: tuple[str, ...]) -> list[str]:
    lower = {str(k).lower(): k for k in tags.keys()}  # noqa: SIM118 (a VComment iterates pairs)
    out: list[str] = []
    for name in names:
        key = name if name in tags else lower.get(name.lower())
        if key is not None:
            out.extend(_strings(tags[key]))
    return out


def _raw_fields(tags: Any) -> dict[str, list[str]]:
    from mutagen.id3 import ID3
    from mutagen.mp4 import MP4Tags

    if isinstance(tags, ID3):
        return {field: _id3_values(tags, frames) for field, frames in _ID3_FRAMES.items()}
    table = _MP4_KEYS if isinstance(tags, MP4Tags) else _VORBIS_KEYS
    return {field: _mapping_values(tags, names) for field, names in table.items()}


def _split(values: Iterable[str]) -> tuple[str, ...]:
    parts = (p.strip() for v in values for p in re.split(r"[;/\x00]", v))
    return tuple(dict.fromkeys(p for p in parts if p))


def _first(values: list[str]) -> str | None:
    return values[0] if values else None


def _year(values: list[str]) -> int | None:
    for value in values:
        match = re.search(r"\b(1[89]\d\d|2\d\d\d)\b", value)
        if match:
            return int(match.group(1))
    return None


def read_tags(path: Path) -> AudioTags:
    """The tags embedded in ``path`` (empty when it has none or they cannot be read)."""
    from mutagen._file import File  # what ``mutagen.File`` is (the package does not re-export it for typing)

    try:
        audio = File(str(path))
    except Exception as exc:  # a corrupt tag block: the audio may still be fine
        log.warning("audio_tags_unreadable", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return AudioTags()
    if audio is None or audio.tags is None:
        return AudioTags()
    fields = _raw_fields(audio.tags)
    bpm_text, key_text = _first(fields["bpm"]), _first(fields["key"])
    bpm = parse_bpm(bpm_text) if bpm_text else None
    key = normalize_key(key_text) if key_text else None
    if bpm_text and bpm is None:
        log.warning("audio_tag_ignored", path=str(path), tag="bpm", value=bpm_text)
    if key_text and key is None:
        log.warning("audio_tag_ignored", path=str(path), tag="key", value=key_text)
    return AudioTags(
        title=_first(fields["title"]),
        artist=_first(fields["artist"]),
        album=_first(fields["album"]),
        genres=_split(fields["genre"]),
        year=_year(fields["date"]),
        bpm=bpm,
        key=key,
        moods=_split(fields["mood"]),
        comments=tuple(fields["comment"]),
    )
