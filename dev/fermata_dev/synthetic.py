"""Synthetic MagnaTagATune-like data (for tests and the local demo): audio files + annotations_final.csv.

The CSV has the real layout: TAB-separated, quoted, ``clip_id``, 188 binary tag columns (the
MagnaTagATune tag names, padded with placeholders if the list here falls short) and ``mp3_path``.
Audio is short (1-3 s, 16 kHz mono): a pulsed low sine (a log-drum stand-in) plus a tone whose
pitch depends on the clip, so the codes differ between clips.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import av
import numpy as np
import numpy.typing as npt
import soundfile as sf
from av.audio.stream import AudioStream

from fermata_api import DEFAULT_PROXY_TAGS

MTAT_TAGS: list[str] = [
    "guitar",
    "classical",
    "slow",
    "techno",
    "strings",
    "drums",
    "electronic",
    "rock",
    "fast",
    "piano",
    "ambient",
    "beat",
    "violin",
    "vocal",
    "synth",
    "female",
    "indian",
    "opera",
    "male",
    "singing",
    "vocals",
    "no vocals",
    "harpsichord",
    "loud",
    "quiet",
    "flute",
    "woman",
    "male vocal",
    "no vocal",
    "pop",
    "soft",
    "sitar",
    "solo",
    "man",
    "classic",
    "choir",
    "voice",
    "new age",
    "dance",
    "male voice",
    "female vocal",
    "beats",
    "harp",
    "cello",
    "no voice",
    "weird",
    "country",
    "metal",
    "female voice",
    "choral",
    "no singer",
    "orchestra",
    "jazz",
    "sax",
    "percussion",
    "bass",
    "deep",
    "mellow",
    "jazzy",
    "chill",
    "soulful",
    "dark",
    "happy",
    "sad",
    "calm",
    "funky",
    "groovy",
    "upbeat",
    "trance",
    "house",
    "organ",
    "keyboard",
    "trumpet",
    "horns",
    "duet",
    "plucking",
    "hard rock",
    "world",
    "bongos",
    "female singing",
    "clasical",
    "chorus",
    "female opera",
    "clarinet",
    "heavy",
    "silence",
    "men",
    "woodwind",
    "funk",
    "no strings",
    "chimes",
    "foreign",
    "no piano",
    "soft rock",
    "eerie",
    "spacey",
    "no beat",
    "banjo",
    "electric",
    "violins",
    "folk",
    "wind",
    "no singing",
    "middle eastern",
    "drum",
    "airy",
    "repetitive",
    "birds",
    "space",
    "harpsicord",
    "medieval",
    "girl",
    "acoustic",
    "string",
    "not classical",
    "chanting",
    "no violin",
    "not rock",
    "no guitar",
    "talking",
    "soprano",
    "acoustic guitar",
    "electric guitar",
    "male singer",
    "man singing",
    "classical guitar",
    "electro",
    "reggae",
    "tribal",
    "male opera",
    "irish",
    "electronica",
    "horn",
    "operatic",
    "arabic",
    "low",
    "instrumental",
    "chant",
    "strange",
    "drone",
    "synthesizer",
    "heavy metal",
    "modern",
    "disco",
    "bells",
    "fast beat",
    "industrial",
    "hard",
    "no flute",
    "jungle",
    "lute",
    "oboe",
    "orchestral",
    "viola",
    "light",
    "echo",
    "celtic",
    "male vocals",
    "eastern",
    "old",
    "flutes",
    "punk",
    "spanish",
    "blues",
    "india",
    "scary",
    "woman singing",
    "piano solo",
    "guitars",
    "no drums",
    "female vocals",
    "voices",
    "different",
    "clapping",
    "monks",
    "not opera",
    "not english",
    "oriental",
    "noise",
    "female singer",
    "rap",
    "hip hop",
    "quick",
    "water",
    "baroque",
    "women",
    "fiddle",
]


def tag_columns() -> list[str]:
    tags: list[str] = []
    for tag in [*DEFAULT_PROXY_TAGS, *MTAT_TAGS]:
        if tag not in tags:
            tags.append(tag)
    tags = tags[:188]
    while len(tags) < 188:
        tags.append(f"tag{len(tags)}")
    return tags


AMAPIANO_LIKE = ["drums", "percussion", "bass", "piano", "deep", "mellow"]
OTHER = ["classical", "violin", "strings", "opera", "slow"]


def synth_clip(index: int, seconds: float, sample_rate: int = 16000) -> npt.NDArray[np.float32]:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    beat = 60.0 / (100 + 3 * (index % 7))
    phase = (t % beat) / beat
    log_drum = np.sin(2 * math.pi * (55 + 5 * (index % 4)) * t) * np.exp(-phase * 6.0)
    tone = 0.3 * np.sin(2 * math.pi * (220 * 2 ** ((index % 12) / 12)) * t)
    rng = np.random.default_rng(index)
    noise = 0.02 * rng.standard_normal(t.size)
    out: npt.NDArray[np.float32] = ((0.6 * log_drum + tone + noise) * 0.8).astype(np.float32)
    return out


@dataclass
class SyntheticMtat:
    root: Path
    clip_ids: list[str]
    qualifying: list[str]
    paths: dict[str, Path]


def encode_audio(
    path: Path,
    samples: npt.NDArray[np.float32],
    rate: int,
    *,
    container: str = "mp3",
    codec: str = "libmp3lame",
    bitrate: int | None = None,
) -> Path:
    """Encode float samples (``[T]`` mono or ``[C, T]``) with PyAV (FFmpeg) into a real file: MP3
    with LAME (which writes a Xing/Info header with the length), AAC in MP4 for M4A, and so on;
    ``bitrate`` in bits per second (the encoder's default when None)."""
    data = samples[None] if samples.ndim == 1 else samples
    layout = "stereo" if data.shape[0] == 2 else "mono"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container) as out:
        stream = cast(AudioStream, out.add_stream(codec, rate=rate, layout=layout))
        if bitrate is not None:
            stream.bit_rate = bitrate
        step = 1152 * 16
        for start in range(0, data.shape[1], step):
            chunk = np.ascontiguousarray(data[:, start : start + step], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def make_mtat_tree(
    root: Path,
    clips: int = 12,
    qualifying_every: int = 1,
    seconds: tuple[float, ...] = (1.3, 2.6, 0.7, 3.2),
    formats: tuple[str, ...] = ("wav", "flac"),
    mp3_clips: int = 0,
    audio_dir: str = "mp3",
) -> SyntheticMtat:
    """A MagnaTagATune-like tree; every ``qualifying_every``-th clip carries amapiano-like tags
    (≥ 3 proxy tags), the rest classical ones (0 proxy tags)."""
    tags = tag_columns()
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    ids, qualifying, paths = [], [], {}
    for i in range(clips):
        clip_id = str(100 + i)
        fmt = "mp3" if i < mp3_clips else formats[i % len(formats)]
        rel = f"{'0123456789abcdef'[i % 16]}/artist_{i}-album-{i:02d}-track-{i % 5}.{fmt}"
        path = root / audio_dir / rel if audio_dir else root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        audio = synth_clip(i, seconds[i % len(seconds)])
        if fmt == "mp3":
            sf.write(str(path), audio, 16000, format="MP3")
        else:
            sf.write(str(path), audio, 16000, format=fmt.upper())
        good = i % qualifying_every == 0
        chosen = set(AMAPIANO_LIKE if good else OTHER)
        if good and i % 2:
            chosen |= {"jazzy", "electronic"}
        rows.append([clip_id, *("1" if t in chosen else "0" for t in tags), rel])
        ids.append(clip_id)
        paths[clip_id] = path
        if good:
            qualifying.append(clip_id)
    write_annotations(root / "annotations_final.csv", ["clip_id", *tags, "mp3_path"], rows)
    return SyntheticMtat(root, ids, qualifying, paths)


def write_annotations(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def make_manifest(root: Path, clips: int = 6, seconds: float = 1.5) -> Path:
    """A generic JSONL manifest with relative audio paths, bpm and tags."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(clips):
        name = f"audio/clip-{i}.wav"
        (root / "audio").mkdir(exist_ok=True)
        sf.write(str(root / name), synth_clip(i, seconds), 16000)
        lines.append(
            json.dumps(
                {
                    "audio": name,
                    "description": f"deep amapiano groove number {i} with log drums",
                    "bpm": 112 + i,
                    "key": "A minor",
                    "tags": ["amapiano", "log drum"],
                }
            )
        )
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
