"""Curation: which checked clips are kept, how the kept set is mixed and split, and how each
clip's audio is conditioned before it is tokenized.

The whole policy of ``dataset.curation``, ``dataset.sources`` and ``dataset.mix`` lives here;
:func:`fermata_trainer.dataset.prepare_dataset` calls :func:`curate` once the files are checked,
and :func:`fermata_trainer.codes_cache.encode_clip` calls :func:`process_audio` after decoding.

**Filters** (:func:`judge`, a pure function of a clip's measured facts and the spec). Each
rejection is a reason whose text before ``:`` is the count key of ``report.skippedByReason``:

* ``duplicate audio`` — the file's sha256 equals an earlier kept file's (on by default);
* ``too short`` / ``too long`` — decoded length outside min/maxDurationSeconds;
* ``low sample rate`` — the file's own rate below minSampleRate (before any resampling);
* ``low bitrate`` / ``unknown bitrate`` — a lossy file under minBitrateKbps, or one whose
  header states none. Lossless files (PCM WAV/AIFF, FLAC, ALAC, WavPack...) always pass;
* ``bpm out of band`` / ``bpm unknown`` — tempo outside ``bpm``; the manifest entry's ``bpm``
  when present, else :func:`~fermata_trainer.audio_analysis.estimate_tempo` (a decode per clip,
  only when the band is set);
* ``key not allowed`` / ``key unknown`` — key not among ``keys`` or not in ``mode``; the
  manifest's ``key`` (``"A minor"``, ``"Am"``, ``"F#m"``, ``"Bb major"``; enharmonics match)
  when present, else :func:`~fermata_trainer.audio_analysis.estimate_key`;
* ``mostly silent`` — silence.action=reject and more than maxSilentFraction of the clip's
  50 ms windows have an RMS level (the loudest channel's) under thresholdDb.

**Mix** (:func:`balance`). Clips belong to a group: their source's name (``dataset.sources``)
or the value of the manifest field ``mix.by``. The split is stratified: the deterministic
by-id split (:func:`~fermata_trainer.dataset.assign_splits`) is applied within each group, so
each group gives its validation share. With weights, each split is then balanced *at
preparation* by down-sampling: the group that is scarcest relative to its weight keeps all its
clips, every other group keeps clips (in a fixed order hashed from the clip id) until its
seconds reach ``weight / Σ weights`` of the split's total; the rest are skipped as
``mix balance``. Shares are measured in seconds of audio, which is what the segments are cut
from, so the train split matches the weights to within one clip's length per group. The
batch plan then samples the kept clips uniformly. A weighted group without a train clip is a
:class:`CurationError`; entries of a manifest mix without a weighted value are ``not in mix``.

**Processing** (:func:`process_audio`, applied to every clip before tokenizing; its settings
are :func:`processing_fingerprint`, part of the code cache key): silence trimmed at the start
and end (silence.action=trim), then loudness normalised to ``loudness.targetLufs`` — ITU-R
BS.1770-4 integrated loudness (K-weighting, 400 ms blocks with 75 % overlap, absolute gate
−70 LKFS, relative gate −10 LU) — with a peak limiter holding samples under
``loudness.peakCeilingDbfs`` so the gain never clips.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from fermata_api import CurationSpec, DatasetSpec, MixSpec, SilenceAction
from fermata_trainer.audio_io import AudioFacts, UnreadableAudioError, inspect_audio
from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.logging_setup import get_logger

log = get_logger(__name__)

FloatArray = npt.NDArray[np.float32]

#: Silence is measured in windows of this length (seconds).
SILENCE_WINDOW_SECONDS = 0.05
#: Version of the processing algorithms: part of :func:`processing_fingerprint`.
PROCESSING_VERSION = 1
#: Codecs whose files pass any bitrate floor (PyAV canonical names; PCM is ``pcm_*``).
LOSSLESS_CODECS = frozenset({"flac", "alac", "wavpack", "ape", "tta", "truehd", "mlp", "shorten"})
#: Extensions taken as lossless when the header names no codec.
LOSSLESS_EXTENSIONS = frozenset({".wav", ".flac", ".aiff", ".aif"})
MIX_BALANCE = "mix balance"


class CurationError(TrainerConfigError):
    """The curation asked for cannot be met by the data (e.g. a weighted group is empty)."""


# ----------------------------------------------------------------------------- inputs


class CandidateLike(Protocol):
    """What curation reads of a listed clip (``dataset.Candidate``)."""

    @property
    def id(self) -> str: ...
    @property
    def audio(self) -> str: ...
    @property
    def bpm(self) -> float | None: ...
    @property
    def key(self) -> str | None: ...
    @property
    def group(self) -> str | None: ...


class CheckedLike(Protocol):
    """What curation reads of a checked file (``dataset._FileCheck``)."""

    @property
    def candidate(self) -> CandidateLike: ...
    @property
    def sha256(self) -> str: ...
    @property
    def duration(self) -> float: ...
    @property
    def facts(self) -> AudioFacts | None: ...


CheckT = TypeVar("CheckT", bound=CheckedLike)


@dataclass(frozen=True)
class Measured:
    """What :func:`judge` decides on: the file's facts, its tempo and key (each with where it
    came from: ``manifest`` or ``estimated``) and its silent share (when silence is judged)."""

    facts: AudioFacts
    audio: str = ""
    bpm: float | None = None
    bpm_from: str = "manifest"
    key: str | None = None
    key_from: str = "manifest"
    silent_fraction: float | None = None


# ----------------------------------------------------------------------------- keys

_PITCH = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_KEY_RE = re.compile(r"^\s*([A-Ga-g])\s*([#♯b♭]?)\s*(major|minor|maj|min|m|M)?\s*$")


def parse_key(text: str) -> tuple[int, str] | None:
    """``"A minor"``, ``"Am"``, ``"F#m"``, ``"Bb major"``, ``"C"`` → (pitch class, mode); None
    when the text is not a key. A bare tonic is major; ``m`` is minor, ``M`` major."""
    match = _KEY_RE.match(text)
    if match is None:
        return None
    letter, accidental, mode = match.groups()
    pitch = _PITCH[letter.upper()] + (
        1 if accidental in ("#", "♯") else -1 if accidental in ("b", "♭") else 0
    )
    minor = mode is not None and (mode.lower() in ("minor", "min") or mode == "m")
    return pitch % 12, "minor" if minor else "major"


# ----------------------------------------------------------------------------- the filters


def is_lossless(facts: AudioFacts, audio: str) -> bool:
    """PCM, FLAC, ALAC and other lossless codecs; by extension when the header names none."""
    if facts.codec is not None:
        return facts.codec.startswith("pcm_") or facts.codec in LOSSLESS_CODECS
    return Path(audio.rpartition("/")[2]).suffix.lower() in LOSSLESS_EXTENSIONS


def _duration_rule(m: Measured, c: CurationSpec) -> str | None:
    d = m.facts.duration
    if c.min_duration_seconds is not None and d < c.min_duration_seconds:
        return f"too short: {d:.2f} s < minDurationSeconds {c.min_duration_seconds:g}"
    if c.max_duration_seconds is not None and d > c.max_duration_seconds:
        return f"too long: {d:.2f} s > maxDurationSeconds {c.max_duration_seconds:g}"
    return None


def _sample_rate_rule(m: Measured, c: CurationSpec) -> str | None:
    if c.min_sample_rate is not None and m.facts.sample_rate < c.min_sample_rate:
        return f"low sample rate: {m.facts.sample_rate} Hz < minSampleRate {c.min_sample_rate}"
    return None


def _bitrate_rule(m: Measured, c: CurationSpec) -> str | None:
    if c.min_bitrate_kbps is None or is_lossless(m.facts, m.audio):
        return None
    rate, codec = m.facts.bitrate_kbps, m.facts.codec or "unknown codec"
    if rate is None:
        return f"unknown bitrate: the {codec} header states none (minBitrateKbps {c.min_bitrate_kbps:g})"
    # Encoders write nominal rates (320 kbps → 320000 bit/s); allow rounding of the header value.
    if rate < c.min_bitrate_kbps - 0.5:
        return f"low bitrate: {rate:g} kbps {codec} < minBitrateKbps {c.min_bitrate_kbps:g}"
    return None


def _bpm_rule(m: Measured, c: CurationSpec) -> str | None:
    band = c.bpm
    if band is None or not _filters_bpm(c):
        return None
    shown = f"{band.min or 0:g}-{band.max:g}" if band.max is not None else f"{band.min or 0:g} and above"
    if m.bpm is None:
        return f"bpm unknown: no manifest bpm and no clear tempo in the audio (band {shown})"
    if (band.min is not None and m.bpm < band.min) or (band.max is not None and m.bpm > band.max):
        return f"bpm out of band: {m.bpm:g} ({m.bpm_from}) not in {shown}"
    return None


def _key_rule(m: Measured, c: CurationSpec) -> str | None:
    if not _filters_key(c):
        return None
    parsed = parse_key(m.key) if m.key is not None else None
    if parsed is None:
        shown = f"{m.key!r} is not a key" if m.key is not None else "no manifest key and no clear key"
        return f"key unknown: {shown}"
    allowed = {k for k in (parse_key(text) for text in c.keys) if k is not None}
    if (allowed and parsed not in allowed) or (c.mode is not None and parsed[1] != c.mode.value):
        wanted = ", ".join(c.keys) if c.keys else f"any {c.mode.value if c.mode else ''} key"
        mode = f" in {c.mode.value}" if c.mode is not None and c.keys else ""
        return f"key not allowed: {m.key} ({m.key_from}) not in [{wanted}]{mode}"
    return None


def _silence_rule(m: Measured, c: CurationSpec) -> str | None:
    if c.silence.action is not SilenceAction.reject or m.silent_fraction is None:
        return None
    if m.silent_fraction > c.silence.max_silent_fraction:
        return (
            f"mostly silent: {m.silent_fraction:.0%} of {SILENCE_WINDOW_SECONDS * 1000:g} ms windows "
            f"under {c.silence.threshold_db:g} dBFS > maxSilentFraction {c.silence.max_silent_fraction:g}"
        )
    return None


_RULES: tuple[Callable[[Measured, CurationSpec], str | None], ...] = (
    _duration_rule,
    _sample_rate_rule,
    _bitrate_rule,
    _bpm_rule,
    _key_rule,
    _silence_rule,
)


def judge(measured: Measured, curation: CurationSpec) -> str | None:
    """Why a clip with these facts is skipped (the first failing filter), or None to keep it."""
    for rule in _RULES:
        reason = rule(measured, curation)
        if reason is not None:
            return reason
    return None


# ----------------------------------------------------------------------------- measuring


def _filters_bpm(curation: CurationSpec) -> bool:
    return curation.bpm is not None and (curation.bpm.min is not None or curation.bpm.max is not None)


def _filters_key(curation: CurationSpec) -> bool:
    return bool(curation.keys) or curation.mode is not None


def needs_samples(candidate: CandidateLike, curation: CurationSpec) -> bool:
    """Whether judging this clip needs its decoded audio (estimation, silence)."""
    return (
        (_filters_bpm(curation) and candidate.bpm is None)
        or (_filters_key(curation) and candidate.key is None)
        or curation.silence.action is SilenceAction.reject
    )


def measure(check: CheckedLike, curation: CurationSpec, path_of: Callable[[str], Path]) -> Measured:
    """The facts :func:`judge` needs: the checked file's, plus (decoding it once more, only
    when a filter asks) the estimated tempo and key and the silent share."""
    candidate = check.candidate
    facts = check.facts
    if facts is not None and not needs_samples(candidate, curation):
        return Measured(facts, candidate.audio, bpm=candidate.bpm, key=candidate.key)
    from fermata_trainer.audio_analysis import estimate_key, estimate_tempo

    facts, samples = inspect_audio(path_of(candidate.audio))
    bpm, bpm_from = candidate.bpm, "manifest"
    if bpm is None and _filters_bpm(curation):
        bpm, bpm_from = estimate_tempo(samples, facts.sample_rate), "estimated"
    key, key_from = candidate.key, "manifest"
    if key is None and _filters_key(curation):
        key, key_from = estimate_key(samples, facts.sample_rate), "estimated"
    silent = None
    if curation.silence.action is SilenceAction.reject:
        silent = silent_fraction(samples, facts.sample_rate, curation.silence.threshold_db)
    return Measured(facts, candidate.audio, bpm, bpm_from, key, key_from, silent)


# ----------------------------------------------------------------------------- silence


def _window_levels_db(samples: FloatArray, rate: int) -> npt.NDArray[np.float64]:
    """RMS level (dBFS, the loudest channel) of each 50 ms window; one window when shorter."""
    data = np.atleast_2d(samples).astype(np.float64, copy=False)
    size = max(1, int(round(SILENCE_WINDOW_SECONDS * rate)))
    count = max(1, data.shape[1] // size)
    usable = data[:, : count * size] if data.shape[1] >= size else data
    blocks = usable.reshape(data.shape[0], count, -1)
    rms = np.sqrt(np.mean(np.square(blocks), axis=2)).max(axis=0)
    levels: npt.NDArray[np.float64] = 20.0 * np.log10(np.maximum(rms, 1e-12))
    return levels


def silent_fraction(samples: FloatArray, rate: int, threshold_db: float) -> float:
    """Share of 50 ms windows whose RMS level (loudest channel) is under ``threshold_db``."""
    if samples.size == 0:
        return 1.0
    return float(np.mean(_window_levels_db(samples, rate) < threshold_db))


def trim_silence(samples: FloatArray, rate: int, threshold_db: float) -> FloatArray:
    """``samples`` without the silent 50 ms windows at the start and the end (a clip with no
    window above the threshold is returned whole: there is nothing to keep it to)."""
    loud = np.flatnonzero(_window_levels_db(samples, rate) >= threshold_db)
    if samples.size == 0 or loud.size == 0:
        return samples
    size = max(1, int(round(SILENCE_WINDOW_SECONDS * rate)))
    start = int(loud[0]) * size
    stop = samples.shape[-1] if int(loud[-1]) == samples.shape[-1] // size - 1 else (int(loud[-1]) + 1) * size
    return np.ascontiguousarray(samples[..., start:stop])


# ----------------------------------------------------------------------------- loudness

# ITU-R BS.1770-4 (10/2015), Annex 1: the K-weighting is a high shelf (stage 1, Table 1) then
# the RLB high-pass (stage 2, Table 2), given there as biquads at 48 kHz:
#   stage 1: b = 1.53512485958697, -2.69169618940638, 1.19839281085285
#            a = 1, -1.69065929318241, 0.73248077421585
#   stage 2: b = 1, -2, 1;  a = 1, -1.99004745483398, 0.99007225036621
# Other rates use the analogue prototypes those tables were derived from (centre frequency,
# gain and Q as recovered in libebur128), mapped with the bilinear transform; at 48 kHz they
# reproduce the tables to 1e-8 (tests/trainer/test_curation.py checks it).
BS1770_STAGE1_48K = (
    (1.53512485958697, -2.69169618940638, 1.19839281085285),
    (1.0, -1.69065929318241, 0.73248077421585),
)
BS1770_STAGE2_48K = ((1.0, -2.0, 1.0), (1.0, -1.99004745483398, 0.99007225036621))
_SHELF_F0, _SHELF_GAIN_DB, _SHELF_Q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
_SHELF_VB_EXPONENT = 0.4996667741545416
_HIGHPASS_F0, _HIGHPASS_Q = 38.13547087602444, 0.5003270373238773
#: Channel weights G_i of BS.1770 (L, R, C, Ls, Rs); LFE is not part of 5-channel input here.
_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)
BLOCK_SECONDS = 0.4
BLOCK_STEP_SECONDS = 0.1
ABSOLUTE_GATE_LKFS = -70.0
RELATIVE_GATE_LU = -10.0


def k_weighting(rate: int) -> tuple[tuple[list[float], list[float]], tuple[list[float], list[float]]]:
    """(b, a) of the two K-weighting biquads at ``rate`` Hz."""
    k = math.tan(math.pi * _SHELF_F0 / rate)
    vh = 10.0 ** (_SHELF_GAIN_DB / 20.0)
    vb = vh**_SHELF_VB_EXPONENT
    a0 = 1.0 + k / _SHELF_Q + k * k
    shelf = (
        [
            (vh + vb * k / _SHELF_Q + k * k) / a0,
            2.0 * (k * k - vh) / a0,
            (vh - vb * k / _SHELF_Q + k * k) / a0,
        ],
        [1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / _SHELF_Q + k * k) / a0],
    )
    k = math.tan(math.pi * _HIGHPASS_F0 / rate)
    a0 = 1.0 + k / _HIGHPASS_Q + k * k
    highpass = ([1.0, -2.0, 1.0], [1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / _HIGHPASS_Q + k * k) / a0])
    return shelf, highpass


def integrated_loudness(samples: FloatArray, rate: int) -> float | None:
    """BS.1770-4 integrated loudness (LUFS) of ``samples`` ``[C, T]``; None when every block is
    under the absolute gate (silence). A clip shorter than one 400 ms block is one block."""
    from scipy.signal import lfilter

    data = np.atleast_2d(samples).astype(np.float64, copy=False)
    (b1, a1), (b2, a2) = k_weighting(rate)
    weighted = lfilter(b2, a2, lfilter(b1, a1, data, axis=1), axis=1)
    size = int(round(BLOCK_SECONDS * rate))
    step = int(round(BLOCK_STEP_SECONDS * rate))
    squares = np.square(weighted)
    if squares.shape[1] <= size:
        powers = squares.mean(axis=1, keepdims=True)
    else:
        cumulative = np.concatenate([np.zeros((data.shape[0], 1)), np.cumsum(squares, axis=1)], axis=1)
        starts = np.arange(0, squares.shape[1] - size + 1, step)
        powers = (cumulative[:, starts + size] - cumulative[:, starts]) / size
    gains = np.array(
        [_CHANNEL_WEIGHTS[i] if i < len(_CHANNEL_WEIGHTS) else 1.0 for i in range(data.shape[0])]
    )
    block_power = (gains[:, None] * powers).sum(axis=0)
    block_loudness = -0.691 + 10.0 * np.log10(np.maximum(block_power, 1e-300))
    above = block_power[block_loudness > ABSOLUTE_GATE_LKFS]
    if above.size == 0:
        return None
    relative_gate = -0.691 + 10.0 * math.log10(float(above.mean())) + RELATIVE_GATE_LU
    gated = block_power[(block_loudness > ABSOLUTE_GATE_LKFS) & (block_loudness > relative_gate)]
    return -0.691 + 10.0 * math.log10(float(gated.mean()))


def limit_peaks(samples: FloatArray, rate: int, ceiling: float) -> FloatArray:
    """Keep every sample within ``±ceiling``: a gain that dips smoothly around each peak (a
    5 ms minimum filter of the needed gain, then a 5 ms moving average: each average spans only
    samples whose minimum covered this one, so the smoothed gain never exceeds the needed gain)."""
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    peak = np.abs(samples).max(axis=0) if samples.ndim == 2 else np.abs(samples)
    needed = np.minimum(1.0, ceiling / np.maximum(peak, 1e-12))
    if float(needed.min()) >= 1.0:
        return samples
    half = max(1, int(0.005 * rate))
    held = minimum_filter1d(needed, size=2 * half + 1, mode="nearest")
    smooth = np.minimum(uniform_filter1d(held, size=2 * half + 1, mode="nearest"), held)
    limited: FloatArray = np.clip(samples * smooth.astype(np.float32), -ceiling, ceiling).astype(np.float32)
    return limited


def normalize_loudness(samples: FloatArray, rate: int, target_lufs: float, ceiling_dbfs: float) -> FloatArray:
    """``samples`` at ``target_lufs`` integrated loudness with peaks limited to ``ceiling_dbfs``;
    the gain is re-measured after limiting (a few passes) so the limiter's loss is made up
    where the ceiling allows. Silence (no block above the absolute gate) is returned as is."""
    ceiling = 10.0 ** (ceiling_dbfs / 20.0)
    out = samples
    for _ in range(4):
        loudness = integrated_loudness(out, rate)
        if loudness is None or abs(loudness - target_lufs) < 0.05:
            break
        gain = 10.0 ** ((target_lufs - loudness) / 20.0)
        out = limit_peaks((out * gain).astype(np.float32), rate, ceiling)
    return np.ascontiguousarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- processing


def processing_fingerprint(curation: CurationSpec | None) -> dict[str, Any]:
    """The settings of :func:`process_audio` that change the audio (part of the code cache key);
    empty when the audio is tokenized as decoded."""
    if curation is None:
        return {}
    out: dict[str, Any] = {}
    if curation.silence.action is SilenceAction.trim:
        out["trimSilenceDb"] = curation.silence.threshold_db
    if curation.loudness is not None:
        out["loudness"] = {
            "targetLufs": curation.loudness.target_lufs,
            "peakCeilingDbfs": curation.loudness.peak_ceiling_dbfs,
        }
    if out:
        out["version"] = PROCESSING_VERSION
    return out


def process_audio(samples: FloatArray, rate: int, curation: CurationSpec | None) -> FloatArray:
    """The decoded clip ``[C, T]`` as it is tokenized: silence trimmed at both ends, then
    loudness-normalised (see the module docstring). Unchanged without such settings."""
    if curation is None:
        return samples
    out = samples
    if curation.silence.action is SilenceAction.trim:
        out = trim_silence(out, rate, curation.silence.threshold_db)
    if curation.loudness is not None:
        out = normalize_loudness(
            out, rate, curation.loudness.target_lufs, curation.loudness.peak_ceiling_dbfs
        )
    return out


def audio_processor(
    curation: CurationSpec | None,
) -> Callable[[FloatArray, int], tuple[FloatArray, int]] | None:
    """:func:`process_audio` in the form :class:`~fermata_trainer.codes_cache.CodesCache` takes
    (``process``, next to ``processing=processing_fingerprint(...)``); None when it would do nothing."""
    if not processing_fingerprint(curation):
        return None

    def process(samples: FloatArray, rate: int) -> tuple[FloatArray, int]:
        return process_audio(samples, rate, curation), rate

    return process


# ----------------------------------------------------------------------------- groups and mix


def mix_group(entry: Mapping[str, Any], mix: MixSpec | None) -> str | None:
    """The group of a manifest entry under ``mix`` (the text of its ``mix.by`` field), or None."""
    if mix is None:
        return None
    value = entry.get(mix.by)
    if value is None or isinstance(value, dict | list):
        return None
    return str(value).strip() or None


def group_weights(spec: DatasetSpec) -> dict[str, float] | None:
    """Each group's share (summing to 1), or None when the dataset is not weighted."""
    if spec.mix is not None:
        weights = dict(spec.mix.weights)
    elif spec.sources and all(s.weight is not None for s in spec.sources):
        weights = {s.name: float(s.weight or 0.0) for s in spec.sources}
    else:
        return None
    total = sum(weights.values())
    return {g: w / total for g, w in weights.items()}


