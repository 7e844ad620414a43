"""Dataset preparation on a synthetic MagnaTagATune tree and a generic manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from fermata_api import EXIT_CONFIG_ERROR, DatasetSource, DatasetSpec
from fermata_dev.synthetic import make_manifest, make_mtat_tree, synth_clip, write_annotations
from fermata_trainer import cli
from fermata_trainer.audio_io import UnreadableAudioError, decode_audio, probe_audio
from fermata_trainer.dataset import (
    MANIFEST_KEY,
    REPORT_KEY,
    AudioFetcher,
    ChecksumMismatchError,
    EmptySubsetError,
    ManifestFormatError,
    MissingColumnError,
    assign_splits,
    prepare_dataset,
    verify_entry,
)
from fermata_trainer.prompts import TEMPLATES, prompt_from_tags
from fermata_trainer.storage import LocalStorage, open_storage, sha256_file
from tests.s3_fixture import S3Server
from tests.trainer.helpers import tiny_config, write_config

pytestmark = pytest.mark.trainer


def _spec(root: Path, **kwargs: Any) -> DatasetSpec:
    return DatasetSpec(uri=str(root), **kwargs)


def test_tag_filter_prompts_split_and_report(tmp_path: Path) -> None:
    data = make_mtat_tree(tmp_path / "mtat", clips=12, qualifying_every=3)
    storage = LocalStorage(tmp_path / "storage")
    prepared = prepare_dataset(_spec(data.root, min_tags=3), storage, tmp_path / "work")

    assert [e.id for e in prepared.entries] == data.qualifying == ["100", "103", "106", "109"]
    assert {e.split for e in prepared.entries} == {"train", "validation"}
    for entry in prepared.entries:
        assert "amapiano" in entry.description and "log drum" in entry.description
        assert "piano" in entry.description or "bass" in entry.description
        assert entry.sha256 == sha256_file(data.paths[entry.id])
        assert entry.duration > 0 and {"drums", "piano"} <= set(entry.tags)

    report = json.loads(storage.read_text(REPORT_KEY))
    assert report["rows"] == 12 and report["kept"] == 4
    assert report["skippedByReason"] == {"fewer than 3 proxy tags": 8}
    assert report["manifestDigest"] == f"sha256:{prepared.manifest_digest}"
    lines = storage.read_text(MANIFEST_KEY).splitlines()
    assert [json.loads(line)["id"] for line in lines] == data.qualifying

    # deterministic: a fresh scan gives byte-identical prompts and splits
    again = prepare_dataset(_spec(data.root, min_tags=3), storage, tmp_path / "work", reuse=False)
    assert again.manifest_digest == prepared.manifest_digest
    # and the stored manifest is reused as is when nothing changed
    reused = prepare_dataset(_spec(data.root, min_tags=3), storage, tmp_path / "work")
    assert reused.reused and reused.manifest_digest == prepared.manifest_digest


def test_prompt_templates_are_deterministic() -> None:
    tags = ["mellow", "jazzy", "piano", "bass", "drums", "percussion"]
    prompt = prompt_from_tags("42", tags)
    assert prompt == prompt_from_tags("42", list(reversed(tags)))
    expected = {
        t.format(genre="amapiano", mood="mellow and jazzy", instruments="piano, deep bass and drums")
        for t in TEMPLATES
    }
    assert prompt in expected
    assert prompt_from_tags("7", []).startswith(("laid-back", "amapiano"))
    assert len({prompt_from_tags(str(i), tags) for i in range(40)}) > 1  # templates vary


def test_split_is_a_stable_hash_of_the_clip_id() -> None:
    ids = [str(i) for i in range(2000)]
    splits = assign_splits(ids, 0.1)
    share = sum(s == "validation" for s in splits.values()) / len(ids)
    assert 0.08 < share < 0.12
    assert assign_splits(list(reversed(ids)), 0.1) == splits
    assert assign_splits(ids[:500], 0.1) == {i: splits[i] for i in ids[:500]}
    tiny = assign_splits(["a", "b"], 0.01)
    assert sorted(tiny.values()) == ["train", "validation"]


def test_missing_column_is_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "mtat"
    root.mkdir()
    write_annotations(
        root / "annotations_final.csv", ["clip_id", "drums", "piano", "path"], [["1", "1", "1", "a.mp3"]]
    )
    with pytest.raises(MissingColumnError, match="mp3_path"):
        prepare_dataset(_spec(root), LocalStorage(tmp_path / "s"), tmp_path / "w")

    # proxy tags the CSV lacks: fine while enough remain, an error when none can qualify
    write_annotations(
        root / "annotations_final.csv",
        ["clip_id", "drums", "piano", "mp3_path"],
        [["1", "1", "1", "a.mp3"]],
    )
    with pytest.raises(MissingColumnError, match="minTags=3"):
        prepare_dataset(_spec(root, min_tags=3), LocalStorage(tmp_path / "s"), tmp_path / "w")

    config = tiny_config(root, tmp_path / "s", tmp_path / "w")
    path = write_config(config, tmp_path / "trainer.json")
    assert cli.main(["prepare", "--config", str(path)]) == EXIT_CONFIG_ERROR


def test_empty_subset_is_a_config_error(tmp_path: Path) -> None:
    data = make_mtat_tree(tmp_path / "mtat", clips=4)
    spec = _spec(data.root, proxy_tags=["dance", "chill", "soulful"], min_tags=2)
    with pytest.raises(EmptySubsetError, match="fewer than 2 of the proxy tags"):
        prepare_dataset(spec, LocalStorage(tmp_path / "s"), tmp_path / "w")


def test_unreadable_and_missing_audio_are_skipped_and_reported(tmp_path: Path) -> None:
    data = make_mtat_tree(tmp_path / "mtat", clips=12)
    data.paths["101"].write_bytes(b"this is not audio at all" * 40)
    data.paths["102"].write_bytes(b"")
    data.paths["103"].unlink()
    storage = LocalStorage(tmp_path / "storage")
    prepared = prepare_dataset(_spec(data.root), storage, tmp_path / "work")

    assert [e.id for e in prepared.entries] == [c for c in data.clip_ids if c not in {"101", "102", "103"}]
    report = json.loads(storage.read_text(REPORT_KEY))
    assert report["skippedByReason"] == {"missing file": 1, "unreadable audio": 2}
    reasons = {s["id"]: s["reason"] for s in report["skipped"]}
    assert "file is empty" in reasons["102"] and "not a readable audio file" in reasons["101"]
    assert reasons["103"] == "missing file"

    with pytest.raises(UnreadableAudioError, match="not a readable audio file"):
        decode_audio(data.paths["101"])

    for clip in data.clip_ids:
        if data.paths[clip].exists():
            data.paths[clip].write_bytes(b"garbage")
    with pytest.raises(EmptySubsetError, match="unreadable audio"):
        prepare_dataset(_spec(data.root), storage, tmp_path / "work", reuse=False)


def test_rerun_verifies_recorded_checksums(tmp_path: Path) -> None:
    data = make_mtat_tree(tmp_path / "mtat", clips=6)
    storage = LocalStorage(tmp_path / "storage")
    prepared = prepare_dataset(_spec(data.root), storage, tmp_path / "work")
    entry = prepared.entries[0]
    fetcher = AudioFetcher(tmp_path / "work")
    assert verify_entry(entry, fetcher) == data.paths[entry.id]

    # a rewrite that keeps the file's size and mtime slips past the identity check (size +
    # mtime_ns): the manifest is reused, and verifying the recorded digests catches it
    path = data.paths[entry.id]
    before = path.stat()
    sf.write(str(path), synth_clip(99, entry.duration), 16000, format="WAV")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    with pytest.raises(ChecksumMismatchError, match=f"clip {entry.id}"):
        prepare_dataset(_spec(data.root), storage, tmp_path / "work", verify_reused=True)
    with pytest.raises(ChecksumMismatchError, match="changed since the manifest"):
        verify_entry(entry, fetcher)
    # an ordinary rewrite changes the identity: that file is prepared again (test_incremental.py)
    sf.write(str(path), synth_clip(99, 1.0), 16000, format="WAV")
    again = prepare_dataset(_spec(data.root), storage, tmp_path / "work", verify_reused=True)
    assert not again.reused and again.report["files"]["changed"] == 1
    assert {e.id: e.sha256 for e in again.entries}[entry.id] == sha256_file(path)


def test_generic_manifest(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "data", clips=5)
    spec = DatasetSpec(source=DatasetSource.manifest, uri=str(manifest), validation_fraction=0.3)
    storage = LocalStorage(tmp_path / "storage")
    prepared = prepare_dataset(spec, storage, tmp_path / "work")
    assert len(prepared.entries) == 5
    first = prepared.entries[0]
    assert first.audio == str(tmp_path / "data" / "audio" / "clip-0.wav")
    assert first.bpm == 112 and first.key == "A minor" and first.tags == ("amapiano", "log drum")
    assert first.description == "deep amapiano groove number 0 with log drums"
    assert {e.split for e in prepared.entries} == {"train", "validation"}

    manifest.write_text(manifest.read_text() + '{"audio": "audio/clip-0.wav"}\n')
    with pytest.raises(ManifestFormatError, match="line 6: 'description' is required"):
        prepare_dataset(spec, storage, tmp_path / "work", reuse=False)


def test_mp3_clips_decode(tmp_path: Path) -> None:
    try:
        data = make_mtat_tree(tmp_path / "mtat", clips=2, mp3_clips=2, seconds=(1.5,))
    except (sf.LibsndfileError, TypeError, ValueError) as exc:  # pragma: no cover
        pytest.skip(f"libsndfile cannot write MP3 here: {exc}")
    path = data.paths["100"]
    assert path.suffix == ".mp3"
    wav, rate = decode_audio(path)
    assert rate == 16000 and wav.shape[0] == 1
    assert abs(wav.shape[1] / rate - 1.5) < 0.1
    assert np.abs(wav).max() > 0.1
    assert probe_audio(path).sample_rate == 16000


def test_dataset_from_s3(tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():  # AWS_ENDPOINT_URL_S3, credentials, region
        monkeypatch.setenv(name, value)
    data = make_mtat_tree(tmp_path / "mtat", clips=6)
    bucket = s3_server.make_bucket("trainer-dataset")
    source = open_storage(f"s3://{bucket}/datasets/mtat")
    for path in sorted(p for p in data.root.rglob("*") if p.is_file()):
        source.upload_file(path, path.relative_to(data.root).as_posix())
    storage = open_storage(f"s3://{bucket}/runs/r")
    work = tmp_path / "work"
    prepared = prepare_dataset(DatasetSpec(uri=source.uri), storage, work)

    assert len(prepared.entries) == 6
    first = prepared.entries[0]
    assert first.audio.startswith(f"s3://{bucket}/datasets/mtat/mp3/")
    assert first.sha256 == sha256_file(data.paths[first.id])
    assert storage.exists(MANIFEST_KEY) and storage.exists(REPORT_KEY)
    local = AudioFetcher(work).local(first.audio)  # downloaded once, under the work dir
    assert local.is_relative_to(work) and sha256_file(local) == first.sha256
