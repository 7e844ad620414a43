"""Text prompts made from MagnaTagATune tags, deterministic per clip.

MagnaTagATune has no amapiano; its tags stand in for the genre's traits (log-drum-like bass,
percussion, piano, jazzy and mellow moods). A prompt names the moods and instruments a clip is
tagged with inside one of a few templates, chosen by a hash of the clip id so a clip always gets
the same text.
"""

from __future__ import annotations

import hashlib

GENRE = "amapiano"

#: Mood tags in the order they are named (first two present are used).
MOOD_TAGS: tuple[str, ...] = (
    "mellow",
    "chill",
    "deep",
    "soulful",
    "jazzy",
    "jazz",
    "funky",
    "groovy",
    "dreamy",
    "calm",
    "soft",
    "quiet",
    "relaxing",
    "happy",
    "upbeat",
    "dark",
    "sad",
    "atmospheric",
    "ambient",
    "spacey",
    "trance",
    "house",
    "dance",
    "fast",
    "slow",
    "loud",
    "heavy",
    "weird",
)

#: MagnaTagATune tag → the phrase a prompt uses for it (first three present are used).
INSTRUMENT_TAGS: dict[str, str] = {
    "piano": "piano",
    "bass": "deep bass",
    "drums": "drums",
    "drum": "drums",
    "percussion": "percussion",
    "beats": "punchy beats",
    "beat": "punchy beats",
    "synth": "synth pads",
    "keyboard": "keys",
    "organ": "organ",
    "electronic": "electronic textures",
    "techno": "techno synths",
    "guitar": "guitar",
    "strings": "strings",
    "violin": "violin",
    "cello": "cello",
    "flute": "flute",
    "sax": "saxophone",
    "saxophone": "saxophone",
    "trumpet": "trumpet",
    "horns": "horns",
    "harp": "harp",
    "vocals": "vocals",
    "vocal": "vocals",
    "female vocal": "female vocals",
    "female vocals": "female vocals",
    "female voice": "female vocals",
    "male vocal": "male vocals",
    "male vocals": "male vocals",
    "male voice": "male vocals",
    "choir": "choir",
    "singing": "vocals",
    "voice": "vocals",
    "no vocals": "no vocals",
    "no vocal": "no vocals",
    "no voice": "no vocals",
}

TEMPLATES: tuple[str, ...] = (
    "{mood} {genre} with log drums and {instruments}",
    "{mood} {genre} track featuring {instruments} over log drums",
    "{genre} groove, {mood}, with {instruments} and log drums",
    "{mood} {genre} with {instruments}, shakers and a rolling log drum bassline",
)

DEFAULT_MOOD = "laid-back"
DEFAULT_INSTRUMENTS = "percussion"


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def moods_of(tags: list[str] | set[str], limit: int = 2) -> list[str]:
    present = set(tags)
    return [m for m in MOOD_TAGS if m in present][:limit]


def instruments_of(tags: list[str] | set[str], limit: int = 3) -> list[str]:
    present = set(tags)
    phrases: list[str] = []
    for tag, phrase in INSTRUMENT_TAGS.items():
        if tag in present and phrase not in phrases:
            phrases.append(phrase)
    return phrases[:limit]


def template_index(clip_id: str) -> int:
    digest = hashlib.sha256(f"fermata-template:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % len(TEMPLATES)


def prompt_from_tags(clip_id: str, tags: list[str] | set[str], genre: str = GENRE) -> str:
    """A deterministic text prompt naming the clip's moods and instruments."""
    moods = moods_of(tags)
    instruments = instruments_of(tags)
    template = TEMPLATES[template_index(clip_id)]
    return template.format(
        genre=genre,
        mood=_join(moods) if moods else DEFAULT_MOOD,
        instruments=_join(instruments) if instruments else DEFAULT_INSTRUMENTS,
    )
