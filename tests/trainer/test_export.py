"""Exports: the fine-tuned model in audiocraft's release format, as status.artifacts names it.

Real parts throughout: the tiny MusicGen built by audiocraft's builders, trained by the real
loop, loaded back by ``MusicGen.get_pretrained`` and by a second run's ``model.base``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fermata_api import ArtifactRef, Artifacts, BestMetric, RunRef, TrainerState, TrainerStatus
from fermata_dev.synthetic import SyntheticMtat
from fermata_trainer.checkpoints import CheckpointStore
from fermata_trainer.evaluation import EvaluationResult
from fermata_trainer.export import (
    CARD_NAME,
    COMPRESSION_NAME,
    STATE_DICT_NAME,
    ExportContext,
    Exporter,
    ExportStore,
    improves,
)
from fermata_trainer.model_loading import build_tiny_musicgen, load_model
from fermata_trainer.reporter import NullReporter
from fermata_trainer.storage import LocalStorage, open_storage, sha256_bytes, sha256_file
from fermata_trainer.training_loop import Trainer
from tests.s3_fixture import S3Server
from tests.trainer.helpers import log_events, run_trainer, tiny_config, write_config

pytestmark = pytest.mark.trainer

STEPS = 20


class RecordingReporter(NullReporter):
    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[TrainerStatus] = []

    def report(self, status: TrainerStatus) -> dict[str, Any] | None:
        self.statuses.append(status.model_copy(deep=True))
        return super().report(status)


@dataclass
class FinishedRun:
    root: Path
    storage: LocalStorage
    trainer: Trainer
    reporter: RecordingReporter


def _export_steps(storage: LocalStorage) -> list[int]:
    """Steps with an export folder (card or not)."""
    return sorted({int(o.key.split("/")[1].removeprefix("step-")) for o in storage.list("exports/")})


def _card(uri: str) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((Path(uri) / CARD_NAME).read_text())
    return card


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory, shared_mtat: SyntheticMtat) -> FinishedRun:
    """A 20-step tiny run, evaluated every 5 steps, checkpoints every 5 with keepLast 1."""
    root = tmp_path_factory.mktemp("run-a")
    config = tiny_config(
        shared_mtat.root,
        root / "storage",
        root / "work",
        max_steps=STEPS,
        evaluate_every=5,
        checkpoint_every=5,
        keep_last=1,
    )
    reporter = RecordingReporter()
    trainer = Trainer(config, reporter=reporter)
    outcome = trainer.run()
    assert outcome.state is TrainerState.completed and outcome.step == STEPS
    return FinishedRun(root, LocalStorage(root / "storage"), trainer, reporter)


def test_final_export_loads_with_get_pretrained_and_generates(
    run_a: FinishedRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from audiocraft.models import MusicGen

    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    final = run_a.trainer.artifacts.final
    assert final is not None and final.step == STEPS
    folder = Path(final.uri)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_NAME, COMPRESSION_NAME, STATE_DICT_NAME])

    # audiocraft's release format, loadable with torch's default weights_only=True
    package = torch.load(folder / STATE_DICT_NAME, map_location="cpu")
    assert set(package) == {"best_state", "xp.cfg", "version", "exported"}
    assert isinstance(package["xp.cfg"], str) and package["exported"] is True
    floats = [v for v in package["best_state"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)

    musicgen = MusicGen.get_pretrained(str(folder), device="cpu")
    assert musicgen.sample_rate == 16000 and musicgen.frame_rate == 50
    # the trained weights (the final checkpoint's, float32), rounded to float16
    trained = torch.load(
        run_a.storage.local_path(f"checkpoints/step-{STEPS:09d}/lm.pt"), map_location="cpu", weights_only=True
    )
    loaded = musicgen.lm.state_dict()
    assert set(loaded) == set(trained)
    for name, value in trained.items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(loaded[name], expected), name

    duration = 0.4
    musicgen.set_generation_params(duration=duration, top_k=16)  # the tiny model has 64 bins
    torch.manual_seed(0)
    wav = musicgen.generate(["deep amapiano with log drums", "jazzy piano"])
    # int(duration × frame rate) = 20 frames of 16000 / 50 = 320 samples each
    frames = int(duration * musicgen.frame_rate)
    assert wav.shape == (2, 1, frames * 320) == (2, 1, round(duration * musicgen.sample_rate))
    assert torch.isfinite(wav).all()


def test_status_artifacts_name_the_best_export_and_the_superseded_are_gone(run_a: FinishedRun) -> None:
    trainer, storage = run_a.trainer, run_a.storage
    artifacts = trainer.artifacts
    best, final = artifacts.best, artifacts.final
    assert best is not None and final is not None

    # best: the evaluation (after step 0) with the lowest validation loss
    evaluated = {e["step"]: e["validationLoss"] for e in trainer.history if e["step"] > 0}
    assert sorted(evaluated) == [5, 10, 15, 20]
    best_step = min(evaluated, key=lambda s: evaluated[s])
    assert best.step == best_step and best.metric == "validationLoss"
    assert best.value == pytest.approx(evaluated[best_step])
    assert final.value == pytest.approx(evaluated[STEPS])

    # the digests are the cards' sha256, the cards list every file's sha256 and size
    for ref in (best, final):
        folder = Path(ref.uri)
        assert ref.uri == storage.uri_of(f"exports/step-{ref.step:09d}")
        assert ref.digest == f"sha256:{sha256_file(folder / CARD_NAME)}"
        card = _card(ref.uri)
        assert card["step"] == ref.step and card["baseModel"] == "tiny://seed=0"
        assert {f["name"]: (f["sha256"], f["size"]) for f in card["files"]} == {
            name: (sha256_file(folder / name), (folder / name).stat().st_size)
            for name in (STATE_DICT_NAME, COMPRESSION_NAME)
        }
        assert card["metrics"]["validationLoss"] == pytest.approx(evaluated[ref.step])
        assert card["metrics"]["baselineValidationLoss"] == trainer.baseline
        assert card["dataset"]["codesKey"] and card["dataset"]["manifestDigest"]
        assert card["model"]["textEncoders"] == [] and card["model"]["sampleRate"] == 16000
        assert card["cost"] is None  # no operator, no cost: not invented

    # every improvement was exported in its time; only the current best and final remain
    reported_best = [
        s.artifacts.best.step for s in run_a.reporter.statuses if s.artifacts and s.artifacts.best
    ]
    running_best, improvements = math.inf, []
    for step in sorted(evaluated):
        if evaluated[step] < running_best:
            running_best = evaluated[step]
            improvements.append(step)
    assert sorted(set(reported_best)) == improvements and len(improvements) >= 2
    assert _export_steps(storage) == sorted({best.step, final.step})
    # and status.artifacts went out with the completed report
    last = run_a.reporter.statuses[-1]
    assert last.progress.state is TrainerState.completed and last.artifacts == artifacts
    assert last.apply_body()["status"]["artifacts"]["best"]["digest"] == best.digest


def test_checkpoint_pruning_never_touches_exports(run_a: FinishedRun) -> None:
    storage = run_a.storage
    manifests = sorted(o.key for o in storage.list("checkpoints/") if o.key.endswith("manifest.json"))
    assert manifests == [f"checkpoints/step-{STEPS:09d}/manifest.json"]  # keepLast 1 pruned 5..15
    before = storage.list("exports/")
    assert before
    store = CheckpointStore(storage, 1, run_a.root / "prune-work")
    store.prune()
    assert storage.list("exports/") == before


def test_run_fine_tunes_a_previous_runs_export(
    run_a: FinishedRun, shared_mtat: SyntheticMtat, tmp_path: Path
) -> None:
    final = run_a.trainer.artifacts.final
    assert final is not None
    config = tiny_config(shared_mtat.root, tmp_path / "storage", tmp_path / "work", max_steps=6)
    config.model.base = final.uri
    proc = run_trainer(write_config(config, tmp_path / "trainer.json"))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]

    evaluations = log_events(proc.stdout, "evaluation")
    assert [e["step"] for e in evaluations] == [0, 6]
    a_last = run_a.trainer.history[-1]["validationLoss"]
    # the same weights, rounded to float16
    assert evaluations[0]["validation_loss"] == pytest.approx(a_last, abs=2e-3)
    losses = [e["loss"] for e in log_events(proc.stdout, "train_step")]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)

    storage = LocalStorage(tmp_path / "storage")
    card = json.loads(storage.read_text(f"exports/step-{6:09d}/{CARD_NAME}"))
    assert card["baseModel"] == final.uri
    # the compression model is the one the base model came with, copied as it was
    a_files = {f["name"]: f["sha256"] for f in _card(final.uri)["files"]}
    b_files = {f["name"]: f["sha256"] for f in card["files"]}
    assert b_files[COMPRESSION_NAME] == a_files[COMPRESSION_NAME]
    assert b_files[STATE_DICT_NAME] != a_files[STATE_DICT_NAME]  # it trained


def test_exports_survive_resume(shared_mtat: SyntheticMtat, tmp_path: Path) -> None:
    def config(max_steps: int) -> Any:
        return tiny_config(
            shared_mtat.root,
            tmp_path / "storage",
            tmp_path / "work",
            max_steps=max_steps,
            evaluate_every=5,
            checkpoint_every=1000,
        )

    first = Trainer(config(10))
    assert first.run().state is TrainerState.completed
    assert first.artifacts.final is not None and first.artifacts.final.step == 10

    # the same run again: it resumes at its end and reports the exports as they were
    again = Trainer(config(10), reporter=RecordingReporter())
    assert again.run().state is TrainerState.completed
    assert again.artifacts == first.artifacts  # not re-exported: the refs came back

    # extended: new evaluations are compared with the restored best; the old final stays
    # until a new final supersedes it
    reporter = RecordingReporter()
    extended = Trainer(config(20), reporter=reporter)
    assert extended.run().state is TrainerState.completed
    resumed = [s for s in reporter.statuses if s.progress.step == 10 and s.artifacts is not None]
    assert resumed and resumed[-1].artifacts == first.artifacts
    storage = LocalStorage(tmp_path / "storage")
    artifacts = extended.artifacts
    assert artifacts.final is not None and artifacts.final.step == 20
    assert artifacts.best is not None
    assert _export_steps(storage) == sorted({artifacts.best.step, 20})


# ----------------------------------------------------------------------------- the policy


def _context(step: int, loss: float | None = None, authenticity: float | None = None) -> ExportContext:
    return ExportContext(
        base_model="tiny://seed=0",
        run=RunRef(name="run-x", uid="1234"),
        step=step,
        epoch=0,
        total_steps=20,
        evaluation=EvaluationResult(
            step=step, validation_loss=loss, perplexity=None, authenticity=authenticity
        ),
        cost={"accruedUSD": 1.25, "updated": "2026-01-01T00:00:00Z"},
    )


def test_exporter_keeps_only_the_best_and_final(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    exporter = Exporter(
        ExportStore(storage, tmp_path / "staging"), build_tiny_musicgen(), BestMetric.validation_loss
    )
    artifacts = Artifacts()
    artifacts = exporter.on_evaluation(artifacts, _context(0, 4.0))
    assert artifacts.best is None  # step 0 is the base model
    artifacts = exporter.on_evaluation(artifacts, _context(5, 3.0))
    assert artifacts.best is not None and artifacts.best.step == 5
    unchanged = exporter.on_evaluation(artifacts, _context(10, 3.5))
    assert unchanged == artifacts and _export_steps(storage) == [5]
    artifacts = exporter.on_evaluation(artifacts, _context(15, 2.0))
    assert artifacts.best is not None and artifacts.best.step == 15
    assert _export_steps(storage) == [15]  # the superseded best is gone
    artifacts = exporter.on_completion(artifacts, _context(20, 2.5))
    assert artifacts.best.step == 15 and artifacts.final is not None and artifacts.final.step == 20
    assert artifacts.final.value == 2.5 and artifacts.final.digest != artifacts.best.digest
    assert _export_steps(storage) == [15, 20]
    card = _card(artifacts.final.uri)
    assert card["cost"] == {"accruedUSD": 1.25, "updated": "2026-01-01T00:00:00Z"}
    assert card["run"]["uid"] == "1234" and card["run"]["name"] == "run-x"


def test_authenticity_metric_prefers_higher_and_skips_missing() -> None:
    metric = BestMetric.authenticity
    best = ArtifactRef(
        uri="x", step=5, metric="authenticity", value=0.4, digest="sha256:0", time="2026-01-01T00:00:00Z"
    )
    assert improves(metric, 0.5, best) and not improves(metric, 0.3, best) and not improves(metric, 0.4, best)
    assert not improves(metric, None, best) and not improves(metric, None, None)
    assert improves(metric, 0.1, None)
    # a best chosen by another metric (the spec changed) does not count
    assert improves(BestMetric.validation_loss, 9.0, best)
    loss_best = best.model_copy(update={"metric": "validationLoss", "value": 2.0})
    assert improves(BestMetric.validation_loss, 1.9, loss_best)
    assert not improves(BestMetric.validation_loss, 2.1, loss_best)


def test_tiny_model_is_deterministic_and_carries_its_configs() -> None:
    a, b = build_tiny_musicgen(seed=3), build_tiny_musicgen(seed=3)
    assert a.lm_config is not None and a.compression_xp_config is not None
    for (name, x), y in zip(a.lm.state_dict().items(), b.lm.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    c = build_tiny_musicgen(seed=4)
    assert not torch.equal(a.lm.state_dict()["emb.0.weight"], c.lm.state_dict()["emb.0.weight"])


def test_an_export_on_s3_is_a_model_base(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket("exports")
    storage = open_storage(f"s3://{bucket}/runs/a")
    model = build_tiny_musicgen(seed=1)
    exporter = Exporter(ExportStore(storage, tmp_path / "staging"), model, BestMetric.validation_loss)
    artifacts = exporter.on_completion(Artifacts(), _context(7, 2.0))
    assert (
        artifacts.final is not None and artifacts.final.uri == f"s3://{bucket}/runs/a/exports/step-000000007"
    )
    card = json.loads(storage.read_text(f"exports/step-000000007/{CARD_NAME}"))
    assert (
        artifacts.final.digest
        == f"sha256:{sha256_bytes(storage.get_bytes(f'exports/step-000000007/{CARD_NAME}'))}"
    )
    assert {f["name"] for f in card["files"]} == {STATE_DICT_NAME, COMPRESSION_NAME}

    loaded = load_model(artifacts.final.uri, torch.device("cpu"), tmp_path / "work")
    assert loaded.sample_rate == model.sample_rate and loaded.num_codebooks == model.num_codebooks
    for name, value in model.lm.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(loaded.lm.state_dict()[name], expected), name
    for name, value in model.compression_model.state_dict().items():
        assert torch.equal(loaded.compression_model.state_dict()[name], value), name


def test_cost_comes_from_the_runs_status_or_not_at_all() -> None:
    from fermata_trainer.training_loop import _cost_of

    run = {"status": {"cost": {"accruedUSD": 0.42, "updated": "2026-01-01T00:00:00Z", "budgetUSD": 5}}}
    assert _cost_of(run) == {"accruedUSD": 0.42, "updated": "2026-01-01T00:00:00Z"}
    assert _cost_of({"status": {}}) is None and _cost_of({}) is None
    assert _cost_of({"status": {"cost": {"accruedUSD": "a lot"}}}) is None