def _mix_order(clip_id: str) -> float:
    digest = hashlib.sha256(f"fermata-mix:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def balance(
    seconds: Mapping[str, float], groups: Mapping[str, str], shares: Mapping[str, float]
) -> tuple[set[str], dict[str, float]]:
    """Down-sample ``seconds`` (clip id → length) so each group's total follows ``shares``:
    the clips kept and each group's quota in seconds. The group scarcest relative to its share
    keeps every clip; the others keep clips in :func:`_mix_order` while their total stays
    within half a clip of the quota (every group with clips keeps at least one)."""
    totals: dict[str, float] = defaultdict(float)
    for clip, length in seconds.items():
        totals[groups[clip]] += length
    present = [g for g in shares if totals.get(g, 0.0) > 0]
    if not present:
        return set(), {}
    scale = sum(shares[g] for g in present)
    whole = min(totals[g] / (shares[g] / scale) for g in present)
    quotas = {g: whole * shares[g] / scale for g in present}
    kept: set[str] = set()
    used: dict[str, float] = defaultdict(float)
    for clip in sorted(seconds, key=_mix_order):
        group, length = groups[clip], seconds[clip]
        if group not in quotas:
            continue
        if used[group] == 0.0 or used[group] + length / 2 <= quotas[group] + 1e-9:
            kept.add(clip)
            used[group] += length
    return kept, quotas


