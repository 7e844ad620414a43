"""Incremental preparation: per-file codes, data-aware manifest reuse, resumable tokenizing.

Real parts throughout: the tiny audiocraft model (``tiny://seed=0``), audio written with
soundfile, local folders and the S3 server fixture as mirrors; decodes are counted by
:func:`fermata_trainer.audio_io.decode_count`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from fermata_api import DatasetSource, DatasetSpec
from fermata_dev.synthetic import SyntheticMtat, make_manifest, make_mtat_tree, synth_clip
from fermata_trainer.audio_io import decode_count
from fermata_trainer.codes_cache import CLIPS_DIR, CodesCache, CodesDataset
from fermata_trainer.dataset import FILES_KEY, REPORT_KEY, AudioFetcher, PreparedDataset, prepare_dataset
from fermata_trainer.model_loading import LoadedModel, build_tiny_musicgen
from fermata_trainer.storage import LocalStorage, Storage, open_storage, sha256_file
from tests.s3_fixture import S3Server

pytestmark = pytest.mark.trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return build_tiny_musicgen(seed=0)


class Interrupted(Exception):
    """Stands in for the pod going away part way through tokenizing."""


def _prepare(spec: DatasetSpec, storage: Storage, work: Path) -> tuple[PreparedDataset, int]:
    """The prepared dataset and how many files preparing it decoded."""
    before = decode_count()
    prepared = prepare_dataset(spec, storage, work)
    return prepared, decode_count() - before


def _build(
    model: LoadedModel, prepared: PreparedDataset, work: Path, mirror: Storage | None, seconds: float = 1.0
) -> tuple[CodesDataset, int]:
    """The codes of ``prepared`` and how many files building them decoded."""
    cache = CodesCache(model, prepared.manifest_digest, seconds, work / "codes", mirror)
    before = decode_count()
    codes = cache.build(prepared.entries, AudioFetcher(work), CPU)
    return codes, decode_count() - before


def _write_manifest(source: Path, lines: list[str]) -> None:
    source.write_text("".join(f"{line}\n" for line in lines))


def test_grown_collection_tokenizes_only_the_new_files(tmp_path: Path, model: LoadedModel) -> None:
    manifest = make_manifest(tmp_path / "data", clips=9)
    lines = manifest.read_text().splitlines()
    _write_manifest(manifest, lines[:6])
    spec = DatasetSpec(source=DatasetSource.manifest, uri=str(manifest), validation_fraction=0.3)
    storage, work, mirror = (
        LocalStorage(tmp_path / "storage"),
        tmp_path / "work",
        LocalStorage(tmp_path / "m"),
    )

    first, decoded = _prepare(spec, storage, work)
    assert decoded == 6 and first.report["files"] == {"new": 6, "reused": 0, "changed": 0, "removed": 0}
    codes, decoded = _build(model, first, work, mirror)
    assert decoded == 6 and codes.stats is not None and codes.stats.tokenized == 6

    _write_manifest(manifest, lines)  # three more files listed; the six are untouched
    grown, decoded = _prepare(spec, storage, work)
    assert decoded == 3, "only the new files are decoded and hashed"
    assert grown.report["files"] == {"new": 3, "reused": 6, "changed": 0, "removed": 0}
    assert json.loads(storage.read_text(REPORT_KEY))["files"]["new"] == 3
    assert not grown.reused and grown.manifest_digest != first.manifest_digest
    assert {e.id: e.sha256 for e in first.entries}.items() <= {e.id: e.sha256 for e in grown.entries}.items()

    more, decoded = _build(model, grown, work, mirror)
    assert decoded == 3 and more.stats is not None
    assert more.stats.as_dict() == {
        "clips": 9,
        "tokenized": 3,
        "reused": 6,
        "reusedLocal": 6,
        "reusedMirror": 0,
    }
    assert more.key != codes.key and len(more.train) + len(more.validation) == 9 * 2  # 1.5 s: 2 segments
    assert len(mirror.list(CLIPS_DIR)) == 9  # one object per file, each uploaded once encoded

    # nothing changed: the manifest is reused as it is, and nothing is decoded
    same, decoded = _prepare(spec, storage, work)
    assert same.reused and decoded == 0 and same.manifest_digest == grown.manifest_digest
    assert same.report["files"] == {"new": 0, "reused": 9, "changed": 0, "removed": 0}


def test_changed_file_is_rehashed_and_retokenized(
    tmp_path: Path, mtat: SyntheticMtat, model: LoadedModel
) -> None:
    spec = DatasetSpec(uri=str(mtat.root), segment_seconds=1.0)
    storage, work = LocalStorage(tmp_path / "storage"), tmp_path / "work"
    first, _ = _prepare(spec, storage, work)
    _build(model, first, work, None)

    changed = first.entries[3]
    path = mtat.paths[changed.id]
    sf.write(str(path), synth_clip(77, 2.0), 16000, format=path.suffix[1:].upper())  # same name
    second, decoded = _prepare(spec, storage, work)
    assert decoded == 1
    assert second.report["files"] == {"new": 0, "reused": 11, "changed": 1, "removed": 0}
    after = {e.id: e for e in second.entries}[changed.id]
    assert after.sha256 == sha256_file(path) != changed.sha256 and after.duration == 2.0
    assert second.manifest_digest != first.manifest_digest

    codes, decoded = _build(model, second, work, None)
    assert decoded == 1 and codes.stats is not None and codes.stats.tokenized == 1
    assert codes.stats.reused_local == 11
    segments = [c for c in codes.train.clip_ids + codes.validation.clip_ids if c == changed.id]
    assert len(segments) == 2  # the new 2.0 s content, not the old clip's


def test_removed_file_is_reported(tmp_path: Path, mtat: SyntheticMtat, model: LoadedModel) -> None:
    spec = DatasetSpec(uri=str(mtat.root), segment_seconds=1.0)
    storage, work = LocalStorage(tmp_path / "storage"), tmp_path / "work"
    first, _ = _prepare(spec, storage, work)
    _build(model, first, work, None)

    gone = first.entries[0]
    mtat.paths[gone.id].unlink()  # still listed by annotations_final.csv, but no file
    second, decoded = _prepare(spec, storage, work)
    assert decoded == 0
    assert second.report["files"] == {"new": 0, "reused": 11, "changed": 0, "removed": 1}
    assert second.report["skippedByReason"] == {"missing file": 1}
    assert gone.id not in {e.id for e in second.entries}
    assert gone.audio not in json.loads(storage.read_text(FILES_KEY))["files"]

    codes, decoded = _build(model, second, work, None)  # a new manifest, but every clip's codes exist
    assert decoded == 0 and codes.stats is not None and codes.stats.tokenized == 0
    assert gone.id not in set(codes.train.clip_ids + codes.validation.clip_ids)


def test_interrupted_build_resumes_at_the_next_file(
    tmp_path: Path, mtat: SyntheticMtat, model: LoadedModel
) -> None:
    spec = DatasetSpec(uri=str(mtat.root), segment_seconds=1.0)
    storage, work = LocalStorage(tmp_path / "storage"), tmp_path / "work"
    mirror = LocalStorage(tmp_path / "mirror")
    prepared, _ = _prepare(spec, storage, work)
    cache = CodesCache(model, prepared.manifest_digest, 1.0, work / "codes", mirror)
    seen: list[tuple[int, int]] = []

    def pod_goes_away(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 5:
            raise Interrupted

    before = decode_count()
    with pytest.raises(Interrupted):
        cache.build(prepared.entries, AudioFetcher(work), CPU, progress=pod_goes_away)
    assert decode_count() - before == 5 and seen[-1] == (5, 12)
    assert cache.load() is None  # nothing assembled: the index is written last
    assert len(mirror.list(CLIPS_DIR)) == 5  # the five encoded files are kept, mirrored too

    # a damaged object is not trusted: a damaged local copy comes from the mirror again; one
    # damaged in both places is encoded again
    local_objects = sorted((work / "codes" / CLIPS_DIR).rglob("*.pt"))
    for damaged in (
        local_objects[0],
        local_objects[1],
        mirror.root / CLIPS_DIR / local_objects[1].parent.name / local_objects[1].name,
    ):
        damaged.write_bytes(damaged.read_bytes()[:100])
    seen.clear()
    resumed = CodesCache(model, prepared.manifest_digest, 1.0, work / "codes", mirror)
    before = decode_count()
    codes = resumed.build(
        prepared.entries, AudioFetcher(work), CPU, progress=lambda d, t: seen.append((d, t))
    )
    assert decode_count() - before == 12 - 5 + 1
    assert resumed.stats is not None and resumed.stats.tokenized == 8
    assert (resumed.stats.reused_local, resumed.stats.reused_mirror) == (3, 1)
    assert seen[-1] == (12, 12) and len(seen) == 12  # progress counts reused files too

    fresh, _ = _build(model, prepared, tmp_path / "fresh", None)
    assert torch.equal(codes.train.codes, fresh.train.codes)  # resumed = built in one go
    assert torch.equal(codes.validation.masks, fresh.validation.masks)


def test_mirror_shares_clip_codes_between_work_dirs(
    tmp_path: Path, s3_server: S3Server, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    data = make_mtat_tree(tmp_path / "mtat", clips=6)
    bucket = s3_server.make_bucket("incremental")
    source = open_storage(f"s3://{bucket}/datasets/mtat")
    for path in sorted(p for p in data.root.rglob("*") if p.is_file()):
        source.upload_file(path, path.relative_to(data.root).as_posix())
    spec = DatasetSpec(uri=source.uri, segment_seconds=1.0)
    storage, mirror = open_storage(f"s3://{bucket}/runs/r"), open_storage(f"s3://{bucket}/code-cache")

    prepared, _ = _prepare(spec, storage, tmp_path / "pod-1")
    built, decoded = _build(model, prepared, tmp_path / "pod-1", mirror)
    assert decoded == 6 and len(mirror.list(CLIPS_DIR)) == 6

    # another pod, another segment length: the assembled segments differ, the clips' codes do not
    again, decoded = _prepare(spec, storage, tmp_path / "pod-2")
    assert again.reused and decoded == 0  # listing: every object's size and ETag unchanged
    other, decoded = _build(model, again, tmp_path / "pod-2", mirror, seconds=2.0)
    assert decoded == 0 and other.stats is not None and other.stats.reused_mirror == 6
    assert other.key != built.key and other.segment_frames == 2 * built.segment_frames

    # an object replaced in S3 (new ETag) is prepared and tokenized again, the rest reused
    changed = prepared.entries[1]
    replacement = tmp_path / "replacement.wav"
    sf.write(str(replacement), synth_clip(55, 1.0), 16000, format="WAV")
    source.upload_file(replacement, changed.audio.removeprefix(source.uri + "/"))
    third, decoded = _prepare(spec, storage, tmp_path / "pod-3")
    assert decoded == 1 and third.report["files"] == {"new": 0, "reused": 5, "changed": 1, "removed": 0}
    codes, decoded = _build(model, third, tmp_path / "pod-3", mirror)
    assert decoded == 1 and codes.stats is not None
    assert (codes.stats.tokenized, codes.stats.reused_mirror) == (1, 5)
