"""Honest errors on bad data: truncated audio, escaping manifest paths, BOMs, file:// URIs,
JSON error lines and a dataset checked before the model is loaded.

Real files throughout: WAV/FLAC written with soundfile, MP3 encoded with PyAV (LAME), real
local storage, and the trainer's command line run as a subprocess where the log format matters.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fermata_api import EXIT_CONFIG_ERROR, DatasetSource, DatasetSpec
from fermata_dev.synthetic import encode_audio, make_manifest, synth_clip
from fermata_trainer.audio_io import decode_audio, decode_count, inspect_audio
from fermata_trainer.dataset import REPORT_KEY, ManifestFormatError, _resolve_manifest_audio, prepare_dataset
from fermata_trainer.logging_setup import configure_logging, get_logger
from fermata_trainer.storage import InvalidUriError, LocalStorage, local_path_of, read_uri_bytes
from tests.trainer.helpers import log_events, run_trainer, tiny_config, trainer_env, write_config

pytestmark = pytest.mark.trainer

RATE = 44100


def write_mp3(path: Path, seconds: float, rate: int = RATE, bitrate: int = 128_000) -> Path:
    """A CBR MP3 encoded with PyAV (libmp3lame); LAME writes a Xing/Info header with the length."""
    samples = np.tile(synth_clip(3, 1.0, rate), int(np.ceil(seconds)))[: int(seconds * rate)]
    return encode_audio(path, samples, rate, bitrate=bitrate)


@pytest.fixture(scope="module")
def mp3_45s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mp3(tmp_path_factory.mktemp("mp3") / "full.mp3", 45.0)


def _manifest(path: Path, entries: list[dict[str, str]], prefix: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(prefix + "".join(json.dumps(e) + "\n" for e in entries).encode())
    return path


def _entry(audio: str, n: int = 0) -> dict[str, str]:
    return {"audio": audio, "description": f"deep amapiano groove {n} with log drums"}


def _spec(manifest: Path | str) -> DatasetSpec:
    return DatasetSpec(source=DatasetSource.manifest, uri=str(manifest), validation_fraction=0.3)


# ----------------------------------------------------------------------------- 1: decoded lengths


def test_inspect_audio_measures_by_decoding(tmp_path: Path, mp3_45s: Path) -> None:
    before = decode_count()
    facts, samples = inspect_audio(mp3_45s)
    assert decode_count() == before + 1  # one decode, counted like decode_audio's
    assert facts.codec == "mp3" and facts.sample_rate == RATE and facts.channels == 1
    assert facts.bitrate_kbps == pytest.approx(128, abs=1)
    assert facts.header_duration == pytest.approx(45.0, abs=0.1)
    assert facts.duration == pytest.approx(45.0, abs=0.1) and not facts.truncated
    assert samples.dtype == np.float32 and samples.shape == (1, facts.frames)
    assert facts.duration == facts.frames / facts.sample_rate

    wav = tmp_path / "tone.wav"
    sf.write(str(wav), synth_clip(1, 2.5), 16000, subtype="PCM_16")
    facts, samples = inspect_audio(wav)
    assert (facts.codec, facts.sample_rate, facts.frames) == ("pcm_s16le", 16000, 40000)
    assert facts.header_duration == facts.duration == 2.5 and facts.bitrate_kbps == 256
    assert np.array_equal(samples, decode_audio(wav)[0])


def test_a_fragment_of_an_mp3_is_truncated_not_45_seconds(tmp_path: Path, mp3_45s: Path) -> None:
    fragment = tmp_path / "audio" / "fragment.mp3"
    fragment.parent.mkdir()
    fragment.write_bytes(mp3_45s.read_bytes()[:5000])  # a 5 kB partial download
    facts, _ = inspect_audio(fragment)
    assert facts.header_duration == pytest.approx(45.0, abs=0.1)  # the header still says 45 s
    assert facts.duration < 0.5 and facts.truncated

    half = tmp_path / "audio" / "half.mp3"
    data = mp3_45s.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    good = tmp_path / "audio" / "good.wav"
    sf.write(str(good), synth_clip(2, 1.7), 16000)
    manifest = _manifest(
        tmp_path / "manifest.jsonl",
        [_entry("audio/good.wav", 0), _entry("audio/fragment.mp3", 1), _entry("audio/half.mp3", 2)],
    )
    storage = LocalStorage(tmp_path / "storage")
    prepared = prepare_dataset(_spec(manifest), storage, tmp_path / "work")

    assert [e.audio for e in prepared.entries] == [str(good)]
    assert prepared.entries[0].duration == 1.7  # decoded
    report = json.loads(storage.read_text(REPORT_KEY))
    assert report["skippedByReason"] == {"truncated audio": 2}
    reasons = {Path(s["audio"]).name: s["reason"] for s in report["skipped"]}
    assert reasons["fragment.mp3"].startswith(
        f"truncated audio: decodes to {facts.duration:.2f} s of the header's 45.00 s"
    )
    assert reasons["half.mp3"].startswith("truncated audio: decodes to 22.")
    assert report["totalSeconds"] == 1.7


def test_a_cut_off_flac_is_truncated(tmp_path: Path) -> None:
    full = tmp_path / "full.flac"
    sf.write(str(full), synth_clip(4, 10.0), 16000, format="FLAC")
    cut = tmp_path / "cut.flac"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    facts, samples = inspect_audio(cut)
    assert facts.codec == "flac" and facts.header_duration == 10.0
    assert facts.truncated and 1.0 < facts.duration < 5.0 and samples.shape[1] == facts.frames
    assert facts.stream_error is not None  # the decoder said so too
    assert not inspect_audio(full)[0].truncated


def test_a_cut_off_wav_is_truncated(tmp_path: Path) -> None:
    """libsndfile and ffmpeg shorten a WAV's length to what the file holds; the data chunk
    still says how long it was meant to be."""
    full = tmp_path / "full.wav"
    sf.write(str(full), np.stack([synth_clip(8, 4.0), synth_clip(9, 4.0)], axis=1), 16000, subtype="PCM_24")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    facts, samples = inspect_audio(cut)
    assert facts.codec == "pcm_s24le" and facts.channels == 2 and samples.shape[0] == 2
    assert facts.header_duration == 4.0 and facts.duration == pytest.approx(2.0, abs=0.01)
    assert facts.truncated and facts.stream_error is None
    full_facts, _ = inspect_audio(full)
    assert full_facts.header_duration == full_facts.duration == 4.0 and not full_facts.truncated


# ----------------------------------------------------------------------------- 2: escaping paths


def test_a_relative_path_may_not_leave_the_manifest_folder(tmp_path: Path) -> None:
    make_manifest(tmp_path / "data", clips=2)
    outside = tmp_path / "music" / "x.wav"
    outside.parent.mkdir()
    sf.write(str(outside), synth_clip(5, 1.2), 16000)
    manifest = _manifest(
        tmp_path / "data" / "escape.jsonl",
        [_entry("audio/clip-0.wav", 0), _entry("../music/x.wav", 1)],
    )
    with pytest.raises(ManifestFormatError) as caught:
        prepare_dataset(_spec(manifest), LocalStorage(tmp_path / "storage"), tmp_path / "work")
    message = str(caught.value)
    assert f"{manifest} line 2" in message and "'../music/x.wav'" in message
    assert "may not escape it" in message and "\n" not in message

    # inside after normalising, absolute paths and s3:// URIs stay allowed
    manifest = _manifest(
        tmp_path / "data" / "fine.jsonl",
        [_entry("audio/../audio/clip-0.wav", 0), _entry("./audio/clip-1.wav", 1), _entry(str(outside), 2)],
    )
    prepared = prepare_dataset(_spec(manifest), LocalStorage(tmp_path / "storage"), tmp_path / "work")
    assert [e.audio for e in prepared.entries] == [
        str(tmp_path / "data" / "audio" / "clip-0.wav"),
        str(tmp_path / "data" / "audio" / "clip-1.wav"),
        str(outside),
    ]
    base = "s3://bucket/sets/manifest.jsonl"
    assert _resolve_manifest_audio(base, 1, "s3://other/a.mp3") == "s3://other/a.mp3"
    assert _resolve_manifest_audio(base, 1, "a/b.mp3") == "s3://bucket/sets/a/b.mp3"
    with pytest.raises(ManifestFormatError, match="line 3: audio path '../../x.mp3' leaves"):
        _resolve_manifest_audio(base, 3, "../../x.mp3")
    with pytest.raises(ManifestFormatError, match="unsupported scheme"):
        _resolve_manifest_audio(base, 4, "https://example.com/a.mp3")


# ----------------------------------------------------------------------------- 3: BOM


def test_a_manifest_with_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    make_manifest(tmp_path / "data", clips=3)
    manifest = _manifest(
        tmp_path / "data" / "bom.jsonl",
        [_entry(f"audio/clip-{i}.wav", i) for i in range(3)],
        prefix="\ufeff".encode(),
    )
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    prepared = prepare_dataset(_spec(manifest), LocalStorage(tmp_path / "storage"), tmp_path / "work")
    assert len(prepared.entries) == 3
    assert prepared.entries[0].description == "deep amapiano groove 0 with log drums"


# ----------------------------------------------------------------------------- 4: file:// URIs


def test_percent_encoded_file_uris(tmp_path: Path) -> None:
    folder = tmp_path / "my data"
    folder.mkdir()
    song = folder / "my song é.wav"
    sf.write(str(song), synth_clip(6, 1.4), 16000)
    uri = song.as_uri()
    assert "%20" in uri and "%C3%A9" in uri
    assert local_path_of(uri) == song
    assert local_path_of("file://localhost" + uri[len("file://") :]) == song
    assert local_path_of(str(song)) == song  # a plain path is used as it is
    with pytest.raises(InvalidUriError, match="host 'nas'"):
        local_path_of("file://nas/share/a.wav")

    # an absolute file:// entry, and a manifest given as a file:// URI with relative entries
    other = folder / "100% loud.wav"
    sf.write(str(other), synth_clip(7, 1.1), 16000)
    manifest = _manifest(folder / "manifest one.jsonl", [_entry(uri, 0), _entry("100% loud.wav", 1)])
    assert read_uri_bytes(manifest.as_uri()) == manifest.read_bytes()
    prepared = prepare_dataset(_spec(manifest.as_uri()), LocalStorage(tmp_path / "storage"), tmp_path / "w")
    assert [local_path_of(e.audio) for e in prepared.entries] == [song, other]
    assert all(e.duration > 1.0 for e in prepared.entries)


# ----------------------------------------------------------------------------- 5: JSON error lines


def _prepare(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fermata_trainer.cli", "prepare", "--config", str(config)],
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_a_bad_config_is_one_json_error_line(tmp_path: Path) -> None:
    config = tmp_path / "trainer.json"
    config.write_text('{"model": {"base": "tiny://seed=0"}, "dataset": {"segmentSeconds": -1}}')
    result = _prepare(config)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    last = json.loads(result.stderr.strip().splitlines()[-1])
    assert last["event"] == "config_error" and last["level"] == "error"
    assert last["error_type"] == "TrainerConfigError" and str(config) in last["error"]
    assert "Traceback" not in result.stderr


def test_an_escaping_manifest_entry_exits_2_with_one_error_line(tmp_path: Path) -> None:
    make_manifest(tmp_path / "data", clips=2)
    manifest = _manifest(
        tmp_path / "data" / "manifest.jsonl", [_entry("audio/clip-0.wav", 0), _entry("../music/x.mp3", 1)]
    )
    config = tiny_config(manifest, tmp_path / "storage", tmp_path / "work")
    config.dataset.source = DatasetSource.manifest
    result = _prepare(write_config(config, tmp_path / "trainer.json"))
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    errors = [line for line in result.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr + result.stdout
    record = json.loads(errors[0])
    assert record["event"] == "config_error" and record["error_type"] == "ManifestFormatError"
    assert "line 2" in record["error"] and "may not escape" in record["error"]


def test_module_loggers_made_before_configure_logging_write_json() -> None:
    early = get_logger("fermata_trainer.test_early")  # as a module-level `log = ...` is
    out = io.StringIO()
    configure_logging(stream=out)
    early.bind(clip="7").warning("dataset_clip_skipped", reason="missing file")
    record = json.loads(out.getvalue().strip())
    assert record["event"] == "dataset_clip_skipped" and record["logger"] == "fermata_trainer.test_early"
    assert record["clip"] == "7" and record["level"] == "warning"


# ----------------------------------------------------------------------------- 6: dataset first


def test_a_missing_dataset_fails_before_the_model_is_loaded(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "no-such-dataset", tmp_path / "storage", tmp_path / "work")
    result = run_trainer(write_config(config, tmp_path / "trainer.json"))
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout[-3000:] + result.stderr[-3000:]
    events = [r["event"] for r in log_events(result.stdout)]
    assert "trainer_starting" in events and events[-1] == "config_error"
    assert not {"model_loading", "model_loaded"} & set(events)
    (error,) = log_events(result.stdout, "config_error")
    assert "annotations_final.csv not found" in error["error"]
    assert "Traceback" not in result.stdout + result.stderr


def test_two_ranks_both_fail_on_a_missing_dataset_before_loading_the_model(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "no-such-dataset", tmp_path / "storage", tmp_path / "work")
    config.gpus = 2  # two CPU ranks (gloo) under torchrun
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [
        "-m",
        "fermata_trainer.cli",
        "run",
        "--config",
        str(write_config(config, tmp_path / "t.json")),
    ]
    result = subprocess.run(
        command, env=trainer_env(), capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode != 0
    errors = log_events(result.stdout, "config_error")
    # rank 0 raised it; rank 1 got it through the broadcast instead of waiting for a collective
    assert {int(r.get("rank", 0)) for r in errors} == {0, 1}, result.stdout[-3000:]
    assert all("annotations_final.csv not found" in r["error"] for r in errors)
    assert not log_events(result.stdout, "model_loaded")


def test_an_mtat_row_whose_path_leaves_the_root_is_skipped_with_its_reason() -> None:
    from fermata_trainer.dataset import parse_mtat_annotations

    csv_text = (
        "clip_id\tpiano\tdrums\tmp3_path\n1\t1\t1\t0/ok.mp3\n2\t1\t1\t../../etc/passwd\n3\t1\t1\t/abs/x.mp3\n"
    )
    rows = parse_mtat_annotations(csv_text, ["piano", "drums"], 1)
    assert [r[0] for r in rows.kept] == ["1"]
    assert sorted(s.id for s in rows.skipped) == ["2", "3"]
    assert all("leaves the dataset root" in s.reason for s in rows.skipped)
    assert all(s.reason.split(":")[0] == "malformed row" for s in rows.skipped)