# ----------------------------------------------------------------------------- curate


@dataclass
class Curated(Generic[CheckT]):
    """What :func:`curate` decided: the kept checks (in order), the skipped ones as
    ``(id, audio, reason)``, each kept clip's split, group and estimated tempo/key, and the
    ``curation`` section of the dataset report."""

    kept: list[CheckT]
    skipped: list[tuple[str, str, str]]
    splits: dict[str, str]
    groups: dict[str, str] = field(default_factory=dict)
    bpm: dict[str, float] = field(default_factory=dict)
    key: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def _dedupe(checks: Sequence[CheckT]) -> tuple[list[CheckT], list[tuple[str, str, str]]]:
    first: dict[str, str] = {}
    kept: list[CheckT] = []
    skipped: list[tuple[str, str, str]] = []
    for check in checks:
        owner = first.setdefault(check.sha256, check.candidate.id)
        if owner != check.candidate.id:
            skipped.append(
                (check.candidate.id, check.candidate.audio, f"duplicate audio: same sha256 as clip {owner}")
            )
        else:
            kept.append(check)
    return kept, skipped


def _measure_all(
    checks: Sequence[CheckT], curation: CurationSpec, path_of: Callable[[str], Path]
) -> list[Measured | str]:
    def one(check: CheckT) -> Measured | str:
        try:
            return measure(check, curation, path_of)
        except UnreadableAudioError as exc:
            return f"unreadable audio: {exc}"

    if len(checks) <= 4:
        return [one(c) for c in checks]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, checks))


