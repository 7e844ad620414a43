"""``source: folder``: real audio files (synthetic drum + chord clips of known tempo and key,
encoded as MP3/M4A with PyAV, WAV/FLAC with soundfile, tagged with mutagen), described from their
tags and estimated BPM/key, saved as an editable manifest that ``source: manifest`` reads back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from mutagen.flac import FLAC
from mutagen.id3 import ID3, TBPM, TCON, TIT2, TKEY, TPE1
from mutagen.mp4 import MP4

from fermata_api import DatasetSource, DatasetSpec
from fermata_dev.synthetic import encode_audio
from fermata_trainer.audio_analysis import estimate_key, estimate_tempo
from fermata_trainer.audio_io import decode_count
from fermata_trainer.audio_tags import normalize_key, read_tags
from fermata_trainer.dataset import AudioFetcher, DatasetError, file_identities, prepare_dataset
from fermata_trainer.folder_source import (
    ANALYSIS_KEY,
    FOLDER_MANIFEST_KEY,
    FolderClip,
    clip_id_of,
    scan_folder,
)
from fermata_trainer.storage import LocalStorage, open_storage
from tests.s3_fixture import S3Server

pytestmark = pytest.mark.trainer

#: Measured on these clips: every tempo within 0.4 BPM (80-174 BPM), every key exact; asserted with margin.
BPM_TOLERANCE = 2.0

PITCH = {
    "C": 0,
    "C#": 1,
    "D": 2,
    "Eb": 3,
    "E": 4,
    "F": 5,
    "F#": 6,
    "G": 7,
    "Ab": 8,
    "A": 9,
    "Bb": 10,
    "B": 11,
}

FloatArray = npt.NDArray[np.float32]


def _hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _progression(tonic: str, mode: str) -> list[list[int]]:
    """i-iv-V-i (minor) or I-IV-V-I (major) triads, as semitones above middle C's octave."""
    t = PITCH[tonic]
    third = 3 if mode == "minor" else 4
    return [
        [t, t + third, t + 7],
        [t + 5, t + 5 + third, t + 12],
        [t + 7, t + 11, t + 14],
        [t, t + third, t + 7],
    ]


def synth_clip(
    bpm: float, tonic: str, mode: str, rate: int, seconds: float = 12.0, channels: int = 2
) -> FloatArray:
    """A kick on every beat, a hi-hat on the off-beats and one chord (plus its root in the
    bass) per bar: a clean tempo and key."""
    n = int(seconds * rate)
    out = np.zeros(n)
    beat = 60.0 / bpm
    kt = np.arange(int(0.15 * rate)) / rate
    kick = np.sin(2 * np.pi * (50 + 60 * np.exp(-kt * 30)) * kt) * np.exp(-kt * 18)
    ht = np.arange(int(0.03 * rate)) / rate
    hat = np.random.default_rng(0).standard_normal(ht.size) * np.exp(-ht * 150) * 0.15
    for b in range(int(seconds / beat) + 1):
        for offset, sound, gain in ((0.0, kick, 0.8), (0.5, hat, 1.0)):
            start = int((b + offset) * beat * rate)
            stop = min(n, start + sound.size)
            if start < n:
                out[start:stop] += gain * sound[: stop - start]
    bar = 4 * beat
    chords = _progression(tonic, mode)
    for i in range(int(np.ceil(seconds / bar))):
        start, stop = int(i * bar * rate), min(n, int((i + 1) * bar * rate))
        t = np.arange(stop - start) / rate
        envelope = np.minimum(1, t * 20) * np.exp(-t * 0.5)
        notes = chords[i % len(chords)]
        for m in notes:
            out[start:stop] += 0.12 * np.sin(2 * np.pi * _hz(60 + m) * t) * envelope
        out[start:stop] += 0.15 * np.sin(2 * np.pi * _hz(36 + notes[0] % 12) * t) * envelope
    out /= np.max(np.abs(out)) * 1.1
    return np.tile(out.astype(np.float32), (channels, 1))


def write_encoded(path: Path, samples: FloatArray, rate: int, container: str, codec: str) -> Path:
    """Encode with PyAV (libmp3lame for MP3, AAC in an MP4 container for M4A)."""
    return encode_audio(path, samples, rate, container=container, codec=codec)


def write_pcm(path: Path, samples: FloatArray, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples.T, rate)
    return path


@dataclass(frozen=True)
class Clip:
    relative: str
    bpm: float
    key: str  # the key the audio is in


@dataclass
class Collection:
    root: Path
    clips: list[Clip]

    def clip(self, relative: str) -> Clip:
        return next(c for c in self.clips if c.relative == relative)


