"""The training loop in-process on the CPU with the tiny MusicGen: loss, evaluation, resume, S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch

from fermata_api import TrainerState
from fermata_dev.synthetic import SyntheticMtat
from fermata_trainer.audio_io import decode_count
from fermata_trainer.evaluation import reference_from_uri
from fermata_trainer.reporter import NullReporter
from fermata_trainer.storage import LocalStorage, Storage
from fermata_trainer.training_loop import Trainer
from tests.s3_fixture import S3Server
from tests.trainer.conftest import ConfigFactory

pytestmark = pytest.mark.trainer


def _flip_byte(storage: Storage, key: str) -> None:
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(data))


def _checkpoint_steps(storage: Storage) -> list[int]:
    """Steps that have a manifest."""
    return sorted(
        int(o.key.split("/")[1].removeprefix("step-"))
        for o in storage.list("checkpoints/")
        if o.key.endswith("/manifest.json")
    )


def test_loss_falls_and_run_leaves_its_artifacts(tmp_path: Path, make_config: ConfigFactory) -> None:
    config = make_config(max_steps=40, evaluate_every=20, checkpoint_every=15, keep_last=1)
    reporter = NullReporter()
    outcome = Trainer(config, reporter=reporter).run()

    assert outcome.state is TrainerState.completed and outcome.exit_code == 0
    assert outcome.step == outcome.total_steps == 40
    losses = outcome.losses
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)

    storage = LocalStorage(tmp_path / "storage")
    ckpt = outcome.last_checkpoint
    assert ckpt is not None and ckpt.step == 40 and ckpt.reason == "final"
    assert ckpt.digest.startswith("sha256:") and ckpt.uri.endswith("step-000000040/manifest.json")
    assert _checkpoint_steps(storage) == [40]  # keep 1: periodic 15 and 30 were pruned
    manifest = json.loads(storage.read_text("checkpoints/step-000000040/manifest.json"))
    assert manifest["serializeSeconds"] > 0  # torch.save of the state, timed by the trainer
    assert ckpt.duration_seconds is not None and ckpt.duration_seconds >= manifest["durationSeconds"]
    assert ckpt.size_bytes == manifest["sizeBytes"] == sum(o["size"] for o in manifest["objects"])
    metrics = json.loads(storage.read_text("checkpoints/step-000000040/metrics.json"))
    evaluations = metrics["evaluations"]
    assert [e["step"] for e in evaluations] == [0, 20, 40]
    baseline = metrics["baselineValidationLoss"]
    assert baseline == evaluations[0]["validationLoss"]
    assert evaluations[-1]["validationLoss"] < baseline - 0.3

    for step in (0, 20, 40):
        summary = json.loads(storage.read_text(f"samples/step-{step:09d}/samples.json"))
        assert summary["samples"][0]["prompt"] == "deep amapiano with log drums"
        assert storage.exists(f"samples/step-{step:09d}/sample-00.wav")
    assert any(o.key.startswith("tensorboard/events.out.tfevents") for o in storage.list())
    report = json.loads(storage.read_text("dataset/report.json"))
    assert report["kept"] == 12
    assert reporter.reports >= 6  # start, evaluations, checkpoints, end


def test_resume_skips_corrupt_checkpoint_and_replays_exactly(
    tmp_path: Path, make_config: ConfigFactory
) -> None:
    first = Trainer(make_config(max_steps=10, checkpoint_every=5, keep_last=3)).run()
    storage = LocalStorage(tmp_path / "storage")
    assert _checkpoint_steps(storage) == [5, 10]
    _flip_byte(storage, "checkpoints/step-000000010/lm.pt")

    second = Trainer(make_config(max_steps=10, checkpoint_every=5, keep_last=3)).run()
    assert second.step == 10
    # resumed from step 5 (10 is corrupt): steps 6-10 recomputed exactly as the first time
    assert second.losses == first.losses  # history restored + steps 6-10 replayed bitwise on CPU
    assert _checkpoint_steps(storage) == [5, 10]
    rewritten = json.loads(storage.read_text("checkpoints/step-000000010/manifest.json"))
    assert rewritten["reason"] == "periodic"  # the corrupt one was replaced by a fresh write


def test_evaluation_scores_authenticity(tmp_path: Path, make_config: ConfigFactory) -> None:
    config = make_config(max_steps=2, segment_seconds=2.0, clip_seconds=2.0)
    outcome = Trainer(config).run()
    assert outcome.state is TrainerState.completed
    storage = LocalStorage(tmp_path / "storage")
    summary = json.loads(storage.read_text("samples/step-000000002/samples.json"))
    scores = summary["authenticity"]
    assert scores is not None, summary.get("note")
    assert 0.0 <= scores["score"] <= 1.0
    assert {"tempo", "log_drum", "distribution"} <= set(scores["components"])
    path = tmp_path / "sample.wav"
    path.write_bytes(storage.get_bytes("samples/step-000000002/sample-00.wav"))
    info = sf.info(str(path))
    assert info.samplerate == 16000 and abs(info.duration - 2.0) < 0.1


def test_training_on_s3_resumes_in_a_fresh_pod(
    tmp_path: Path,
    s3_server: S3Server,
    mtat: SyntheticMtat,
    make_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket("trainer-run")
    uri = f"s3://{bucket}/runs/tiny"
    first = Trainer(
        make_config(storage=uri, work_dir=tmp_path / "pod-0", max_steps=6, checkpoint_every=3, keep_last=1)
    ).run()
    assert first.last_checkpoint is not None
    assert first.last_checkpoint.uri == f"{uri}/checkpoints/step-000000006/manifest.json"
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    prefix = "runs/tiny/"
    assert f"{prefix}checkpoints/step-000000006/manifest.json" in keys
    assert not any("step-000000003" in k and "checkpoints" in k for k in keys)  # pruned
    assert f"{prefix}dataset/manifest.jsonl" in keys
    assert f"{prefix}samples/step-000000000/samples.json" in keys
    assert any(k.startswith(f"{prefix}cache/") and k.endswith("index.json") for k in keys)
    assert any(k.startswith(f"{prefix}tensorboard/") for k in keys)

    # a new pod: empty work dir, no audio — codes come from the S3 mirror, weights from S3
    shutil.rmtree(mtat.root / "mp3")
    decoded = decode_count()
    second = Trainer(
        make_config(storage=uri, work_dir=tmp_path / "pod-1", max_steps=8, checkpoint_every=3, keep_last=1)
    ).run()
    assert decode_count() == decoded
    assert second.step == 8 and second.losses[:6] == first.losses
    assert second.last_checkpoint is not None and second.last_checkpoint.step == 8


def test_a_resumed_run_keeps_its_data_and_a_new_run_sees_the_change(
    tmp_path: Path, mtat: SyntheticMtat, make_config: ConfigFactory
) -> None:
    """A run's data is fixed once it has trained: a file changed under it does not change what
    the resumed pod trains on (exact replay), while the next run at a new path prepares again."""
    storage = tmp_path / "storage"
    first = Trainer(make_config(storage=storage, max_steps=4, checkpoint_every=2)).run()
    assert first.last_checkpoint is not None
    digest = json.loads((storage / "dataset/report.json").read_text())["manifestDigest"]

    changed = mtat.paths[mtat.qualifying[0]]
    audio, rate = sf.read(str(changed), dtype="float32")
    sf.write(str(changed), audio[::-1].copy() * 0.5, rate)  # same name, other content

    decoded = decode_count()
    second = Trainer(
        make_config(storage=storage, work_dir=tmp_path / "pod-1", max_steps=6, checkpoint_every=2)
    ).run()
    assert decode_count() == decoded  # the manifest was pinned and the codes came from the mirror
    assert second.step == 6 and second.losses[:4] == first.losses
    assert json.loads((storage / "dataset/report.json").read_text())["manifestDigest"] == digest

    third = Trainer(
        make_config(storage=tmp_path / "next-run", work_dir=tmp_path / "pod-2", max_steps=1)
    ).run()
    report = json.loads((tmp_path / "next-run/dataset/report.json").read_text())
    assert third.step == 1
    assert report["manifestDigest"] != digest
    changed_entry = next(
        json.loads(line)
        for line in (tmp_path / "next-run/dataset/manifest.jsonl").read_text().splitlines()
        if json.loads(line)["id"] == mtat.qualifying[0]
    )
    assert (
        changed_entry["sha256"]
        != next(
            json.loads(line)
            for line in (storage / "dataset/manifest.jsonl").read_text().splitlines()
            if json.loads(line)["id"] == mtat.qualifying[0]
        )["sha256"]
    )


def test_reference_clips_from_a_folder(tmp_path: Path, mtat: SyntheticMtat) -> None:
    clips = reference_from_uri(str(mtat.root / "mp3"), 32000, tmp_path / "work", limit=5)
    assert len(clips) == 5
    assert all(c.ndim == 1 and c.dtype.name == "float32" and c.size > 32000 * 0.5 for c in clips)
