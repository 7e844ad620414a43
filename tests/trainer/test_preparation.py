"""``fermata-train prepare --tokenize`` (the preparation pod) and the training pod that requires
its verified dataset (spec.preparation.mode Pod), on the CPU with the tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from fermata_api import PodEnv, PreparationState, PreparationStatus, TrainerStatus
from fermata_trainer.codes_cache import CodesCache
from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.model_loading import build_tiny_musicgen
from fermata_trainer.preparation import Preparer
from fermata_trainer.training_loop import Trainer
from tests.trainer.conftest import ConfigFactory


class Recorder:
    """A reporter that keeps every report; it can stop the preparer once it tokenized a few."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.reports: list[Any] = []
        self.stop_after = stop_after
        self.preparer: Preparer | None = None

    def report(self, status: TrainerStatus | PreparationStatus) -> dict[str, Any] | None:
        self.reports.append(status)
        if isinstance(status, PreparationStatus) and self.stop_after is not None and self.preparer:
            prep = status.preparation
            if prep.state is PreparationState.tokenizing and prep.files_done >= self.stop_after:
                self.preparer.signal_received = "SIGTERM"
        return {}

    def close(self) -> None:
        return None

    def states(self) -> list[PreparationState]:
        return [r.preparation.state for r in self.reports if isinstance(r, PreparationStatus)]


def test_prepare_tokenize_stops_on_sigterm_and_the_next_pod_resumes(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config()
    first = Recorder(stop_after=3)
    preparer = Preparer(config, PodEnv(pod_name="r-prep-0"), first, heartbeat_seconds=0.001)
    first.preparer = preparer
    assert preparer.run() == 0
    assert first.states()[-1] is PreparationState.stopped
    stopped = preparer.report
    assert 3 <= stopped.files_done < stopped.files_total and stopped.tokenized == stopped.files_done

    shutil.rmtree(tmp_path / "work")  # the next pod has a fresh scratch volume: only the mirror
    second = Recorder()
    again = Preparer(config, PodEnv(pod_name="r-prep-1"), second, heartbeat_seconds=0.001)
    assert again.run() == 0
    done = again.report
    assert second.states()[-1] is PreparationState.completed
    assert done.pod_name == "r-prep-1" and done.files_done == done.files_total
    assert done.reused >= stopped.files_done and done.tokenized == done.files_total - done.reused
    assert done.manifest_digest and done.codes_key and done.finished_at is not None

    # The training pod (mode Pod) finds exactly that dataset, or says what is wrong.
    model = build_tiny_musicgen(seed=0)
    trainer = Trainer(
        config, PodEnv(prepared_manifest_digest=done.manifest_digest, prepared_codes_key=done.codes_key)
    )
    cache = CodesCache(
        model, done.manifest_digest, config.dataset.segment_seconds, tmp_path / "gpu-work", _mirror(config)
    )
    codes = trainer._load_prepared(cache, done.manifest_digest)
    assert codes is not None and codes.key == done.codes_key and len(codes.train) > 0
    wrong = Trainer(
        config, PodEnv(prepared_manifest_digest="sha256:other", prepared_codes_key=done.codes_key)
    )
    with pytest.raises(TrainerConfigError, match="dataset changed after its preparation pod verified it"):
        wrong._load_prepared(cache, done.manifest_digest)
    other = Trainer(config, PodEnv(prepared_codes_key="0" * 32))
    with pytest.raises(TrainerConfigError, match="not the prepared and verified"):
        other._load_prepared(cache, done.manifest_digest)
    assert Trainer(config, PodEnv())._load_prepared(cache, done.manifest_digest) is None  # mode Trainer


def _mirror(config: Any) -> Any:
    from fermata_trainer.preparation import codes_mirror
    from fermata_trainer.storage import open_storage

    return codes_mirror(config, open_storage(config.storage.checkpoints))


def test_musicgen_small_prepares_with_its_compression_model_only_and_trains_on_that(
    make_config: ConfigFactory, tmp_path: Path, miniature: Any
) -> None:
    """The preparation pod loads only EnCodec (no LM): its code cache key is the one the training
    pod, loading the whole MusicGen, computes — so the training pod uses it and tokenizes nothing."""
    import json
    import subprocess
    import sys

    from fermata_dev.hub import MUSICGEN_SMALL, MiniatureHub
    from tests.trainer.helpers import log_events, run_trainer, trainer_env, write_config

    home = tmp_path / "hf"
    shutil.copytree(miniature.hf_home, home, symlinks=True)
    hub = MiniatureHub(home, miniature.spec, dict(miniature.revisions))
    config = make_config(max_steps=2, evaluate_every=1000, checkpoint_every=1000)
    config.model.base = MUSICGEN_SMALL
    path = write_config(config, tmp_path / "trainer.json")
    prep = subprocess.run(
        [sys.executable, "-m", "fermata_trainer.cli", "prepare", "--tokenize", "--config", str(path)],
        env=trainer_env(hub.env()),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    assert log_events(prep.stdout, "compression_model_loading") and not log_events(
        prep.stdout, "model_loaded"
    )
    done = log_events(prep.stdout, "preparation_completed")[0]
    shutil.rmtree(tmp_path / "work")
    env = {
        **hub.env(),
        "FERMATA_PREPARED_MANIFEST_DIGEST": done["manifest"],
        "FERMATA_PREPARED_CODES_KEY": done["codes"],
    }
    result = run_trainer(path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert log_events(result.stdout, "prepared_dataset_loaded")
    assert not log_events(result.stdout, "codes_cache_built")
    # the preparation pod mirrored the model: the training pod restored it from the run's storage
    assert json.loads((tmp_path / "storage" / "model" / "mirror.json").read_text())["base"] == MUSICGEN_SMALL