def make_collection(root: Path) -> Collection:
    """Six clips in nested folders, four formats, three sample rates; some tagged."""
    clips = [
        Clip("Side A/01 Intro.mp3", 113.0, "A minor"),  # ID3: title, artist, genre; no BPM/key
        Clip("Side A/02 Groove.mp3", 96.0, "A minor"),  # ID3 with TBPM and TKEY (tags win)
        Clip("Side B/03 Night.wav", 128.0, "C major"),  # untagged WAV at 32 kHz
        Clip("Side B/deep/04 Keys.flac", 113.0, "F# major"),  # Vorbis comments: genre, mood, comment
        Clip("05 Sunday.m4a", 122.0, "G major"),  # MP4 tags: title, genre
        Clip("06 Plain.mp3", 100.0, "Eb minor"),  # untagged MP3 at 48 kHz
    ]
    a1 = write_encoded(
        root / clips[0].relative, synth_clip(113, "A", "minor", 44100), 44100, "mp3", "libmp3lame"
    )
    id3 = ID3()
    id3.add(TIT2(encoding=3, text="Intro"))
    id3.add(TPE1(encoding=3, text="Thandi"))
    id3.add(TCON(encoding=3, text="Amapiano"))
    id3.save(a1)
    a2 = write_encoded(
        root / clips[1].relative, synth_clip(96, "A", "minor", 44100), 44100, "mp3", "libmp3lame"
    )
    id3 = ID3()
    id3.add(TIT2(encoding=3, text="Groove"))
    id3.add(TCON(encoding=3, text="Amapiano"))
    id3.add(TBPM(encoding=3, text="112"))  # deliberately not the audio's 96: the tag wins
    id3.add(TKEY(encoding=3, text="Dm"))
    id3.save(a2)
    write_pcm(root / clips[2].relative, synth_clip(128, "C", "major", 32000), 32000)
    flac_path = write_pcm(root / clips[3].relative, synth_clip(113, "F#", "major", 44100, channels=1), 44100)
    flac = FLAC(flac_path)
    flac["GENRE"] = "Amapiano"
    flac["MOOD"] = "Soulful"
    flac["COMMENT"] = "piano, log drums, female vocals"
    flac["DATE"] = "2023-05-01"
    flac.save()
    m4a = write_encoded(root / clips[4].relative, synth_clip(122, "G", "major", 48000), 48000, "ipod", "aac")
    mp4 = MP4(m4a)
    mp4["\xa9nam"] = ["Sunday"]
    mp4["\xa9gen"] = ["Deep House"]
    mp4.save()
    write_encoded(root / clips[5].relative, synth_clip(100, "Eb", "minor", 48000), 48000, "mp3", "libmp3lame")
    (root / "cover.jpg").write_bytes(b"\xff\xd8 not audio")
    (root / "Side A" / "._01 Intro.mp3").write_bytes(b"macOS resource fork")
    return Collection(root, clips)


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Collection:
    return make_collection(tmp_path_factory.mktemp("folder") / "music")


@pytest.fixture(scope="module")
def prepared_folder(
    collection: Collection, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LocalStorage, Path]:
    """The collection prepared once (the analysis is the slow part); the storage it wrote to."""
    base = tmp_path_factory.mktemp("prepared")
    storage = LocalStorage(base / "storage")
    spec = DatasetSpec(
        source=DatasetSource.folder, uri=str(collection.root), genre="amapiano", validation_fraction=0.2
    )
    prepare_dataset(spec, storage, base / "work")
    return storage, base / "work"


def _folder_manifest(storage: LocalStorage) -> dict[str, dict[str, object]]:
    lines = [json.loads(line) for line in storage.read_text(FOLDER_MANIFEST_KEY).splitlines() if line]
    return {str(line["id"]): line for line in lines}


# ----------------------------------------------------------------------------- analysis


@pytest.mark.parametrize(
    ("bpm", "tonic", "mode", "rate"),
    [
        (96, "A", "minor", 44100),
        (113, "A", "minor", 48000),
        (128, "C", "major", 32000),
        (113, "F#", "major", 44100),
    ],
)
def test_tempo_and_key_of_clean_synthetic_clips(bpm: float, tonic: str, mode: str, rate: int) -> None:
    samples = synth_clip(bpm, tonic, mode, rate)
    tempo = estimate_tempo(samples, rate)
    assert tempo is not None and abs(tempo - bpm) <= BPM_TOLERANCE  # and so no octave error
    assert estimate_key(samples, rate) == f"{tonic} {mode}"