def _group_of(candidate: CandidateLike, spec: DatasetSpec, shares: Mapping[str, float] | None) -> str:
    """The clip's group, or a ``not in mix`` reason prefixed with ``!``."""
    group = candidate.group
    if spec.mix is not None and group is None:
        return f"!not in mix: the entry has no {spec.mix.by!r} field"
    if shares is not None and group is not None and group not in shares:
        return f"!not in mix: {spec.mix.by if spec.mix else 'source'} {group!r} has no weight"
    return group or ""


def curate(
    spec: DatasetSpec,
    checks: Sequence[CheckT],
    path_of: Callable[[str], Path],
    split: Callable[[Sequence[str]], dict[str, str]],
) -> Curated[CheckT]:
    """Apply the filters, the mix and the stratified split to the checked files.

    ``path_of`` gives a clip's local file (decoded again only for estimation or silence);
    ``split`` is the deterministic by-id split, applied within each group."""
    curation = spec.curation
    shares = group_weights(spec)
    unique, skipped = _dedupe(checks) if curation.dedupe else (list(checks), [])
    result: Curated[CheckT] = Curated([], skipped, {})
    checks_in: list[CheckT] = []
    for check in unique:  # the group first: no decode for what the mix leaves out
        group = _group_of(check.candidate, spec, shares)
        if group.startswith("!"):
            skipped.append((check.candidate.id, check.candidate.audio, group[1:]))
        else:
            result.groups[check.candidate.id] = group
            checks_in.append(check)
    measured = _measure_all(checks_in, curation, path_of)
    passed: list[CheckT] = []
    for check, facts in zip(checks_in, measured, strict=True):
        cand = check.candidate
        reason = facts if isinstance(facts, str) else judge(facts, curation)
        if reason is not None:
            skipped.append((cand.id, cand.audio, reason))
            del result.groups[cand.id]
            continue
        passed.append(check)
        if isinstance(facts, Measured):
            if facts.bpm_from == "estimated" and facts.bpm is not None:
                result.bpm[cand.id] = facts.bpm
            if facts.key_from == "estimated" and facts.key is not None:
                result.key[cand.id] = facts.key
    result.splits = _stratified_split(passed, result.groups, split)
    kept_ids = _apply_mix(passed, result, shares, spec)
    result.kept = [c for c in passed if c.candidate.id in kept_ids]
    result.splits = {i: s for i, s in result.splits.items() if i in kept_ids}
    result.report.update(
        estimated={"bpm": len(result.bpm), "key": len(result.key)},
        processing=processing_fingerprint(curation),
    )
    log.info(
        "dataset_curated",
        checked=len(checks),
        kept=len(result.kept),
        skipped=dict(Counter(reason.split(":")[0] for _, _, reason in result.skipped)),
        estimated_bpm=len(result.bpm),
        estimated_key=len(result.key),
        mix=result.report.get("mix", {}).get("weights"),
    )
    return result


