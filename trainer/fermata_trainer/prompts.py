"""Text prompts: from MagnaTagATune tags, from a track's tags and tempo/key, and per-epoch variants.

MagnaTagATune has no amapiano; its tags stand in for the genre's traits (log-drum-like bass,
percussion, piano, jazzy and mellow moods). A prompt names the moods and instruments a clip is
tagged with inside one of a few templates, chosen by a hash of the clip id so a clip always gets
the same text. Near-synonym moods collapse to one word (``jazz`` → ``jazzy``, ``calm`` →
``chill``), and the vocals (female, male, none) are their own phrase, never crowded out by the
instruments.

:func:`describe_track` writes the description of a file of a ``folder`` source ("soulful amapiano
track at 113 BPM in A minor, piano and log drums"). :func:`augmented_prompt` varies a clip's
prompt per epoch (a template and which details to name, picked by a hash of seed, epoch and clip
id), so it is reproducible from the training seed and a resumed run sees the same text.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence

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
    "log drum": "log drums",
    "log drums": "log drums",
    "shaker": "shakers",
    "shakers": "shakers",
    "marimba": "marimba",
}

#: Near-synonym moods → the one word a prompt uses (the others would only repeat it).
MOOD_SYNONYMS: dict[str, str] = {
    "jazz": "jazzy",
    "calm": "chill",
    "relaxing": "chill",
    "quiet": "soft",
    "ambient": "atmospheric",
    "spacey": "atmospheric",
    "groovy": "funky",
}

FEMALE_VOCAL_TAGS = frozenset({"female vocal", "female vocals", "female voice", "female", "woman"})
MALE_VOCAL_TAGS = frozenset({"male vocal", "male vocals", "male voice", "male", "man"})
NO_VOCAL_TAGS = frozenset({"no vocals", "no vocal", "no voice", "no singer", "instrumental"})
VOCAL_TAGS = frozenset({"vocals", "vocal", "singing", "voice", "singer", "choir"})

#: Every tag word a prompt knows what to do with.
KNOWN_TAGS = (
    frozenset(MOOD_TAGS)
    | frozenset(INSTRUMENT_TAGS)
    | FEMALE_VOCAL_TAGS
    | MALE_VOCAL_TAGS
    | NO_VOCAL_TAGS
    | VOCAL_TAGS
)

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


def moods_of(tags: Iterable[str], limit: int = 2) -> list[str]:
    """Up to ``limit`` moods in :data:`MOOD_TAGS` order, near-synonyms collapsed to one word."""
    present = set(tags)
    moods: list[str] = []
    for tag in MOOD_TAGS:
        mood = MOOD_SYNONYMS.get(tag, tag)
        if tag in present and mood not in moods:
            moods.append(mood)
    return moods[:limit]


def instruments_of(tags: Iterable[str], limit: int = 3) -> list[str]:
    present = set(tags)
    phrases: list[str] = []
    for tag, phrase in INSTRUMENT_TAGS.items():
        if tag in present and phrase not in phrases:
            phrases.append(phrase)
    return phrases[:limit]


def vocals_of(tags: Iterable[str]) -> str | None:
    """The vocals phrase: female/male vocals win over a contradicting "no vocals" tag (MTAT
    annotators disagree at times); ``None`` when the tags say nothing about vocals."""
    present = set(tags)
    female, male = bool(present & FEMALE_VOCAL_TAGS), bool(present & MALE_VOCAL_TAGS)
    if female and male:
        return "female and male vocals"
    if female or male:
        return "female vocals" if female else "male vocals"
    if present & NO_VOCAL_TAGS:
        return "no vocals"
    if "choir" in present:
        return "choir"
    return "vocals" if present & VOCAL_TAGS else None


def template_index(clip_id: str) -> int:
    digest = hashlib.sha256(f"fermata-template:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % len(TEMPLATES)


def prompt_from_tags(clip_id: str, tags: Iterable[str], genre: str = GENRE) -> str:
    """A deterministic text prompt naming the clip's moods, instruments and vocals."""
    tags = list(tags)
    moods = moods_of(tags)
    instruments = instruments_of(tags)
    vocals = vocals_of(tags)
    template = TEMPLATES[template_index(clip_id)]
    prompt = template.format(
        genre=genre,
        mood=_join(moods) if moods else DEFAULT_MOOD,
        instruments=_join(instruments) if instruments else DEFAULT_INSTRUMENTS,
    )
    return f"{prompt}, {vocals}" if vocals else prompt