def test_no_tempo_or_key_for_noise_silence_or_a_blip() -> None:
    rng = np.random.default_rng(1)
    noise = (rng.standard_normal((1, 44100 * 8)) * 0.1).astype(np.float32)
    assert estimate_key(noise, 44100) is None
    assert estimate_tempo(noise, 44100) is None
    silence = np.zeros((2, 44100 * 8), dtype=np.float32)
    assert estimate_tempo(silence, 44100) is None and estimate_key(silence, 44100) is None
    assert estimate_tempo(synth_clip(113, "A", "minor", 44100, seconds=2.0), 44100) is None  # too short


def test_key_tags_in_the_usual_spellings() -> None:
    assert normalize_key("Am") == "A minor"
    assert normalize_key("a minor") == "A minor"
    assert normalize_key("F#") == "F# major"
    assert normalize_key("Gbm") == "F# minor"
    assert normalize_key("Bb maj") == "Bb major"
    assert normalize_key("8A") == "A minor" and normalize_key("8B") == "C major"
    assert normalize_key("H-moll") is None


# ----------------------------------------------------------------------------- tags


def test_tags_are_read_from_id3_vorbis_and_mp4(collection: Collection) -> None:
    intro = read_tags(collection.root / "Side A/01 Intro.mp3")
    assert (intro.title, intro.artist, intro.genres, intro.bpm, intro.key) == (
        "Intro",
        "Thandi",
        ("Amapiano",),
        None,
        None,
    )
    groove = read_tags(collection.root / "Side A/02 Groove.mp3")
    assert groove.bpm == 112.0 and groove.key == "D minor"
    keys = read_tags(collection.root / "Side B/deep/04 Keys.flac")
    assert keys.genres == ("Amapiano",) and keys.moods == ("Soulful",) and keys.year == 2023
    assert keys.comments == ("piano, log drums, female vocals",)
    sunday = read_tags(collection.root / "05 Sunday.m4a")
    assert sunday.title == "Sunday" and sunday.genres == ("Deep House",)
    assert read_tags(collection.root / "Side B/03 Night.wav").genres == ()


# ----------------------------------------------------------------------------- the folder source


def test_folder_is_described_from_tags_and_estimates(
    collection: Collection, prepared_folder: tuple[LocalStorage, Path]
) -> None:
    storage, _ = prepared_folder
    lines = _folder_manifest(storage)
    assert len(lines) == len(collection.clips)  # cover.jpg and the ._ resource fork left out
    by_path = {c.relative: lines[clip_id_of(c.relative)] for c in collection.clips}

    for clip in collection.clips:
        line = by_path[clip.relative]
        assert line["audio"] == str(collection.root / clip.relative)
        if clip.relative == "Side A/02 Groove.mp3":
            assert (line["bpm"], line["key"]) == (112.0, "D minor")  # embedded tags win
            continue
        assert abs(float(str(line["bpm"])) - clip.bpm) <= BPM_TOLERANCE, clip
        assert line["key"] == clip.key, clip
        assert f"{round(float(str(line['bpm'])))} BPM" in str(line["description"])
        assert f"in {clip.key}" in str(line["description"])

    intro = by_path["Side A/01 Intro.mp3"]
    assert intro["description"] == "amapiano track at 113 BPM in A minor"
    assert (intro["title"], intro["artist"], intro["tags"]) == ("Intro", "Thandi", ["amapiano"])
    keys = by_path["Side B/deep/04 Keys.flac"]
    assert (
        keys["description"]
        == "soulful amapiano track at 113 BPM in F# major, piano and log drums, female vocals"
    )
    tags = keys["tags"]
    assert keys["year"] == 2023 and isinstance(tags, list)
    assert {"amapiano", "soulful", "piano", "log drums"} <= set(tags)
    # no genre tag: the collection's genre; a genre tag names its own genre
    assert str(by_path["Side B/03 Night.wav"]["description"]).startswith("amapiano track at 128 BPM")
    assert str(by_path["05 Sunday.m4a"]["description"]).startswith("deep house track at 122 BPM")


def test_prepared_entries_carry_bpm_key_and_tags(
    collection: Collection, prepared_folder: tuple[LocalStorage, Path]
) -> None:
    storage, work = prepared_folder
    spec = DatasetSpec(
        source=DatasetSource.folder, uri=str(collection.root), genre="amapiano", validation_fraction=0.2
    )
    prepared = prepare_dataset(spec, storage, work)  # unchanged folder: reused, nothing re-analysed
    assert prepared.reused
    entries = {e.id: e for e in prepared.entries}
    assert set(entries) == {clip_id_of(c.relative) for c in collection.clips}
    keys = entries[clip_id_of("Side B/deep/04 Keys.flac")]
    assert keys.key == "F# major" and keys.bpm is not None and "soulful" in keys.tags
    assert prepared.train and prepared.validation
    assert storage.exists(ANALYSIS_KEY)


