"""Authenticity: a deterministic, offline score of how much generated clips sound like the genre.

No models and no downloads: plain numpy + scipy signal processing on the waveform, so the score is
cheap (a few milliseconds per second of audio), reproducible bit for bit on the same machine and
meaningful from the first evaluation. It stands in for a listening test during fine-tuning; it is
not a music-quality metric. The default traits are amapiano's (105-118 BPM, log drums).

Pipeline
========
Every clip (mono, or multichannel averaged to mono; ``(channels, samples)`` or ``(samples,
channels)`` — the shorter axis is the channel axis) is

1. **validated** — empty, non-finite (NaN/inf), shorter than :data:`MIN_SECONDS`, silent (peak
   below :data:`SILENCE_PEAK`) or an unsupported shape makes the clip *invalid*: it scores 0 with
   a ``reason`` and never raises;
2. **resampled** to :data:`ANALYSIS_SR` (16 kHz, polyphase, so every input rate is analysed the
   same way) and peak-normalised (level-invariant);
3. turned into a magnitude STFT (Hann, :data:`N_FFT` = 1024 = 64 ms, hop :data:`HOP` = 256 =
   16 ms, i.e. 62.5 frames/s).

Components (each in [0, 1])
===========================
**tempo** ``T`` — onset envelope ``o(t)`` = half-wave rectified spectral flux of
``log1p(100·|X|/max|X|)`` summed over 0-8 kHz, minus its 0.5 s moving average. Its
autocorrelation ``r`` (normalised, ``r(0) = 1``) is read at fractional lags; for every candidate
tempo ``b`` in 50-220 BPM (0.5 BPM grid, lag ``L = 60·fps/b``)::

    comb(b)  = mean_{k=1..4} r(k·L)
    tempo    = argmax_b comb(b) · exp(-0.5·(log2(b/120)/1.0)²)   # mild prior vs octave errors
    clarity  = clip((comb(tempo) - 0.10) / (0.40 - 0.10), 0, 1)    # 0 for noise / drones
    band(b)  = 1 if bpm_min <= b <= bpm_max
               else exp(-0.5·(Δ/6)²), Δ = BPM distance to the nearest band edge
    T        = clarity · max(band(tempo), 0.5·band(tempo/2), 0.5·band(2·tempo))

(half credit when only the half- or double-time reading is inside the band).

**log_drum** ``L`` — pulsed low-frequency energy, an onset-synchronous measure of log-drum-like
content: ``e(t)`` = STFT power in 20-150 Hz, its floor ``f(t)`` = running 20th percentile over
1 s, ``p(t) = max(e(t) - f(t), 0)`` (energy that arrives in hits, not as a drone)::

    share = Σ_t p(t) / Σ_t E_total(t)          # pulsed sub-150 Hz share of all energy
    L     = 1 - exp(-share / 0.10)

**distribution** ``D`` — every valid clip is cut into 1 s segments (0.5 s hop; segments quieter
than -60 dB RMS are left out) and each segment becomes a 5-dim feature vector
(:data:`FEATURE_NAMES`): log2 spectral centroid, sub-150 Hz energy ratio in dB, spectral flatness
in dB, onset rate (onsets/s) and pulsed share of the sub-150 Hz energy. The reference profile
stores the reference segments' mean ``μ_r`` and standard deviation ``σ_r`` (floored per feature
by :data:`FEATURE_STD_FLOOR`, so a homogeneous reference does not blow distances up) and the
covariance ``Σ_r`` of the standardised features ``z = (x - μ_r)/σ_r``. Generated segments are
standardised the same way and::

    Σ'   = 0.9·Σ + 0.1·diag(Σ) + 1e-3·I                     # shrinkage, for few segments
    FD   = |μ_g - μ_r|² + Tr(Σ'_g + Σ'_r - 2·(Σ'_g Σ'_r)^½)  # Fréchet distance (squared form)
    D    = exp(-FD / 10)

Combination
===========
For ``N`` generated clips, of which ``V`` are valid (invalid clips count as 0)::

    T̄ = (1/N)·Σ_i T_i        L̄ = (1/N)·Σ_i L_i
    D̄ = (V/N)·exp(-FD(all valid segments pooled, reference) / 10)
    score = 0.30·T̄ + 0.30·L̄ + 0.40·D̄                       # weights sum to 1

Each clip also gets its own ``score_i = 0.30·T_i + 0.30·L_i + 0.40·exp(-FD(clip i)/10)``.
``AuthenticityResult.components`` holds ``tempo``, ``log_drum``, ``distribution`` (the three
terms above, in [0, 1]) and raw evidence: ``tempo_bpm`` (median over valid clips),
``pulse_clarity``, ``low_band_ratio_100hz``, ``low_band_ratio_150hz``, ``low_pulsed_share``,
``frechet_distance`` (absent when no clip is valid) and ``valid_fraction`` (set-level evidence
is the mean over valid clips unless stated); each :class:`ClipResult` carries the same evidence
for its clip (no ``valid_fraction``) plus ``low_pulsed_fraction`` (pulsed share of the sub-150 Hz
energy alone). With no valid clip at all the score is 0 and ``reason`` says why; ``reason`` also
lists the invalid clips of a partly valid set.

Limitations
===========
The constants (clarity thresholds, 0.10 log-drum scale, distance scale 10, weights) were set on
synthetic audio (``tests/trainer/test_authenticity.py``), not tuned against listeners. Any pulsed
sub-150 Hz energy counts as log-drum-like, kick drums included; the distribution term, measured
against real reference clips, is what separates the genre from other bass-heavy music.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field
from scipy.signal import resample_poly

FloatArray = npt.NDArray[np.float64]

#: Internal analysis rate; every clip is resampled to it first.
ANALYSIS_SR = 16_000
N_FFT = 1024
HOP = 256
FPS = ANALYSIS_SR / HOP
#: Highest frequency used by spectral features (hi-hats and air above it add little).
MAX_HZ = 8_000.0
#: Clips shorter than this are invalid (fewer than ~4 beats of a 110 BPM groove).
MIN_SECONDS = 2.0
#: A clip whose peak is below this (-80 dBFS) is silent.
SILENCE_PEAK = 1e-4
#: Segments quieter than this RMS after peak normalisation (-60 dB) are not described.
SEGMENT_MIN_RMS = 1e-3

TEMPO_MIN_BPM = 50.0
TEMPO_MAX_BPM = 220.0
TEMPO_STEP_BPM = 0.5
TEMPO_PRIOR_BPM = 120.0
TEMPO_PRIOR_OCTAVES = 1.0
TEMPO_COMB = 4
CLARITY_LO = 0.10
CLARITY_HI = 0.40
#: Standard deviation (BPM) of the Gaussian falloff outside the BPM band.
BAND_FALLOFF_BPM = 6.0

LOW_LO_HZ = 20.0
LOW_HI_HZ = 150.0
SUB_HI_HZ = 100.0
FLOOR_WINDOW_S = 1.0
FLOOR_PERCENTILE = 20.0
LOG_DRUM_SCALE = 0.10

SEGMENT_S = 1.0
SEGMENT_HOP_S = 0.5
FEATURE_NAMES: tuple[str, ...] = (
    "log2_centroid_hz",
    "low_ratio_db",
    "flatness_db",
    "onset_rate_hz",
    "low_pulsed_fraction",
)
#: Floors for the reference standard deviations, in each feature's own unit.
FEATURE_STD_FLOOR: tuple[float, ...] = (0.1, 1.5, 1.0, 0.5, 0.03)
SHRINKAGE = 0.1
COV_EPS = 1e-3
DISTANCE_SCALE = 10.0

WEIGHT_TEMPO = 0.30
WEIGHT_LOG_DRUM = 0.30
WEIGHT_DISTRIBUTION = 0.40

_EPS = 1e-12


class ReferenceProfile(BaseModel):
    """Feature statistics of the reference clips (JSON-serialisable: ``model_dump_json()``)."""

    schema_version: int = 1
    analysis_sample_rate: int = ANALYSIS_SR
    bpm_min: float = Field(gt=0)
    bpm_max: float = Field(gt=0)
    feature_names: list[str]
    #: Mean of the raw reference segment features.
    feature_mean: list[float]
    #: Standard deviation of the raw reference segment features (floored).
    feature_std: list[float]
    #: Covariance of the standardised reference segment features (before shrinkage).
    covariance: list[list[float]]
    n_clips: int
    n_valid_clips: int
    n_segments: int
    #: Median per-clip evidence over the reference clips (tempo_bpm, log_drum, ...).
    summary: dict[str, float] = Field(default_factory=dict)
    #: Why some reference clips were skipped (index: reason).
    skipped: dict[int, str] = Field(default_factory=dict)


class ClipResult(BaseModel):
    """The score of one generated clip and the evidence it rests on."""

    index: int
    valid: bool
    score: float = Field(ge=0, le=1)
    components: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None


class AuthenticityResult(BaseModel):
    """The score of a set of generated clips: ``score`` in [0, 1], see the module docstring."""

    score: float = Field(ge=0, le=1)
    components: dict[str, float]
    clips: list[ClipResult]
    reason: str | None = None


class InvalidClipError(ValueError):
    """A clip that cannot be analysed (silent, too short, non-finite...)."""


@dataclass(frozen=True)
class _Analysis:
    """Everything the scorer derives from one valid clip."""

    tempo_bpm: float
    clarity: float
    low_ratio_100: float
    low_ratio_150: float
    low_pulsed_share: float
    low_pulsed_fraction: float
    segments: FloatArray  # (n_segments, n_features)


# --------------------------------------------------------------------------------------------
# Analysis of one clip


def _to_mono(clip: Any, sample_rate: int) -> FloatArray:
    """Validated mono float64 waveform at :data:`ANALYSIS_SR`, peak-normalised."""
    if sample_rate <= 0:
        raise InvalidClipError(f"bad sample rate {sample_rate}")
    x = np.asarray(clip)
    if x.dtype.kind not in "fiu":
        raise InvalidClipError(f"unsupported dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if x.ndim == 2:
        channel_axis = 0 if x.shape[0] <= x.shape[1] else 1
        x = x.mean(axis=channel_axis)
    elif x.ndim != 1:
        raise InvalidClipError(f"unsupported shape {tuple(x.shape)}")
    if x.size == 0:
        raise InvalidClipError("empty clip")
    if not np.all(np.isfinite(x)):
        raise InvalidClipError("non-finite samples (NaN/inf)")
    seconds = x.size / sample_rate
    if seconds < MIN_SECONDS:
        raise InvalidClipError(f"too short: {seconds:.2f} s < {MIN_SECONDS:.1f} s")
    x = x - x.mean()
    peak = float(np.max(np.abs(x)))
    if peak < SILENCE_PEAK:
        raise InvalidClipError(f"silent (peak {peak:.2e} < {SILENCE_PEAK:.0e})")
    if sample_rate != ANALYSIS_SR:
        g = math.gcd(int(sample_rate), ANALYSIS_SR)
        x = resample_poly(x, ANALYSIS_SR // g, int(sample_rate) // g).astype(np.float64)
    peak = float(np.max(np.abs(x)))
    if peak < SILENCE_PEAK:
        raise InvalidClipError("silent after resampling (all energy above 8 kHz)")
    out: FloatArray = x / peak
    return out


def _power_spectrogram(x: FloatArray) -> FloatArray:
    """(frames, bins) power STFT up to :data:`MAX_HZ`."""
    if x.size < N_FFT:
        x = np.pad(x, (0, N_FFT - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]
    window = np.hanning(N_FFT + 1)[:-1]
    spec = np.fft.rfft(frames * window, axis=1)
    n_bins = int(MAX_HZ * N_FFT / ANALYSIS_SR) + 1
    power: FloatArray = (spec.real**2 + spec.imag**2)[:, :n_bins]
    return power


def _moving_average(x: FloatArray, width: int) -> FloatArray:
    width = max(1, min(width, x.size))
    kernel = np.full(width, 1.0 / width)
    padded = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    out: FloatArray = np.convolve(padded, kernel, mode="valid")
    return out


def _running_percentile(x: FloatArray, width: int, q: float) -> FloatArray:
    width = max(1, min(width, x.size))
    padded = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    out: FloatArray = np.percentile(windows, q, axis=1)
    return out


def _onset_envelope(power: FloatArray) -> FloatArray:
    mag = np.sqrt(power)
    log_mag = np.log1p(100.0 * mag / (mag.max() + _EPS))
    flux = np.maximum(np.diff(log_mag, axis=0), 0.0).sum(axis=1)
    env: FloatArray = np.concatenate([[0.0], flux])
    return env


def _interp(r: FloatArray, lag: float) -> float:
    i = int(math.floor(lag))
    if i + 1 >= r.size:
        return 0.0
    frac = lag - i
    return float((1.0 - frac) * r[i] + frac * r[i + 1])


def _estimate_tempo(env: FloatArray) -> tuple[float, float]:
    """(tempo in BPM, comb autocorrelation at that tempo) from an onset envelope."""
    o = env - _moving_average(env, int(round(0.5 * FPS)))
    o = o - o.mean()
    energy = float(np.dot(o, o))
    if energy <= _EPS * max(1.0, float(np.dot(env, env))):
        return 0.0, 0.0
    n = o.size
    spec = np.fft.rfft(o, 2 * n)
    r = np.fft.irfft(spec.real**2 + spec.imag**2)[:n]
    r = r / r[0]
    best_bpm, best_val, best_comb = 0.0, -math.inf, 0.0
    for bpm in np.arange(TEMPO_MIN_BPM, TEMPO_MAX_BPM + TEMPO_STEP_BPM / 2, TEMPO_STEP_BPM):
        lag = 60.0 * FPS / float(bpm)
        if lag * TEMPO_COMB >= n - 1:
            continue
        comb = sum(_interp(r, k * lag) for k in range(1, TEMPO_COMB + 1)) / TEMPO_COMB
        prior = math.exp(-0.5 * (math.log2(float(bpm) / TEMPO_PRIOR_BPM) / TEMPO_PRIOR_OCTAVES) ** 2)
        value = comb * prior
        if value > best_val:
            best_bpm, best_val, best_comb = float(bpm), value, comb
    if best_comb <= 0.0:  # no periodicity at all: no tempo to report
        return 0.0, 0.0
    return best_bpm, best_comb


def _pick_onsets(env: FloatArray) -> npt.NDArray[np.bool_]:
    """Frames that are onsets: local maxima (±50 ms) above an adaptive threshold."""
    radius = max(1, int(round(0.05 * FPS)))
    padded = np.pad(env, radius, mode="constant", constant_values=-np.inf)
    local_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1).max(axis=1)
    threshold = _moving_average(env, int(round(1.0 * FPS))) + 0.5 * float(env.std())
    floor = 0.05 * float(env.max()) if env.size else 0.0
    peaks: npt.NDArray[np.bool_] = (env >= local_max) & (env > threshold) & (env > floor)
    return peaks


def _analyse(clip: Any, sample_rate: int) -> _Analysis:
    x = _to_mono(clip, sample_rate)
    power = _power_spectrogram(x)
    n_frames = power.shape[0]
    freqs = np.arange(power.shape[1]) * ANALYSIS_SR / N_FFT
    low = (freqs > LOW_LO_HZ) & (freqs <= LOW_HI_HZ)
    sub = (freqs > LOW_LO_HZ) & (freqs <= SUB_HI_HZ)
    total_t = power.sum(axis=1)
    low_t = power[:, low].sum(axis=1)
    total = float(total_t.sum()) + _EPS

    env = _onset_envelope(power)
    tempo_bpm, comb = _estimate_tempo(env)

    floor = _running_percentile(low_t, int(round(FLOOR_WINDOW_S * FPS)), FLOOR_PERCENTILE)
    pulsed_t = np.maximum(low_t - floor, 0.0)

    onsets = _pick_onsets(env)
    seg_len = int(round(SEGMENT_S * FPS))
    seg_hop = int(round(SEGMENT_HOP_S * FPS))
    rows: list[list[float]] = []
    starts = range(0, max(1, n_frames - seg_len + 1), seg_hop)
    for s in starts:
        e = slice(s, min(n_frames, s + seg_len))
        seg_power = power[e]
        seg_total = float(seg_power.sum())
        samples = x[e.start * HOP : (e.stop - 1) * HOP + N_FFT]
        if float(np.sqrt(np.mean(samples**2))) < SEGMENT_MIN_RMS or seg_total <= _EPS:
            continue
        spectrum = seg_power.sum(axis=0)
        centroid = float(np.dot(spectrum, freqs) / (spectrum.sum() + _EPS))
        low_ratio = float(low_t[e].sum()) / seg_total
        frame_power = seg_power + _EPS
        flat = np.exp(np.mean(np.log(frame_power), axis=1)) / np.mean(frame_power, axis=1)
        flatness_db = float(np.mean(10.0 * np.log10(flat + _EPS)))
        onset_rate = float(onsets[e].sum()) / ((e.stop - e.start) / FPS)
        low_sum = float(low_t[e].sum())
        pulsed_fraction = float(pulsed_t[e].sum()) / low_sum if low_sum > _EPS else 0.0
        rows.append(
            [
                math.log2(max(centroid, 1.0)),
                max(10.0 * math.log10(low_ratio + _EPS), -60.0),
                max(flatness_db, -60.0),
                onset_rate,
                pulsed_fraction,
            ]
        )
    if not rows:
        raise InvalidClipError("no audible segment (everything below -60 dB of the peak)")
    segments = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(segments)):
        raise InvalidClipError("non-finite features")

    low_sum_all = float(low_t.sum())
    return _Analysis(
        tempo_bpm=tempo_bpm,
        clarity=float(np.clip((comb - CLARITY_LO) / (CLARITY_HI - CLARITY_LO), 0.0, 1.0)),
        low_ratio_100=float(power[:, sub].sum()) / total,
        low_ratio_150=low_sum_all / total,
        low_pulsed_share=float(pulsed_t.sum()) / total,
        low_pulsed_fraction=float(pulsed_t.sum()) / low_sum_all if low_sum_all > _EPS else 0.0,
        segments=segments,
    )


# --------------------------------------------------------------------------------------------
# Components


def band_score(bpm: float, bpm_min: float, bpm_max: float) -> float:
    """1 inside [bpm_min, bpm_max], Gaussian falloff (σ = 6 BPM) outside; 0 for bpm <= 0."""
    if bpm <= 0 or not math.isfinite(bpm):
        return 0.0
    lo, hi = min(bpm_min, bpm_max), max(bpm_min, bpm_max)
    delta = lo - bpm if bpm < lo else (bpm - hi if bpm > hi else 0.0)
    return math.exp(-0.5 * (delta / BAND_FALLOFF_BPM) ** 2)


def _tempo_component(a: _Analysis, bpm_min: float, bpm_max: float) -> float:
    t = a.tempo_bpm
    fit = max(
        band_score(t, bpm_min, bpm_max),
        0.5 * band_score(t / 2, bpm_min, bpm_max),
        0.5 * band_score(t * 2, bpm_min, bpm_max),
    )
    return float(np.clip(a.clarity * fit, 0.0, 1.0))


def _log_drum_component(a: _Analysis) -> float:
    return float(np.clip(1.0 - math.exp(-a.low_pulsed_share / LOG_DRUM_SCALE), 0.0, 1.0))


def _shrink(cov: FloatArray) -> FloatArray:
    d = cov.shape[0]
    out: FloatArray = (1.0 - SHRINKAGE) * cov + SHRINKAGE * np.diag(np.diag(cov))
    return out + COV_EPS * np.eye(d)


def _covariance(z: FloatArray) -> FloatArray:
    if z.shape[0] < 2:
        return np.zeros((z.shape[1], z.shape[1]))
    c: FloatArray = np.atleast_2d(np.cov(z, rowvar=False, ddof=1))
    return c


def _sqrt_psd(m: FloatArray) -> FloatArray:
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    out: FloatArray = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    return out


def frechet_distance(
    mu1: npt.ArrayLike, cov1: npt.ArrayLike, mu2: npt.ArrayLike, cov2: npt.ArrayLike
) -> float:
    """Squared-form Fréchet distance between two Gaussians (symmetric, >= 0)."""
    m1, m2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    c1 = np.atleast_2d(np.asarray(cov1, dtype=np.float64))
    c2 = np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    s1 = _sqrt_psd(c1)
    middle = s1 @ c2 @ s1
    eig = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * float(np.sqrt(eig).sum()))
    return max(fd, 0.0)


def _distribution_distance(segments: FloatArray, profile: ReferenceProfile) -> float:
    mean = np.asarray(profile.feature_mean, dtype=np.float64)
    std = np.asarray(profile.feature_std, dtype=np.float64)
    z = (segments - mean) / std
    ref_cov = _shrink(np.asarray(profile.covariance, dtype=np.float64))
    gen_cov = _shrink(_covariance(z))
    return frechet_distance(z.mean(axis=0), gen_cov, np.zeros(mean.size), ref_cov)


def _similarity(fd: float) -> float:
    return float(np.clip(math.exp(-fd / DISTANCE_SCALE), 0.0, 1.0)) if math.isfinite(fd) else 0.0


def _profile_problem(profile: ReferenceProfile) -> str | None:
    d = len(FEATURE_NAMES)
    if list(profile.feature_names) != list(FEATURE_NAMES):
        return f"reference profile features {profile.feature_names} != {list(FEATURE_NAMES)}"
    if profile.analysis_sample_rate != ANALYSIS_SR:
        return f"reference profile analysed at {profile.analysis_sample_rate} Hz, not {ANALYSIS_SR}"
    arrays = [profile.feature_mean, profile.feature_std]
    if any(len(a) != d for a in arrays) or len(profile.covariance) != d:
        return "reference profile has inconsistent dimensions"
    if any(len(row) != d for row in profile.covariance):
        return "reference profile has inconsistent dimensions"
    values = np.asarray([*profile.feature_mean, *profile.feature_std], dtype=np.float64)
    cov = np.asarray(profile.covariance, dtype=np.float64)
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(cov))):
        return "reference profile holds non-finite numbers"
    if np.any(np.asarray(profile.feature_std) <= 0):
        return "reference profile has a non-positive standard deviation"
    return None


# --------------------------------------------------------------------------------------------
# Public API


def build_reference_profile(
    clips: Sequence[npt.ArrayLike],
    sample_rate: int,
    bpm_min: float = 105.0,
    bpm_max: float = 118.0,
) -> ReferenceProfile:
    """Feature statistics of reference clips (e.g. the training subset) for :func:`score_clips`.

    Invalid clips (silent, too short, NaN...) are skipped and listed in ``skipped``; raises
    :class:`ValueError` when no clip is usable, since there is then nothing to compare with.
    """
    if not (math.isfinite(bpm_min) and math.isfinite(bpm_max)) or bpm_min <= 0 or bpm_max <= 0:
        raise ValueError(f"bad BPM band [{bpm_min}, {bpm_max}]")
    analyses: list[_Analysis] = []
    skipped: dict[int, str] = {}
    for i, clip in enumerate(clips):
        try:
            analyses.append(_analyse(clip, sample_rate))
        except InvalidClipError as exc:
            skipped[i] = str(exc)
        except Exception as exc:  # analysis must not take the evaluation down
            skipped[i] = f"analysis failed: {exc!r}"
    if not analyses:
        detail = "; ".join(f"#{i}: {r}" for i, r in skipped.items()) or "no clips given"
        raise ValueError(f"no usable reference clip ({detail})")
    segments = np.concatenate([a.segments for a in analyses], axis=0)
    mean = segments.mean(axis=0)
    std = np.maximum(segments.std(axis=0), np.asarray(FEATURE_STD_FLOOR))
    cov = _covariance((segments - mean) / std)
    lo, hi = min(bpm_min, bpm_max), max(bpm_min, bpm_max)
    summary = {
        "tempo_bpm": float(np.median([a.tempo_bpm for a in analyses])),
        "pulse_clarity": float(np.median([a.clarity for a in analyses])),
        "tempo": float(np.median([_tempo_component(a, lo, hi) for a in analyses])),
        "log_drum": float(np.median([_log_drum_component(a) for a in analyses])),
        "low_band_ratio_100hz": float(np.median([a.low_ratio_100 for a in analyses])),
        "low_band_ratio_150hz": float(np.median([a.low_ratio_150 for a in analyses])),
        "low_pulsed_share": float(np.median([a.low_pulsed_share for a in analyses])),
    }
    return ReferenceProfile(
        bpm_min=lo,
        bpm_max=hi,
        feature_names=list(FEATURE_NAMES),
        feature_mean=[float(v) for v in mean],
        feature_std=[float(v) for v in std],
        covariance=[[float(v) for v in row] for row in cov],
        n_clips=len(clips),
        n_valid_clips=len(analyses),
        n_segments=int(segments.shape[0]),
        summary=summary,
        skipped=skipped,
    )


def score_clips(
    generated: Sequence[npt.ArrayLike], sample_rate: int, profile: ReferenceProfile
) -> AuthenticityResult:
    """Score generated clips against a reference profile (formula in the module docstring).

    Never raises on bad audio: invalid clips score 0 with a ``reason``.
    """
    n = len(generated)
    zero_components = {
        "tempo": 0.0,
        "log_drum": 0.0,
        "distribution": 0.0,
        "tempo_bpm": 0.0,
        "pulse_clarity": 0.0,
        "low_band_ratio_100hz": 0.0,
        "low_band_ratio_150hz": 0.0,
        "low_pulsed_share": 0.0,
        "valid_fraction": 0.0,
    }
    problem = _profile_problem(profile)
    if n == 0 or problem is not None:
        return AuthenticityResult(
            score=0.0, components=zero_components, clips=[], reason=problem or "no clips given"
        )

    clips: list[ClipResult] = []
    analyses: list[_Analysis] = []
    tempo_parts: list[float] = []
    drum_parts: list[float] = []
    for i, clip in enumerate(generated):
        try:
            a = _analyse(clip, sample_rate)
        except InvalidClipError as exc:
            clips.append(ClipResult(index=i, valid=False, score=0.0, reason=str(exc)))
            continue
        except Exception as exc:  # analysis must not take the evaluation down
            reason = f"analysis failed: {exc!r}"
            clips.append(ClipResult(index=i, valid=False, score=0.0, reason=reason))
            continue
        t = _tempo_component(a, profile.bpm_min, profile.bpm_max)
        d = _log_drum_component(a)
        fd = _distribution_distance(a.segments, profile)
        dist = _similarity(fd)
        score = WEIGHT_TEMPO * t + WEIGHT_LOG_DRUM * d + WEIGHT_DISTRIBUTION * dist
        analyses.append(a)
        tempo_parts.append(t)
        drum_parts.append(d)
        clips.append(
            ClipResult(
                index=i,
                valid=True,
                score=float(np.clip(score, 0.0, 1.0)),
                components={
                    "tempo": t,
                    "log_drum": d,
                    "distribution": dist,
                    "tempo_bpm": a.tempo_bpm,
                    "pulse_clarity": a.clarity,
                    "low_band_ratio_100hz": a.low_ratio_100,
                    "low_band_ratio_150hz": a.low_ratio_150,
                    "low_pulsed_share": a.low_pulsed_share,
                    "low_pulsed_fraction": a.low_pulsed_fraction,
                    "frechet_distance": fd,
                },
            )
        )

    if not analyses:
        reasons = "; ".join(f"#{c.index}: {c.reason}" for c in clips)
        return AuthenticityResult(
            score=0.0, components=zero_components, clips=clips, reason=f"no valid clip ({reasons})"
        )

    valid_fraction = len(analyses) / n
    pooled = np.concatenate([a.segments for a in analyses], axis=0)
    fd_all = _distribution_distance(pooled, profile)
    tempo = sum(tempo_parts) / n
    log_drum = sum(drum_parts) / n
    distribution = valid_fraction * _similarity(fd_all)
    score = WEIGHT_TEMPO * tempo + WEIGHT_LOG_DRUM * log_drum + WEIGHT_DISTRIBUTION * distribution
    components = {
        "tempo": float(tempo),
        "log_drum": float(log_drum),
        "distribution": float(distribution),
        "tempo_bpm": float(np.median([a.tempo_bpm for a in analyses])),
        "pulse_clarity": float(np.mean([a.clarity for a in analyses])),
        "low_band_ratio_100hz": float(np.mean([a.low_ratio_100 for a in analyses])),
        "low_band_ratio_150hz": float(np.mean([a.low_ratio_150 for a in analyses])),
        "low_pulsed_share": float(np.mean([a.low_pulsed_share for a in analyses])),
        "frechet_distance": float(fd_all),
        "valid_fraction": float(valid_fraction),
    }
    invalid = [c for c in clips if not c.valid]
    set_reason: str | None = None
    if invalid:
        listed = "; ".join(f"#{c.index}: {c.reason}" for c in invalid)
        set_reason = f"{len(invalid)} of {n} clips invalid: {listed}"
    return AuthenticityResult(
        score=float(np.clip(score, 0.0, 1.0)), components=components, clips=clips, reason=set_reason
    )


__all__ = [
    "FEATURE_NAMES",
    "AuthenticityResult",
    "ClipResult",
    "InvalidClipError",
    "ReferenceProfile",
    "band_score",
    "build_reference_profile",
    "frechet_distance",
    "score_clips",
]