# ----------------------------------------------------------------------------- track descriptions


def tag_terms(texts: Iterable[str]) -> list[str]:
    """Lower-case terms of free-text tags (genre, mood, comment): each comma/semicolon/slash
    separated phrase as a whole when it is a known tag, else its words, a known two-word tag
    taken as one ("Piano, log drums and shakers" yields ``piano``, ``log drums``, ``and``,
    ``shakers``)."""
    terms: dict[str, None] = {}
    for text in texts:
        for phrase in re.split(r"[,;/|\n]+", text.lower()):
            words = re.findall(r"[a-z0-9#&'-]+", phrase)
            whole = " ".join(words)
            if whole in KNOWN_TAGS:
                terms.setdefault(whole)
                continue
            i = 0
            while i < len(words):
                pair = " ".join(words[i : i + 2])
                step = 2 if i + 1 < len(words) and pair in KNOWN_TAGS else 1
                terms.setdefault(pair if step == 2 else words[i])
                i += step
    return list(terms)


def format_bpm(bpm: float) -> str:
    return f"{round(bpm)} BPM"


def describe_track(
    *,
    genre: str | None,
    moods: Sequence[str] = (),
    instruments: Sequence[str] = (),
    vocals: str | None = None,
    bpm: float | None = None,
    key: str | None = None,
) -> str:
    """E.g. ``"soulful amapiano track at 113 BPM in A minor, piano and log drums"``."""
    head = " ".join(w for w in (_join(list(moods)), genre.strip() if genre else "", "track") if w)
    if bpm is not None:
        head += f" at {format_bpm(bpm)}"
    if key:
        head += f" in {key}"
    details = [_join(list(instruments))] if instruments else []
    if vocals:
        details.append(vocals)
    return ", ".join([head, *details])


# ----------------------------------------------------------------------------- augmentation

#: Per-epoch variants of a clip's prompt: ``{extra}`` names details (BPM, key, tags) the
#: description lacks; ``{details}`` is a tag-style caption of the clip's details alone.
AUGMENT_TEMPLATES: tuple[str, ...] = (
    "{description}",
    "{description}, {extra}",
    "{extra}; {description}",
    "{details}",
)


def _augment_rng(seed: int, epoch: int, clip_id: str) -> random.Random:
    digest = hashlib.sha256(f"fermata-augment:{seed}:{epoch}:{clip_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _pick(rng: random.Random, items: list[str], most: int) -> list[str]:
    """One to ``most`` of ``items`` in their order (none when there are none)."""
    if not items:
        return []
    chosen = set(rng.sample(range(len(items)), k=rng.randint(1, min(most, len(items)))))
    return [item for i, item in enumerate(items) if i in chosen]


def augmented_prompt(
    description: str,
    tags: Sequence[str],
    bpm: float | None,
    key: str | None,
    clip_id: str,
    epoch: int,
    seed: int,
) -> str:
    """The prompt a training clip gets in ``epoch``: the description itself in epoch 0, then one
    of :data:`AUGMENT_TEMPLATES` with a few of the clip's details (BPM, key, tags) picked by a
    hash of ``(seed, epoch, clip_id)`` — a pure function, so every rank and a resumed run agree.
    A template that would name nothing new falls back to the description.
    """
    if epoch <= 0:
        return description
    rng = _augment_rng(seed, epoch, clip_id)
    details = [format_bpm(bpm)] if bpm is not None and bpm > 0 else []
    details += [key] if key else []
    details += [t.strip() for t in dict.fromkeys(tags) if t.strip()]
    lowered = description.lower()
    extra = _pick(rng, [d for d in details if d.lower() not in lowered], 3)
    extra = [f"in {d}" if d == key else d for d in extra]
    caption = _pick(rng, details, 5) if len(details) >= 2 else []
    template = AUGMENT_TEMPLATES[rng.randrange(len(AUGMENT_TEMPLATES))]
    if ("{extra}" in template and not extra) or ("{details}" in template and not caption):
        return description
    return template.format(description=description, extra=", ".join(extra), details=", ".join(caption))