def test_folder_manifest_is_readable_by_the_manifest_source(
    prepared_folder: tuple[LocalStorage, Path], tmp_path: Path
) -> None:
    storage, _ = prepared_folder
    manifest_uri = storage.uri_of(FOLDER_MANIFEST_KEY)
    spec = DatasetSpec(source=DatasetSource.manifest, uri=manifest_uri, validation_fraction=0.2)
    again = prepare_dataset(spec, LocalStorage(tmp_path / "other"), tmp_path / "work")
    folder = _folder_manifest(storage)
    assert {e.id for e in again.entries} == set(folder)
    for entry in again.entries:
        assert entry.description == folder[entry.id]["description"]
        assert entry.bpm == folder[entry.id].get("bpm") and entry.key == folder[entry.id].get("key")


def test_clip_ids_are_stable_readable_and_distinct() -> None:
    assert clip_id_of("Side A/01 Intro.mp3") == clip_id_of("Side A/01 Intro.mp3")
    assert clip_id_of("Side A/01 Intro.mp3").startswith("side-a-01-intro-")
    assert clip_id_of("Side A/01 Intro.mp3") != clip_id_of("Side A/01 Intro.wav")
    assert clip_id_of("a/b.mp3") != clip_id_of("a-b.mp3")


def test_a_folder_without_audio_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "notes.txt").write_text("no audio here")
    spec = DatasetSpec(source=DatasetSource.folder, uri=str(tmp_path / "music"))
    with pytest.raises(DatasetError, match="holds no audio file"):
        prepare_dataset(spec, LocalStorage(tmp_path / "storage"), tmp_path / "work")


def test_an_undecodable_file_is_skipped_with_its_reason(tmp_path: Path) -> None:
    music = tmp_path / "music"
    write_pcm(music / "good.wav", synth_clip(113, "A", "minor", 22050, channels=1), 22050)
    (music / "broken.mp3").write_bytes(b"ID3 this is not an mp3 at all" * 20)
    spec = DatasetSpec(source=DatasetSource.folder, uri=str(music), validation_fraction=0.5)
    prepared = prepare_dataset(spec, LocalStorage(tmp_path / "storage"), tmp_path / "work")
    assert [e.id for e in prepared.entries] == [clip_id_of("good.wav")]
    assert prepared.report["skippedByReason"] == {"unreadable audio": 1}
    assert prepared.entries[0].description == "track at 113 BPM in A minor"  # no genre anywhere


def test_folder_on_s3(
    s3_server: S3Server, collection: Collection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket("trainer-folder")
    source = open_storage(f"s3://{bucket}/music")
    for relative in ("Side A/01 Intro.mp3", "Side B/03 Night.wav"):
        source.upload_file(collection.root / relative, relative)
    source.upload_file(collection.root / "cover.jpg", "cover.jpg")
    storage = open_storage(f"s3://{bucket}/runs/r")
    spec = DatasetSpec(source=DatasetSource.folder, uri=source.uri, genre="amapiano", validation_fraction=0.5)
    prepared = prepare_dataset(spec, storage, tmp_path / "work")

    entries = {e.id: e for e in prepared.entries}
    intro = entries[clip_id_of("Side A/01 Intro.mp3")]
    assert intro.audio == f"s3://{bucket}/music/Side A/01 Intro.mp3"
    assert intro.key == "A minor" and intro.bpm is not None and abs(intro.bpm - 113) <= BPM_TOLERANCE
    lines = [json.loads(line) for line in storage.read_text(FOLDER_MANIFEST_KEY).splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(entries)


def test_only_new_or_changed_files_are_analysed_again(tmp_path: Path) -> None:
    music = tmp_path / "music"
    write_pcm(music / "a.wav", synth_clip(113, "A", "minor", 22050, channels=1), 22050)
    write_pcm(music / "b.flac", synth_clip(128, "C", "major", 22050, channels=1), 22050)
    storage = LocalStorage(tmp_path / "storage")
    fetcher = AudioFetcher(tmp_path / "work")

    def scan() -> tuple[int, dict[str, FolderClip]]:
        before = decode_count()
        folder = scan_folder(str(music), fetcher.local, storage, file_identities, "amapiano")
        return decode_count() - before, {c.id: c for c in folder.clips}

    decoded, first = scan()
    assert decoded == 2
    decoded, second = scan()
    assert decoded == 0 and second == first  # read back from dataset/folder-analysis.json
    write_pcm(music / "b.flac", synth_clip(96, "C", "major", 22050, seconds=13.0, channels=1), 22050)
    decoded, third = scan()
    assert decoded == 1
    changed = third[clip_id_of("b.flac")]
    assert changed.bpm is not None and abs(changed.bpm - 96) <= BPM_TOLERANCE
    assert third[clip_id_of("a.wav")] == first[clip_id_of("a.wav")]
