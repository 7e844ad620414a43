"""The authenticity scorer on synthetic audio made here (no files, no models, no downloads).

"Target" clips carry amapiano's traits: a ~112 BPM groove with sub-100 Hz decaying-sine log-drum
hits, a soft kick on the beat, piano-like chords and a quiet shaker. The others lack them: 140 BPM
hi-hat clicks only, white noise, a sustained 1 kHz tone, silence.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import numpy.typing as npt
import pytest
from scipy.signal import resample_poly

from fermata_trainer.authenticity import (
    FEATURE_NAMES,
    AuthenticityResult,
    ReferenceProfile,
    band_score,
    build_reference_profile,
    frechet_distance,
    score_clips,
)

SR = 32_000
SECONDS = 8.0
Audio = npt.NDArray[np.float64]


def _timeline(seconds: float = SECONDS) -> Audio:
    return np.arange(int(seconds * SR)) / SR


def _add(out: Audio, start_s: float, sound: Audio) -> None:
    i = int(round(start_s * SR))
    if i >= out.size:
        return
    n = min(sound.size, out.size - i)
    out[i : i + n] += sound[:n]


def _log_drum(f0: float, rng: np.random.Generator) -> Audio:
    """A decaying, slightly gliding sub-100 Hz sine with a short attack: log-drum-like."""
    t = np.arange(int(0.45 * SR)) / SR
    f = f0 * (1.0 + 0.15 * np.exp(-t / 0.03))
    phase = 2 * np.pi * np.cumsum(f) / SR + rng.uniform(0, 0.1)
    env = np.exp(-t / 0.16) * np.minimum(1.0, t / 0.003)
    sound: Audio = 0.8 * env * np.sin(phase)
    return sound


def _kick() -> Audio:
    t = np.arange(int(0.15 * SR)) / SR
    f = 50.0 * (1.0 + 2.0 * np.exp(-t / 0.01))
    sound: Audio = 0.4 * np.exp(-t / 0.05) * np.sin(2 * np.pi * np.cumsum(f) / SR)
    return sound


def _piano(freqs: list[float]) -> Audio:
    """Piano-like chord: harmonic partials with a fast attack and a slow decay."""
    t = np.arange(int(0.6 * SR)) / SR
    out = np.zeros_like(t)
    for f in freqs:
        for k in range(1, 6):
            if f * k < SR / 2:
                out += (0.5**k) * np.exp(-t * (2.0 + k)) * np.sin(2 * np.pi * f * k * t)
    sound: Audio = 0.12 * out * np.minimum(1.0, t / 0.005)
    return sound


def _click(rng: np.random.Generator, amp: float, tau: float) -> Audio:
    n = int(0.06 * SR)
    noise = np.diff(rng.standard_normal(n + 1))  # high-passed noise burst
    sound: Audio = amp * noise * np.exp(-np.arange(n) / SR / tau)
    return sound


def amapiano_like(seed: int, bpm: float | None = None, seconds: float = SECONDS) -> Audio:
    """The target traits: ~112 BPM, log drums below 100 Hz, kick on the beat, piano, shaker."""
    rng = np.random.default_rng(seed)
    bpm = bpm if bpm is not None else float(rng.uniform(108.0, 116.0))
    sixteenth = 60.0 / bpm / 4
    out = np.zeros_like(_timeline(seconds))
    roots = [55.0, 61.7, 65.4, 73.4, 82.4]
    chords = [[261.6, 329.6, 392.0], [220.0, 261.6, 329.6], [293.7, 349.2, 440.0]]
    n_steps = int(seconds / sixteenth)
    for step in range(n_steps):
        start = step * sixteenth
        pos = step % 16
        if pos % 4 == 0:
            _add(out, start, _kick())
        if pos in (0, 3, 6, 10, 12):
            _add(out, start, _log_drum(roots[int(rng.integers(len(roots)))], rng))
        if pos in (2, 6, 10, 14):
            _add(out, start, _piano(chords[int(rng.integers(len(chords)))]))
        _add(out, start, _click(rng, 0.03, 0.01))
    out += 0.002 * rng.standard_normal(out.size)
    return out


def hihats_140(seed: int) -> Audio:
    rng = np.random.default_rng(seed)
    out = np.zeros_like(_timeline())
    eighth = 60.0 / 140.0 / 2
    for k in range(int(SECONDS / eighth)):
        _add(out, k * eighth, _click(rng, 0.5, 0.012))
    return out


def white_noise(seed: int) -> Audio:
    noise: Audio = 0.3 * np.random.default_rng(seed).standard_normal(int(SECONDS * SR))
    return noise


def tone_1k() -> Audio:
    tone: Audio = 0.5 * np.sin(2 * np.pi * 1000.0 * _timeline())
    return tone


def silence() -> Audio:
    return np.zeros(int(SECONDS * SR))


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return build_reference_profile(
        [amapiano_like(seed) for seed in range(100, 104)], SR, bpm_min=105.0, bpm_max=118.0
    )


def _score(clip: Audio, profile: ReferenceProfile) -> AuthenticityResult:
    return score_clips([clip], SR, profile)


NON_TARGETS = {
    "hihats_140": lambda: hihats_140(7),
    "white_noise": lambda: white_noise(7),
    "tone_1k": tone_1k,
    "silence": silence,
}


@pytest.mark.parametrize("name", sorted(NON_TARGETS))
def test_target_ranks_strictly_above_each_non_target(name: str, profile: ReferenceProfile) -> None:
    target = _score(amapiano_like(1), profile)
    other = _score(NON_TARGETS[name](), profile)
    assert target.score > other.score, (name, target.components, other.components)
    # Not only the total: the reference-free traits rank the same way too.
    assert target.components["tempo"] > other.components["tempo"], name
    assert target.components["log_drum"] > other.components["log_drum"], name


def test_target_traits_are_recognised(profile: ReferenceProfile) -> None:
    result = _score(amapiano_like(2, bpm=112.0), profile)
    c = result.components
    assert 110.0 <= c["tempo_bpm"] <= 114.0, c
    assert c["tempo"] > 0.8, c
    assert c["log_drum"] > 0.8, c
    assert c["distribution"] > 0.5, c
    assert result.score > 0.75, c
    assert result.reason is None


def test_non_target_evidence(profile: ReferenceProfile) -> None:
    hats = _score(hihats_140(3), profile).components
    assert 136.0 <= hats["tempo_bpm"] <= 144.0, hats
    assert hats["tempo"] < 0.05 and hats["log_drum"] < 0.05, hats
    noise = _score(white_noise(3), profile).components
    assert noise["pulse_clarity"] < 0.2 and noise["log_drum"] < 0.2, noise
    tone = _score(tone_1k(), profile).components
    assert tone["tempo"] == 0.0 and tone["log_drum"] < 0.01, tone


def test_reference_profile_ranks_target_like_sets_above_others(profile: ReferenceProfile) -> None:
    target_set = score_clips([amapiano_like(s) for s in (11, 12, 13)], SR, profile)
    for name, make in NON_TARGETS.items():
        other_set = score_clips([make(), make(), make()], SR, profile)
        assert target_set.score > other_set.score, (name, other_set.components)
    # A mixed set sits in between.
    mixed = score_clips([amapiano_like(11), white_noise(1), tone_1k()], SR, profile)
    assert target_set.score > mixed.score > score_clips([tone_1k()], SR, profile).score


def test_distribution_component_prefers_the_reference_style() -> None:
    """A profile built from hi-hat clips makes hi-hats the closer distribution."""
    hats_profile = build_reference_profile([hihats_140(s) for s in range(4)], SR, 105.0, 118.0)
    hats = _score(hihats_140(9), hats_profile).components["distribution"]
    target = _score(amapiano_like(9), hats_profile).components["distribution"]
    assert hats > target


def test_deterministic(profile: ReferenceProfile) -> None:
    clips = [amapiano_like(5), white_noise(5), hihats_140(5)]
    first = score_clips(clips, SR, profile)
    second = score_clips([c.copy() for c in clips], SR, profile)
    assert first.model_dump() == second.model_dump()
    again = build_reference_profile([amapiano_like(s) for s in range(100, 104)], SR, 105.0, 118.0)
    assert again.model_dump() == profile.model_dump()


def test_scores_and_components_are_in_range(profile: ReferenceProfile) -> None:
    clips = [amapiano_like(6), hihats_140(6), white_noise(6), tone_1k(), silence()]
    result = score_clips(clips, SR, profile)
    assert 0.0 <= result.score <= 1.0
    for key in ("tempo", "log_drum", "distribution", "valid_fraction"):
        assert 0.0 <= result.components[key] <= 1.0, key
    assert all(math.isfinite(v) for v in result.components.values())
    for clip in result.clips:
        assert 0.0 <= clip.score <= 1.0
        for key in ("tempo", "log_drum", "distribution"):
            if clip.valid:
                assert 0.0 <= clip.components[key] <= 1.0
    assert result.components["valid_fraction"] == pytest.approx(0.8)
    assert result.reason is not None and "silent" in result.reason


@pytest.mark.parametrize(
    ("clip", "reason"),
    [
        (np.zeros(int(SECONDS * SR)), "silent"),
        (np.full(int(SECONDS * SR), 1e-7), "silent"),
        (np.zeros(0), "empty"),
        (amapiano_like(1)[: SR // 2], "too short"),
        (np.where(np.arange(int(SECONDS * SR)) == 100, np.nan, 0.1), "non-finite"),
        (np.full(int(SECONDS * SR), np.inf), "non-finite"),
        (np.zeros((2, 2, 2)), "shape"),
        (np.array(["a", "b"]), "dtype"),
    ],
)
def test_bad_audio_scores_zero_with_a_reason(clip: Audio, reason: str, profile: ReferenceProfile) -> None:
    result = _score(clip, profile)
    assert result.score == 0.0
    assert result.clips[0].valid is False
    assert result.clips[0].reason is not None and reason in result.clips[0].reason
    assert result.reason is not None and reason in result.reason


def test_empty_set_and_bad_profile_do_not_crash(profile: ReferenceProfile) -> None:
    assert score_clips([], SR, profile).score == 0.0
    broken = profile.model_copy(update={"feature_mean": [float("nan")] * len(FEATURE_NAMES)})
    result = score_clips([amapiano_like(1)], SR, broken)
    assert result.score == 0.0 and result.reason is not None


def test_stereo_other_sample_rates_and_dtypes(profile: ReferenceProfile) -> None:
    mono = amapiano_like(4)
    base = _score(mono, profile).score
    stereo = np.stack([mono, mono])  # (channels, samples), as audiocraft returns
    assert _score(stereo, profile).score == pytest.approx(base, abs=1e-9)
    assert _score(stereo.T, profile).score == pytest.approx(base, abs=1e-9)
    assert _score(mono.astype(np.float32), profile).score == pytest.approx(base, abs=1e-3)
    at_16k = resample_poly(mono, 1, 2)  # the same audio delivered at 16 kHz
    assert score_clips([at_16k], SR // 2, profile).score == pytest.approx(base, abs=0.02)
    at_44k = resample_poly(mono, 441, 320)
    assert score_clips([at_44k], 44_100, profile).score == pytest.approx(base, abs=0.02)
    pcm = (mono / np.abs(mono).max() * 20000).astype(np.int16)
    assert _score(pcm, profile).score == pytest.approx(base, abs=1e-3)


def test_reference_profile_round_trips_through_json(profile: ReferenceProfile) -> None:
    text = profile.model_dump_json()
    assert json.loads(text)["feature_names"] == list(FEATURE_NAMES)
    again = ReferenceProfile.model_validate_json(text)
    clip = amapiano_like(8)
    assert _score(clip, again).score == _score(clip, profile).score


def test_reference_profile_skips_bad_clips_and_needs_one_good() -> None:
    prof = build_reference_profile([amapiano_like(1), silence()], SR, 105.0, 118.0)
    assert prof.n_valid_clips == 1 and "silent" in prof.skipped[1]
    with pytest.raises(ValueError, match="no usable reference clip"):
        build_reference_profile([silence(), np.zeros(10)], SR, 105.0, 118.0)


def test_band_score_soft_falloff() -> None:
    assert band_score(110.0, 105.0, 118.0) == 1.0
    assert band_score(118.0, 105.0, 118.0) == 1.0
    assert 0.5 < band_score(121.0, 105.0, 118.0) < 1.0
    assert band_score(124.0, 105.0, 118.0) < band_score(121.0, 105.0, 118.0)
    assert band_score(140.0, 105.0, 118.0) < 0.01
    assert band_score(0.0, 105.0, 118.0) == 0.0


def test_frechet_distance_basics() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 3))
    cov = np.cov(a, rowvar=False)
    mu = a.mean(axis=0)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    shifted = frechet_distance(mu + 2.0, cov, mu, cov)
    assert shifted == pytest.approx(12.0, rel=1e-6)  # |(2, 2, 2)|²
    assert frechet_distance(mu, cov, mu + 1.0, 4 * cov) == pytest.approx(
        frechet_distance(mu + 1.0, 4 * cov, mu, cov), rel=1e-9
    )


def test_fast_enough(profile: ReferenceProfile) -> None:
    clips = [amapiano_like(s) for s in range(3)]
    score_clips(clips[:1], SR, profile)  # warm-up
    start = time.perf_counter()
    score_clips(clips, SR, profile)
    per_clip = (time.perf_counter() - start) / len(clips)
    assert per_clip < 0.5, f"{per_clip:.3f} s per 8 s clip"