def _stratified_split(
    checks: Sequence[CheckedLike], groups: Mapping[str, str], split: Callable[[Sequence[str]], dict[str, str]]
) -> dict[str, str]:
    by_group: dict[str, list[str]] = defaultdict(list)
    for check in checks:
        by_group[groups[check.candidate.id]].append(check.candidate.id)
    out: dict[str, str] = {}
    for ids in by_group.values():
        out.update(split(ids))
    return out


def _apply_mix(
    checks: Sequence[CheckT], result: Curated[CheckT], shares: Mapping[str, float] | None, spec: DatasetSpec
) -> set[str]:
    """Balance each split to ``shares``; record the mix in the report; the ids kept."""
    ids = {c.candidate.id for c in checks}
    seconds = {c.candidate.id: max(c.duration, 1e-3) for c in checks}
    if not ids:
        return ids
    if shares is None:
        if spec.sources:
            result.report["groups"] = _group_summary(ids, seconds, result)
        return ids
    kept: set[str] = set()
    quotas: dict[str, dict[str, float]] = {}
    for name in sorted(set(result.splits.values())):
        part = {i: seconds[i] for i in ids if result.splits[i] == name}
        chosen, quotas[name] = balance(part, result.groups, shares)
        kept |= chosen
    train = {g for i in kept if result.splits[i] == "train" for g in [result.groups[i]]}
    empty = sorted(g for g in shares if g not in train)
    if empty:
        counts = Counter(result.groups[i] for i in ids)
        raise CurationError(
            f"the dataset mix cannot be met: no training clip left in {empty} after filtering "
            f"(clips per group: {dict(sorted(counts.items()))}); add audio to those groups or "
            f"drop them from the weights"
        )
    audio = {c.candidate.id: c.candidate.audio for c in checks}
    for i in sorted(ids - kept):
        share = shares[result.groups[i]]
        result.skipped.append(
            (i, audio[i], f"{MIX_BALANCE}: {result.groups[i]!r} over its {share:.0%} share")
        )
    result.report["mix"] = {
        "by": spec.mix.by if spec.mix is not None else "source",
        "unit": "seconds",
        "weights": {g: round(s, 6) for g, s in shares.items()},
        "groups": _group_summary(kept, seconds, result),
    }
    return kept


def _group_summary(ids: set[str], seconds: Mapping[str, float], result: Curated[Any]) -> dict[str, Any]:
    """Per group: clips and seconds per split, and the group's share of each split's seconds."""
    totals: dict[str, float] = defaultdict(float)
    for i in ids:
        totals[result.splits[i]] += seconds[i]
    summary: dict[str, Any] = {}
    for group in sorted({result.groups[i] for i in ids}):
        row: dict[str, Any] = {}
        for name in sorted(totals):
            mine = [i for i in ids if result.groups[i] == group and result.splits[i] == name]
            secs = sum(seconds[i] for i in mine)
            row[name] = {
                "clips": len(mine),
                "seconds": round(secs, 3),
                "share": round(secs / totals[name], 4) if totals[name] else 0.0,
            }
        summary[group] = row
    return summary
