"""Tempo (BPM) and key estimates of a decoded clip, for describing audio that carries no tags.

Both work on at most the first :data:`ANALYSIS_SECONDS` of the clip, mixed to mono and resampled
to :data:`ANALYSIS_RATE`:

* **tempo** — librosa's onset-strength envelope (hop 256 ≈ 11.6 ms), a global tempo from its
  autocorrelation with librosa's log-normal prior around 120 BPM (keeps 96-128 BPM material off
  its half/double octave), then refined by a least-squares line through the tracked beat times
  (the autocorrelation lag grid alone is ~1-2 BPM coarse). ``None`` when the clip is shorter than
  :data:`MIN_TEMPO_SECONDS`, silent, or its onset envelope has no clear periodicity
  (autocorrelation at the beat lag below :data:`MIN_PULSE_CLARITY`).
  On clean synthetic drum patterns (kick on the beat, hi-hat off-beat; 80-174 BPM; MP3, M4A,
  WAV, FLAC at 32-48 kHz) the error measured at most 0.4 BPM with no octave error; the tests
  assert ±2 BPM.
* **key** — the mean CQT chroma correlated (Pearson) with the 24 rotations of the
  Krumhansl-Kessler major/minor profiles; the best is the key, e.g. ``"A minor"``, ``"F# major"``.
  Computed on the harmonic part (HPSS), so drums do not smear the chroma. ``None`` when the
  chroma is flat (noise, drums alone: contrast below :data:`MIN_CHROMA_CONTRAST`) or matches no
  profile well (best correlation below :data:`MIN_KEY_CORRELATION`). Right for all 24 keys on
  12 s of clean i-iv-V-i / I-IV-V-I chords; a few bars are needed, and on real mixes expect the
  usual confusions (relative major/minor, the dominant), so an embedded key tag wins.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

ANALYSIS_SECONDS = 60.0
ANALYSIS_RATE = 22050
HOP = 256
MIN_TEMPO_SECONDS = 4.0
MIN_PULSE_CLARITY = 0.2
MIN_KEY_CORRELATION = 0.5
MIN_CHROMA_CONTRAST = 0.25
SILENCE_RMS = 1e-4

PITCH_NAMES: tuple[str, ...] = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

# Krumhansl & Kessler (1982) probe-tone profiles, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])

FloatArray = npt.NDArray[np.float32]


def analysis_mono(samples: FloatArray, rate: int) -> FloatArray:
    """The first :data:`ANALYSIS_SECONDS` of ``samples`` ``[C, T]`` as mono at :data:`ANALYSIS_RATE`."""
    import librosa

    head = samples[..., : int(ANALYSIS_SECONDS * rate)]
    mono = head.mean(axis=0) if head.ndim == 2 else head
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != ANALYSIS_RATE:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=ANALYSIS_RATE).astype(np.float32)
    return mono


def _is_silent(mono: FloatArray) -> bool:
    return mono.size == 0 or float(np.sqrt(np.mean(np.square(mono, dtype=np.float64)))) < SILENCE_RMS


def _pulse_clarity(envelope: FloatArray, bpm: float) -> float:
    """Normalised autocorrelation of the (mean-removed) onset envelope at the beat lag."""
    x = envelope.astype(np.float64) - float(envelope.mean())
    energy = float(np.dot(x, x))
    lag = int(round(60.0 * ANALYSIS_RATE / HOP / bpm))
    if energy <= 0.0 or lag <= 0 or lag >= x.size:
        return 0.0
    return float(np.dot(x[:-lag], x[lag:]) / energy)


def _refine_with_beats(envelope: FloatArray, bpm: float) -> float:
    """Tempo from a line fitted through the tracked beat times; ``bpm`` when that disagrees."""
    import librosa

    _, beats = librosa.beat.beat_track(
        onset_envelope=envelope, sr=ANALYSIS_RATE, hop_length=HOP, bpm=bpm, units="time"
    )
    if len(beats) < 8:
        return bpm
    slope = float(np.polyfit(np.arange(len(beats)), np.asarray(beats, dtype=np.float64), 1)[0])
    refined = 60.0 / slope if slope > 0 else bpm
    return refined if abs(refined - bpm) <= 0.04 * bpm else bpm


def tempo_of_mono(mono: FloatArray) -> float | None:
    """Tempo of a clip already reduced by :func:`analysis_mono`."""
    import librosa

    if mono.size < MIN_TEMPO_SECONDS * ANALYSIS_RATE or _is_silent(mono):
        return None
    envelope = librosa.onset.onset_strength(y=mono, sr=ANALYSIS_RATE, hop_length=HOP).astype(np.float32)
    if float(envelope.max(initial=0.0)) <= 0.0:
        return None
    estimate = librosa.feature.tempo(
        onset_envelope=envelope, sr=ANALYSIS_RATE, hop_length=HOP, start_bpm=120.0
    )
    bpm = float(estimate[0])
    if not np.isfinite(bpm) or bpm <= 0 or _pulse_clarity(envelope, bpm) < MIN_PULSE_CLARITY:
        return None
    return round(_refine_with_beats(envelope, bpm), 1)


def key_of_mono(mono: FloatArray) -> str | None:
    """Key of a clip already reduced by :func:`analysis_mono`."""
    import librosa

    if mono.size < ANALYSIS_RATE or _is_silent(mono):
        return None
    harmonic = librosa.effects.harmonic(mono)
    chroma = librosa.feature.chroma_cqt(y=harmonic, sr=ANALYSIS_RATE, hop_length=4096)
    profile = chroma.mean(axis=1).astype(np.float64)
    mean = float(profile.mean())
    if mean <= 0.0 or float(profile.std()) / mean < MIN_CHROMA_CONTRAST:
        return None
    best_name, best_r = None, -1.0
    for tonic in range(12):
        for mode, template in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
            r = float(np.corrcoef(profile, np.roll(template, tonic))[0, 1])
            if r > best_r:
                best_name, best_r = f"{PITCH_NAMES[tonic]} {mode}", r
    return best_name if best_r >= MIN_KEY_CORRELATION else None


def estimate_tempo(samples: FloatArray, rate: int) -> float | None:
    """Tempo in BPM (one decimal) of ``samples`` ``[C, T]`` at ``rate``, or ``None``."""
    return tempo_of_mono(analysis_mono(samples, rate))


def estimate_key(samples: FloatArray, rate: int) -> str | None:
    """Key of ``samples`` ``[C, T]`` at ``rate`` such as ``"A minor"``, or ``None``."""
    return key_of_mono(analysis_mono(samples, rate))
