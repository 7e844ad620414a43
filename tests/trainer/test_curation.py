"""Curation: filters, duplicate removal, silence, loudness, weighted mixes and the stratified
split, on real audio files (WAV, FLAC, MP3 encoded with PyAV) prepared by prepare_dataset."""

from __future__ import annotations

import json
import shutil
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from pydantic import ValidationError

from fermata_api import DatasetSpec, TrainingRunSpec
from fermata_dev.synthetic import encode_audio
from fermata_operator import crdgen
from fermata_trainer.audio_io import decode_audio
from fermata_trainer.codes_cache import encode_clip
from fermata_trainer.curation import (
    BS1770_STAGE1_48K,
    BS1770_STAGE2_48K,
    CurationError,
    integrated_loudness,
    k_weighting,
    parse_key,
    process_audio,
    processing_fingerprint,
)
from fermata_trainer.dataset import EmptySubsetError, PreparedDataset, assign_splits, prepare_dataset
from fermata_trainer.model_loading import build_tiny_musicgen
from fermata_trainer.storage import LocalStorage

pytestmark = pytest.mark.trainer

RATE = 44100


def tone(
    seconds: float, rate: int = RATE, freq: float = 440.0, level: float = 0.3, seed: int = 0
) -> np.ndarray:
    """A tone with a little noise (so no two clips share a digest), float32 mono."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.01
    return (level * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE, fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, rate, format=fmt)
    return path


def write_mp3(path: Path, samples: np.ndarray, kbps: int, rate: int = RATE) -> Path:
    return encode_audio(path, samples, rate, bitrate=kbps * 1000)


def write_manifest(root: Path, entries: list[dict[str, Any]]) -> Path:
    path = root / "manifest.jsonl"
    lines = [json.dumps({"description": f"clip {e['id']}", **e}) for e in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(tmp_path: Path, manifest: Path | None = None, **dataset: Any) -> PreparedDataset:
    if manifest is not None:
        dataset = {"source": "manifest", "uri": str(manifest), **dataset}
    spec = DatasetSpec.model_validate(dataset)
    return prepare_dataset(spec, LocalStorage(tmp_path / "storage"), tmp_path / "work", reuse=False)


def kept_ids(prepared: PreparedDataset) -> set[str]:
    return {e.id for e in prepared.entries}


# ----------------------------------------------------------------------------- filters


def test_duration_sample_rate_and_bitrate_filters(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_wav(data / "short.wav", tone(0.5, seed=1))
    write_wav(data / "long.wav", tone(6.0, seed=2))
    write_wav(data / "good.wav", tone(2.0, seed=3))
    write_wav(data / "low-rate.wav", tone(2.0, rate=16000, seed=4), rate=16000)
    write_mp3(data / "mp3-128.mp3", tone(2.0, seed=5), kbps=128)
    write_mp3(data / "mp3-320.mp3", tone(2.0, seed=6), kbps=320)
    write_wav(data / "lossless.flac", tone(2.0, seed=7), fmt="FLAC")
    names = [
        "short.wav",
        "long.wav",
        "good.wav",
        "low-rate.wav",
        "mp3-128.mp3",
        "mp3-320.mp3",
        "lossless.flac",
    ]
    manifest = write_manifest(data, [{"id": n.split(".")[0], "audio": n} for n in names])
    curation = {
        "minDurationSeconds": 1,
        "maxDurationSeconds": 5,
        "minSampleRate": 32000,
        "minBitrateKbps": 320,
    }

    prepared = prepare(tmp_path, manifest, curation=curation)

    assert kept_ids(prepared) == {"good", "mp3-320", "lossless"}  # FLAC and WAV: lossless, pass 320
    counts = prepared.report["skippedByReason"]
    assert counts == {"too short": 1, "too long": 1, "low sample rate": 1, "low bitrate": 1}
    reasons = {s["id"]: s["reason"] for s in prepared.report["skipped"]}
    assert (
        reasons["mp3-128"].startswith("low bitrate: 128 kbps mp3")
        and "< minBitrateKbps 320" in reasons["mp3-128"]
    )
    assert reasons["low-rate"] == "low sample rate: 16000 Hz < minSampleRate 32000"
    assert reasons["short"].startswith("too short: 0.50 s")

    unfiltered = prepare(tmp_path / "again", manifest)  # all filters off by default
    assert len(unfiltered.entries) == len(names) and unfiltered.report["skippedByReason"] == {}


def click_track(bpm: float, seconds: float = 8.0, rate: int = 22050) -> np.ndarray:
    out = np.zeros(int(seconds * rate), dtype=np.float32)
    burst = (
        np.random.default_rng(0).standard_normal(int(0.02 * rate)) * np.hanning(int(0.02 * rate))
    ).astype(np.float32)
    for start in (np.arange(0, seconds, 60.0 / bpm) * rate).astype(int):
        out[start : start + burst.size] += burst[: out.size - start]
    return 0.5 * out


def test_bpm_band_uses_the_manifest_else_estimates_the_tempo(tmp_path: Path) -> None:
    data = tmp_path / "data"
    entries = [
        {"id": "slow", "audio": "slow.wav", "bpm": 90},
        {"id": "in-band", "audio": "in-band.wav", "bpm": 115},
        {"id": "fast", "audio": "fast.wav", "bpm": 140},
        {"id": "est-120", "audio": "est-120.wav"},  # no bpm: estimated from the audio
        {"id": "est-150", "audio": "est-150.wav"},
    ]
    for i, e in enumerate(entries[:3]):
        write_wav(data / e["audio"], tone(1.0, seed=i))
    write_wav(data / "est-120.wav", click_track(120), rate=22050)
    write_wav(data / "est-150.wav", click_track(150), rate=22050)

    prepared = prepare(tmp_path, write_manifest(data, entries), curation={"bpm": {"min": 100, "max": 130}})

    assert kept_ids(prepared) == {"in-band", "est-120"}
    assert prepared.report["skippedByReason"] == {"bpm out of band": 3}
    reasons = {s["id"]: s["reason"] for s in prepared.report["skipped"]}
    assert reasons["fast"] == "bpm out of band: 140 (manifest) not in 100-130"
    assert "(estimated)" in reasons["est-150"]
    estimated = next(e for e in prepared.entries if e.id == "est-120")
    assert estimated.bpm is not None and abs(estimated.bpm - 120) <= 2  # recorded in the manifest
    assert prepared.report["curation"]["estimated"] == {"bpm": 1, "key": 0}


def test_keys_and_mode(tmp_path: Path) -> None:
    assert parse_key("A minor") == parse_key("Am") == parse_key(" a min ") == (9, "minor")
    assert parse_key("A# minor") == parse_key("Bb minor") == parse_key("B♭m") == (10, "minor")
    assert parse_key("C") == parse_key("C major") == parse_key("CM") == (0, "major")
    assert parse_key("H minor") is None and parse_key("") is None

    data = tmp_path / "data"
    keys = {"a-minor": "A minor", "am": "Am", "bb-minor": "A# minor", "d-major": "D major", "junk": "??"}
    for i, name in enumerate(keys):
        write_wav(data / f"{name}.wav", tone(1.0, seed=i))
    entries = [{"id": n, "audio": f"{n}.wav", "key": k} for n, k in keys.items()]
    manifest = write_manifest(data, entries)

    by_key = prepare(tmp_path / "keys", manifest, curation={"keys": ["A minor", "Bb minor"]})
    assert kept_ids(by_key) == {"a-minor", "am", "bb-minor"}
    assert by_key.report["skippedByReason"] == {"key not allowed": 1, "key unknown": 1}

    by_mode = prepare(tmp_path / "mode", manifest, curation={"mode": "major"})
    assert kept_ids(by_mode) == {"d-major"}
    assert by_mode.report["skippedByReason"] == {"key not allowed": 3, "key unknown": 1}


def test_duplicate_audio_is_skipped_by_digest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_wav(data / "one.wav", tone(1.0, seed=1))
    shutil.copy(data / "one.wav", data / "copy-of-one.wav")
    write_wav(data / "two.wav", tone(1.0, seed=2))
    entries = [{"id": n, "audio": f"{n}.wav"} for n in ("one", "copy-of-one", "two")]
    manifest = write_manifest(data, entries)

    prepared = prepare(tmp_path, manifest)  # dedupe is on by default
    assert kept_ids(prepared) == {"one", "two"}
    assert prepared.report["skippedByReason"] == {"duplicate audio": 1}
    assert prepared.report["skipped"][0]["reason"] == "duplicate audio: same sha256 as clip one"

    assert len(prepare(tmp_path / "off", manifest, curation={"dedupe": False}).entries) == 3


# ----------------------------------------------------------------------------- silence


def with_silence(lead: float, body: float, tail: float, rate: int = RATE) -> np.ndarray:
    return np.concatenate([np.zeros(int(lead * rate)), tone(body, rate), np.zeros(int(tail * rate))]).astype(
        np.float32
    )


def test_mostly_silent_clip_is_rejected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_wav(data / "silent.wav", with_silence(1.5, 0.4, 1.5))  # 88% silent
    write_wav(data / "music.wav", with_silence(0.2, 2.0, 0.2))  # 17% silent
    manifest = write_manifest(data, [{"id": n, "audio": f"{n}.wav"} for n in ("silent", "music")])

    prepared = prepare(
        tmp_path, manifest, curation={"silence": {"action": "reject", "maxSilentFraction": 0.5}}
    )

    assert kept_ids(prepared) == {"music"}
    assert prepared.report["skippedByReason"] == {"mostly silent": 1}
    assert "under -50 dBFS > maxSilentFraction 0.5" in prepared.report["skipped"][0]["reason"]


def test_leading_and_trailing_silence_is_trimmed_before_tokenizing(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "padded.wav", with_silence(1.0, 1.0, 1.5))
    samples, rate = decode_audio(path)
    curation = DatasetSpec.model_validate({"uri": "x", "curation": {"silence": {"action": "trim"}}}).curation

    trimmed = process_audio(samples, rate, curation)
    assert samples.shape[1] == int(3.5 * RATE)
    assert abs(trimmed.shape[1] / RATE - 1.0) <= 0.05  # 50 ms windows
    assert process_audio(samples, rate, DatasetSpec(uri="x").curation) is samples  # off: untouched

    model = build_tiny_musicgen(seed=0)
    processing = processing_fingerprint(curation)
    assert processing == {"trimSilenceDb": -50.0, "version": 1}

    def process(s: np.ndarray, r: int) -> tuple[np.ndarray, int]:
        return process_audio(s, r, curation), r

    cpu = torch.device("cpu")
    whole, short = encode_clip(model, path, cpu), encode_clip(model, path, cpu, process)
    assert short.shape[-1] < whole.shape[-1] * 0.35  # the codes cover ~1 s of 3.5 s


# ----------------------------------------------------------------------------- loudness


def test_k_weighting_is_bs1770s() -> None:
    """At 48 kHz the biquads equal the standard's Tables 1 and 2; a 0 dBFS 997 Hz sine in one
    channel reads -3.01 LKFS (BS.1770-4's calibration); other rates give the same loudness."""
    (b1, a1), (b2, a2) = k_weighting(48000)
    assert np.allclose(b1, BS1770_STAGE1_48K[0], atol=1e-8) and np.allclose(
        a1, BS1770_STAGE1_48K[1], atol=1e-8
    )
    assert np.allclose(b2, BS1770_STAGE2_48K[0], atol=1e-8) and np.allclose(
        a2, BS1770_STAGE2_48K[1], atol=1e-8
    )
    for rate in (48000, 44100, 32000):
        t = np.arange(5 * rate) / rate
        sine = np.sin(2 * np.pi * 997 * t).astype(np.float32)[None]
        assert integrated_loudness(sine, rate) == pytest.approx(-3.01, abs=0.05)
        assert integrated_loudness(np.concatenate([sine, sine]) * 0.1, rate) == pytest.approx(-20.0, abs=0.05)
    assert integrated_loudness(np.zeros((1, 48000), dtype=np.float32), 48000) is None  # gated out


def test_loudness_normalisation_reaches_the_target_without_clipping(tmp_path: Path) -> None:
    spec = DatasetSpec.model_validate({"uri": "x", "curation": {"loudness": {"targetLufs": -14}}})
    rng = np.random.default_rng(3)
    quiet = (rng.standard_normal((2, 5 * RATE)) * 0.003).astype(np.float32)  # about -45 LUFS
    loud = np.clip(rng.standard_normal((2, 5 * RATE)) * 0.6, -1, 1).astype(np.float32)  # about -4 LUFS
    t = np.arange(5 * RATE) / RATE
    spiky = (0.02 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None]
    spiky[0, :: RATE // 4] = 0.9  # quiet, with peaks: +gain alone would clip them
    for clip in (quiet, loud, spiky):
        before = integrated_loudness(clip, RATE)
        out = process_audio(clip, RATE, spec.curation)
        after = integrated_loudness(out, RATE)
        assert before is not None and after is not None
        assert abs(after - -14.0) <= 1.0, (before, after)
        assert float(np.abs(out).max()) <= 10 ** (-1 / 20) + 1e-6  # peakCeilingDbfs -1
    assert processing_fingerprint(spec.curation)["loudness"] == {"targetLufs": -14.0, "peakCeilingDbfs": -1.0}
    assert processing_fingerprint(DatasetSpec(uri="x").curation) == {}  # off: the cache key is unchanged


# ----------------------------------------------------------------------------- weighted mixes


def tiered_manifest(root: Path, counts: dict[str, int], seconds: float = 0.5) -> Path:
    entries = []
    for tier, n in counts.items():
        for i in range(n):
            name = f"{tier}-{i:03d}"
            write_wav(
                root / f"{name}.wav", tone(seconds, rate=8000, seed=zlib.crc32(name.encode())), rate=8000
            )
            entries.append({"id": name, "audio": f"{name}.wav", "tier": tier})
    return write_manifest(root, entries)


def shares(prepared: PreparedDataset, split: str) -> dict[str, float]:
    seconds: Counter[str] = Counter()
    for e in prepared.entries:
        if e.split == split:
            seconds[e.group or ""] += e.duration
    total = sum(seconds.values())
    return {g: s / total for g, s in seconds.items()}


def test_mix_by_tier_yields_the_weights_and_a_stratified_split(tmp_path: Path) -> None:
    """60/30/10 from 60 clips per tier: gold keeps all, silver and bronze are down-sampled; the
    train split's shares match the weights within one clip's share (0.5 s of ~27 s here)."""
    counts = {"gold": 60, "silver": 60, "bronze": 60}
    manifest = tiered_manifest(tmp_path / "data", counts)
    mix = {"by": "tier", "weights": {"gold": 60, "silver": 30, "bronze": 10}}

    prepared = prepare(tmp_path, manifest, mix=mix, validationFraction=0.2)

    train_seconds = sum(e.duration for e in prepared.train)
    tolerance = 0.5 / train_seconds
    for split in ("train", "validation"):
        got = shares(prepared, split)
        for tier, weight in {"gold": 0.6, "silver": 0.3, "bronze": 0.1}.items():
            allowed = tolerance if split == "train" else 0.5 / sum(e.duration for e in prepared.validation)
            assert abs(got[tier] - weight) <= allowed + 1e-9, (split, got)
    dropped = sum(counts.values()) - len(prepared.entries)
    assert dropped > 0 and prepared.report["skippedByReason"] == {"mix balance": dropped}
    # Stratified: within each tier the split is the by-id split of that tier's clips.
    for tier in counts:
        ids = [f"{tier}-{i:03d}" for i in range(counts[tier])]
        expected = assign_splits(ids, 0.2)
        for e in prepared.entries:
            if e.group == tier:
                assert e.split == expected[e.id]
        assert any(e.group == tier and e.split == "validation" for e in prepared.entries)
    report = prepared.report["curation"]["mix"]
    assert report["by"] == "tier" and report["unit"] == "seconds"
    assert report["groups"]["gold"]["train"]["share"] == pytest.approx(
        shares(prepared, "train")["gold"], abs=1e-3
    )


def test_entries_outside_the_mix_and_an_empty_group(tmp_path: Path) -> None:
    data = tmp_path / "data"
    manifest = tiered_manifest(data, {"gold": 6, "silver": 6, "platinum": 2})
    with manifest.open("a") as f:
        write_wav(data / "untiered.wav", tone(0.5, rate=8000, seed=99), rate=8000)
        f.write(json.dumps({"id": "untiered", "audio": "untiered.wav", "description": "x"}) + "\n")

    prepared = prepare(tmp_path, manifest, mix={"by": "tier", "weights": {"gold": 1, "silver": 1}})
    assert prepared.report["skippedByReason"]["not in mix"] == 3
    reasons = {s["id"]: s["reason"] for s in prepared.report["skipped"]}
    assert reasons["untiered"] == "not in mix: the entry has no 'tier' field"
    assert reasons["platinum-000"] == "not in mix: tier 'platinum' has no weight"

    with pytest.raises(CurationError, match=r"no training clip left in \['bronze'\]"):
        prepare(tmp_path / "b", manifest, mix={"by": "tier", "weights": {"gold": 1, "bronze": 1}})


def test_weighted_sources(tmp_path: Path) -> None:
    """Two manifests as sources weighted 3:1; ids are prefixed with the source name."""
    a = tiered_manifest(tmp_path / "a", {"a": 20})
    b = tiered_manifest(tmp_path / "b", {"b": 20})
    sources = [
        {"name": "classic", "source": "manifest", "uri": str(a), "weight": 3},
        {"name": "private-school", "source": "manifest", "uri": str(b), "weight": 1},
    ]
    prepared = prepare(tmp_path, sources=sources, validationFraction=0.25)
    got = shares(prepared, "train")
    assert abs(got["classic"] - 0.75) <= 0.5 / sum(e.duration for e in prepared.train) + 1e-9
    assert all(e.id.startswith(f"{e.group}/") for e in prepared.entries)
    assert prepared.report["curation"]["mix"]["by"] == "source"

    unweighted = prepare(tmp_path / "u", sources=[{**s, "weight": None} for s in sources])
    assert len(unweighted.entries) == 40 and unweighted.report["skippedByReason"] == {}
    assert set(unweighted.report["curation"]["groups"]) == {"classic", "private-school"}


def test_each_source_filters_with_its_own_min_tags_and_the_report_names_the_sources(tmp_path: Path) -> None:
    """Two MagnaTagATune trees as sources, minTags 1 and 3: each one's tag filter is counted under
    its own reason, and the report lists the sources (there is no top-level uri)."""
    from fermata_dev.synthetic import make_mtat_tree

    loose = make_mtat_tree(tmp_path / "loose", clips=6, qualifying_every=2)
    strict = make_mtat_tree(tmp_path / "strict", clips=6, qualifying_every=3)
    sources = [
        {"name": "loose", "source": "magnatagatune", "uri": str(loose.root), "minTags": 1},
        {"name": "strict", "source": "magnatagatune", "uri": str(strict.root), "minTags": 3},
    ]
    prepared = prepare(tmp_path, sources=sources)
    reasons = prepared.report["skippedByReason"]
    assert reasons["fewer than 3 proxy tags"] == 6 - len(strict.qualifying)
    assert reasons["fewer than 1 proxy tags"] == 6 - len(loose.qualifying)
    assert prepared.report["uri"] is None
    assert [s["name"] for s in prepared.report["sources"]] == ["loose", "strict"]
    assert prepared.report["skippedCount"] == sum(reasons.values())


def test_everything_filtered_out_is_an_empty_subset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_wav(data / "a.wav", tone(0.5))
    with pytest.raises(EmptySubsetError, match="1 too short"):
        prepare(
            tmp_path,
            write_manifest(data, [{"id": "a", "audio": "a.wav"}]),
            curation={"minDurationSeconds": 2},
        )


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"uri": "x", "curation": {"bpm": {"min": 130, "max": 100}}}, "bpm.min must not exceed bpm.max"),
        (
            {"uri": "x", "curation": {"minDurationSeconds": 30, "maxDurationSeconds": 10}},
            "curation.minDurationSeconds must not exceed curation.maxDurationSeconds",
        ),
        ({"uri": "x", "curation": {"keys": ["A-minor"]}}, "String should match pattern"),
        ({}, "set dataset.uri .one source. or dataset.sources .several., not both"),
        (
            {"uri": "x", "sources": [{"name": "a", "uri": "y"}]},
            "set dataset.uri .one source. or dataset.sources .several., not both",
        ),
        (
            {"sources": [{"name": "a", "uri": "y", "weight": 1}, {"name": "b", "uri": "z"}]},
            "give every dataset.sources entry a weight, or none",
        ),
        ({"sources": [{"name": "a", "uri": "y"}, {"name": "a", "uri": "z"}]}, "names must be unique"),
        ({"uri": "x", "mix": {"by": "tier", "weights": {"gold": 1}}}, "dataset.mix balances one manifest"),
        (
            {"uri": "x", "source": "manifest", "mix": {"by": "tier", "weights": {"gold": 0}}},
            "greater than 0",
        ),
    ],
)
def test_bad_curation_is_refused_with_a_clear_message(dataset: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DatasetSpec.model_validate(dataset)


def test_crd_carries_the_cel_rules() -> None:
    crd = yaml.safe_load(crdgen.render())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    dataset = spec["properties"]["dataset"]
    rules = {v["message"]: v["rule"] for v in dataset["x-kubernetes-validations"]}
    assert "set dataset.uri (one source) or dataset.sources (several), not both" in rules
    curation = dataset["properties"]["curation"]
    assert any(
        "minDurationSeconds <= self.maxDurationSeconds" in v["rule"]
        for v in curation["x-kubernetes-validations"]
    )
    bpm = curation["properties"]["bpm"]["x-kubernetes-validations"]
    assert bpm == [
        {
            "rule": "!has(self.min) || !has(self.max) || self.min <= self.max",
            "message": "bpm.min must not exceed bpm.max",
        }
    ]
    # Existing specs (source + uri only) are unchanged in meaning and still valid.
    run = {
        "dataset": {"source": "magnatagatune", "uri": "s3://d/mtat/"},
        "resources": {"image": "ghcr.io/fermata-dev/fermata-trainer:0.1.0"},
        "budget": {"maxUSD": 10},
        "storage": {"checkpoints": "s3://r/x/"},
    }
    parsed = TrainingRunSpec.model_validate(run)
    assert parsed.dataset.sources is None and parsed.dataset.curation.dedupe
