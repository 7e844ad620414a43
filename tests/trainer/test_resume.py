"""``fermata-train run`` as a process: SIGTERM mid-training leaves a verified checkpoint and exit
code 0; the next run resumes from it and reproduces the uninterrupted run's losses."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from fermata_api import EXIT_CONFIG_ERROR, EXIT_STOPPED_WITH_CHECKPOINT, Precision, TrainerConfig
from fermata_dev.synthetic import SyntheticMtat
from fermata_trainer import cli
from fermata_trainer.checkpoints import CheckpointStore
from fermata_trainer.storage import LocalStorage
from tests.trainer.helpers import (
    log_events,
    run_trainer,
    step_losses,
    tiny_config,
    train_command,
    trainer_env,
    write_config,
)

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

TOTAL = 60


def _config(tmp_path: Path, mtat: SyntheticMtat, name: str, precision: Precision = Precision.auto) -> Path:
    config = tiny_config(
        mtat.root,
        tmp_path / name / "storage",
        tmp_path / name / "work",
        max_steps=TOTAL,
        checkpoint_every=25,
        keep_last=2,
        cache_uri=str(tmp_path / "shared-code-cache"),
        precision=precision,
    )
    return write_config(config, tmp_path / f"{name}.json")


# fp16 (autocast with a gradient scaler, on the CPU here): the scaler's state is in the
# checkpoint, so the resumed run continues with the same loss scale and replays exactly too.
@pytest.mark.parametrize("precision", [Precision.auto, Precision.fp16])
def test_sigterm_checkpoint_then_exact_resume(
    tmp_path: Path, mtat: SyntheticMtat, precision: Precision
) -> None:
    reference = run_trainer(_config(tmp_path, mtat, "reference", precision))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = step_losses(reference.stdout)
    assert sorted(expected) == list(range(1, TOTAL + 1))

    config_path = _config(tmp_path, mtat, "spot", precision)
    stderr = (tmp_path / "spot.stderr").open("w")
    proc = subprocess.Popen(
        train_command(config_path),
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    signalled = False
    for line in proc.stdout:
        lines.append(line)
        if not signalled and '"train_step"' in line and json.loads(line)["step"] >= 5:
            proc.send_signal(signal.SIGTERM)  # the spot notice
            signalled = True
    code = proc.wait(timeout=120)
    stderr.close()
    first = "".join(lines)
    assert signalled and code == EXIT_STOPPED_WITH_CHECKPOINT, (tmp_path / "spot.stderr").read_text()[-3000:]
    stopped = log_events(first, "trainer_stopped")[0]
    stop_step = int(stopped["step"])
    assert 5 <= stop_step < TOTAL and stopped["reason"] == "SIGTERM"
    assert max(step_losses(first)) == stop_step  # finished the step it was in, no further

    storage = LocalStorage(tmp_path / "spot" / "storage")
    verified = CheckpointStore(storage, 2, tmp_path / "verify").latest_verified()
    assert verified is not None and verified.step == stop_step
    assert verified.manifest["reason"] == "signal"
    state = torch.load(verified.files["state.pt"], weights_only=True)
    expected_precision = "fp16" if precision is Precision.fp16 else "fp32"
    assert state["precision"] == expected_precision
    assert (state["scaler"]["scale"] > 0) if precision is Precision.fp16 else state["scaler"] == {}
    assert log_events(first, "precision_chosen")[0]["precision"] == expected_precision
    assert log_events(first, "codes_cache_hit")  # tokenized once, by the reference run

    resumed = run_trainer(config_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log_events(resumed.stdout, "resumed")[0]["step"] == stop_step
    after = step_losses(resumed.stdout)
    assert sorted(after) == list(range(stop_step + 1, TOTAL + 1))
    for step, loss in after.items():
        assert abs(loss - expected[step]) <= 1e-6, (step, loss, expected[step])
    assert after == {s: expected[s] for s in after}, "not bitwise identical on CPU"
    done = log_events(resumed.stdout, "trainer_completed")[0]
    assert done["step"] == TOTAL


def test_cli_config_errors_and_tiny_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"dataset": {"uri": ""}, "storage": {}}')
    assert cli.main(["run", "--config", str(bad)]) == EXIT_CONFIG_ERROR
    assert cli.main(["run", "--config", str(tmp_path / "missing.json")]) == EXIT_CONFIG_ERROR
    capsys.readouterr()
    assert cli.main(["tiny-config", "--data", "/data/mtat", "--storage", "/tmp/ckpt"]) == 0
    config = TrainerConfig.model_validate_json(capsys.readouterr().out)
    assert config.model.base == "tiny://seed=0" and config.gpus == 0
