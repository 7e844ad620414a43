"""The checkpoint store: atomic layout, verification, skipping broken checkpoints, keep-N."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fermata_trainer.checkpoints import CheckpointStore
from fermata_trainer.storage import LocalStorage, S3Storage, Storage, make_s3_client, sha256_bytes
from tests.s3_fixture import S3Server

pytestmark = pytest.mark.trainer


def _files(tmp_path: Path, step: int) -> dict[str, Path]:
    folder = tmp_path / f"staging-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, size in (("lm.pt", 3000), ("optimizer.pt", 5000), ("state.pt", 200)):
        path = folder / name
        path.write_bytes(bytes((step * 31 + i) % 251 for i in range(size)))
        out[name] = path
    return out


def _write(store: CheckpointStore, tmp_path: Path, step: int, prune: bool = True) -> None:
    store.write(step, step // 10, "periodic", _files(tmp_path, step))
    if prune:
        store.prune()


def _flip_byte(storage: Storage, key: str) -> None:
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(data))  # same size, different digest


def _exercise_store(storage: Storage, tmp_path: Path) -> None:
    store = CheckpointStore(storage, keep_last=2, local_dir=tmp_path / "local")
    ref = store.write(10, 1, "periodic", _files(tmp_path, 10))
    manifest_key = "checkpoints/step-000000010/manifest.json"
    manifest = json.loads(storage.read_text(manifest_key))
    assert ref.uri == storage.uri_of(manifest_key)
    assert ref.digest == f"sha256:{sha256_bytes(storage.get_bytes(manifest_key))}"
    assert ref.step == 10 and ref.epoch == 1 and ref.reason == "periodic"
    assert sorted(o["name"] for o in manifest["objects"]) == ["lm.pt", "optimizer.pt", "state.pt"]
    for obj in manifest["objects"]:
        data = storage.get_bytes(f"checkpoints/step-000000010/{obj['name']}")
        assert obj["sha256"] == sha256_bytes(data) and obj["size"] == len(data)

    for step in (20, 30, 40):
        _write(store, tmp_path, step)
    assert store.steps() == [40, 30]  # keep-N

    # a fresh process (new store) sees the same: latest = newest verified
    fresh = CheckpointStore(storage, keep_last=2, local_dir=tmp_path / "local2")
    latest = fresh.latest_verified()
    assert latest is not None and latest.step == 40
    assert latest.files["lm.pt"].read_bytes() == _files(tmp_path, 40)["lm.pt"].read_bytes()

    # digest mismatch in the newest → skipped for the previous good one
    _flip_byte(storage, "checkpoints/step-000000040/optimizer.pt")
    fresh = CheckpointStore(storage, keep_last=2, local_dir=tmp_path / "local3")
    latest = fresh.latest_verified()
    assert latest is not None and latest.step == 30
    assert 40 in fresh.known_bad

    # half-written (objects, no manifest) and missing-object checkpoints are skipped too
    for name, path in _files(tmp_path, 50).items():
        storage.upload_file(path, f"checkpoints/step-000000050/{name}")
    store.write(60, 6, "signal", _files(tmp_path, 60))
    storage.delete("checkpoints/step-000000060/state.pt")
    fresh = CheckpointStore(storage, keep_last=2, local_dir=tmp_path / "local4")
    assert fresh.steps() == [60, 50, 40, 30]
    latest = fresh.latest_verified()
    assert latest is not None and latest.step == 30

    # pruning with keep 1 from a process that has only just looked: the corrupt 40 passes the
    # cheap size check, but the newest *verified* checkpoint (30) must survive
    fresh = CheckpointStore(storage, keep_last=1, local_dir=tmp_path / "local5")
    fresh.prune()
    remaining = fresh.steps()
    assert 30 in remaining and 40 not in remaining
    fresh.write(70, 7, "periodic", _files(tmp_path, 70))
    fresh.prune()
    assert fresh.steps() == [70]
    assert fresh.resolve_resume(None) is not None

    # resume_from names a checkpoint: used when it verifies, else the latest
    store2 = CheckpointStore(storage, keep_last=3, local_dir=tmp_path / "local6")
    store2.write(80, 8, "request", _files(tmp_path, 80))
    chosen = store2.resolve_resume(store2.manifest_uri(70))
    assert chosen is not None and chosen.step == 70
    _flip_byte(storage, "checkpoints/step-000000070/lm.pt")
    chosen = CheckpointStore(storage, 3, tmp_path / "local7").resolve_resume(
        storage.uri_of("checkpoints/step-000000070")
    )
    assert chosen is not None and chosen.step == 80


def test_local_checkpoint_store(tmp_path: Path) -> None:
    _exercise_store(LocalStorage(tmp_path / "storage"), tmp_path)


def test_s3_checkpoint_store(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("trainer-checkpoints")
    client = make_s3_client(
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    _exercise_store(S3Storage(bucket, "runs/r1", client=client), tmp_path)


def _exercise_timing(storage: Storage, tmp_path: Path) -> None:
    store = CheckpointStore(storage, keep_last=2, local_dir=tmp_path / "local")
    ref = store.write(10, 1, "signal", _files(tmp_path, 10), serialize_seconds=1.25)
    manifest = json.loads(storage.read_text("checkpoints/step-000000010/manifest.json"))
    # what the operator holds against the grace period: serialising plus the whole upload
    assert manifest["sizeBytes"] == ref.size_bytes == 3000 + 5000 + 200
    assert manifest["serializeSeconds"] == 1.25
    assert manifest["uploadSeconds"] >= 0
    assert manifest["durationSeconds"] == pytest.approx(1.25 + manifest["uploadSeconds"], abs=0.002)
    # the ref counts the manifest's own upload too, so it is never shorter than the manifest says
    assert ref.duration_seconds is not None
    assert manifest["durationSeconds"] <= ref.duration_seconds < 1.25 + 30
    wire = ref.wire()
    assert wire["durationSeconds"] == ref.duration_seconds and wire["sizeBytes"] == 8200
    # resumed in a fresh process: the figures come back from the manifest
    verified = CheckpointStore(storage, 2, tmp_path / "fresh").resolve_resume(
        ref.uri, expected_digest=ref.digest
    )
    assert verified is not None
    assert verified.ref.duration_seconds == manifest["durationSeconds"]
    assert verified.ref.size_bytes == 8200


def test_checkpoint_records_duration_and_size_local(tmp_path: Path) -> None:
    _exercise_timing(LocalStorage(tmp_path / "storage"), tmp_path)


def test_checkpoint_records_duration_and_size_s3(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("trainer-checkpoint-timing")
    client = make_s3_client(
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    _exercise_timing(S3Storage(bucket, "runs/r1", client=client), tmp_path)


@pytest.mark.parametrize("recorded", [None, "not a number", -3.0])
def test_a_manifest_without_timings_still_resolves(tmp_path: Path, recorded: object) -> None:
    """A checkpoint written before durations were recorded (or with a nonsense one) still
    verifies and resumes: its duration is unknown, its size is what its objects add up to."""
    storage = LocalStorage(tmp_path / "storage")
    store = CheckpointStore(storage, keep_last=2, local_dir=tmp_path / "local")
    store.write(20, 2, "periodic", _files(tmp_path, 20))
    key = "checkpoints/step-000000020/manifest.json"
    old = json.loads(storage.read_text(key))
    for field in ("sizeBytes", "serializeSeconds", "uploadSeconds", "durationSeconds"):
        del old[field]
    if recorded is not None:
        old["durationSeconds"] = recorded
    body = json.dumps(old, indent=2, sort_keys=True).encode()
    storage.put_bytes(key, body)

    fresh = CheckpointStore(storage, keep_last=2, local_dir=tmp_path / "fresh")
    verified = fresh.resolve_resume(fresh.manifest_uri(20), expected_digest=f"sha256:{sha256_bytes(body)}")
    assert verified is not None and verified.step == 20
    assert verified.ref.duration_seconds is None
    assert verified.ref.size_bytes == 8200
    assert "durationSeconds" not in verified.ref.wire()
    latest = CheckpointStore(storage, 2, tmp_path / "latest").latest_verified()
    assert latest is not None and latest.ref.duration_seconds is None
