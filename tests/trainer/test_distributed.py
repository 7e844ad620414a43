"""Two ranks on the CPU over gloo, through ``torchrun`` and the real CLI: the same losses as one
rank with the same global batch, only rank 0 writes, SIGTERM to the launcher stops both ranks
after a checkpoint, and the run resumes from it with a different world size."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fermata_api import EXIT_STOPPED_WITH_CHECKPOINT
from fermata_dev.synthetic import SyntheticMtat, make_mtat_tree
from fermata_trainer.checkpoints import CheckpointStore
from fermata_trainer.storage import LocalStorage
from tests.trainer.helpers import (
    log_events,
    run_trainer,
    step_losses,
    tiny_config,
    trainer_env,
    write_config,
)

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

#: The LM's dropout draws different masks when a batch of 4 is split into two of 2 (and each rank
#: seeds its own generator), so it is off here; so is CFG dropout (its streams depend on the rank).
MODEL = "tiny://seed=0,dropout=0"

#: 1 rank × batch 4 and 2 ranks × batch 2 compute the same gradient (DDP averages the two ranks'
#: means; every segment is full length, so the mean of means is the mean): they differ only by
#: float32 summation order, ~1e-7 per step, which a few Adam steps do not grow past this.
LOSS_TOLERANCE = 1e-5

#: Events of a rank that writes to storage; rank 1 must log none of them.
WRITING_EVENTS = {
    "checkpoints_prefix_claimed",
    "dataset_prepared",
    "codes_cache_built",
    "codes_cache_mirrored",
    "evaluation",
    "checkpoint_written",
    "checkpoints_pruned",
    "status",
    "stop_report_written",
}

#: The product's launcher (``fermata-train run`` with ``gpus > 1`` relaunches itself this way
#: when it sees that many CUDA devices): torchrun in its own session, SIGTERM → the stop file.
LAUNCHER = """
import sys
from pathlib import Path
from fermata_api import TrainerConfig
from fermata_trainer import cli
from fermata_trainer.logging_setup import LiveStream, configure_logging
configure_logging("INFO", stream=LiveStream("stdout"))
path = Path(sys.argv[1])
sys.exit(cli._relaunch_under_torchrun(TrainerConfig.load(path), path, None))
"""


@pytest.fixture(scope="module")
def even_mtat(tmp_path_factory: pytest.TempPathFactory) -> SyntheticMtat:
    """12 clips of 2 s: two full 1 s segments each, no padding (equal token counts per sample)."""
    return make_mtat_tree(tmp_path_factory.mktemp("even") / "mtat", clips=12, seconds=(2.0,))


def _config(
    tmp_path: Path,
    mtat: SyntheticMtat,
    name: str,
    *,
    batch_size: int,
    gpus: int,
    max_steps: int,
    checkpoint_every: int = 1000,
    storage: Path | None = None,
) -> Path:
    config = tiny_config(
        mtat.root,
        storage or tmp_path / name / "storage",
        tmp_path / name / "work",
        max_steps=max_steps,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        cache_uri=str(tmp_path / "shared-code-cache"),
    )
    config.model.base = MODEL
    config.training.cfg_dropout = 0.0
    config.gpus = gpus
    return write_config(config, tmp_path / f"{name}.json")


def _torchrun(config_path: Path, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "fermata_trainer.cli",
        "run",
        "--config",
        str(config_path),
    ]


def _by_rank(stdout: str, event: str) -> dict[int, dict[str, object]]:
    return {int(r.get("rank", 0)): r for r in log_events(stdout, event)}


def _keys(storage: Path) -> set[str]:
    """Every object under a storage root, except TensorBoard files (named by host, pid, time)."""
    return {o.key for o in LocalStorage(storage).list() if not o.key.startswith("tensorboard/")}


def test_two_ranks_match_one_rank_and_only_rank_0_writes(tmp_path: Path, even_mtat: SyntheticMtat) -> None:
    steps = 8
    one = run_trainer(
        _config(tmp_path, even_mtat, "one", batch_size=4, gpus=0, max_steps=steps, checkpoint_every=4)
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        _torchrun(
            _config(tmp_path, even_mtat, "two", batch_size=2, gpus=2, max_steps=steps, checkpoint_every=4)
        ),
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    expected, got = step_losses(one.stdout), step_losses(two.stdout)
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step, loss in got.items():
        assert abs(loss - expected[step]) <= LOSS_TOLERANCE, (step, loss, expected[step])
    assert {r["rank"] for r in log_events(two.stdout, "train_step")} == {0}

    # Every rank plans the global batch: progress (samples/s, the cost projection) counts both.
    plans = _by_rank(two.stdout, "training_plan")
    assert set(plans) == {0, 1}
    for plan in plans.values():
        assert plan["samples_per_step"] == 4 and plan["total_steps"] == steps
    assert set(_by_rank(two.stdout, "trainer_completed")) == {0, 1}

    # Rank 0 alone writes: rank 1 logs nothing that writes, and the storage holds exactly what the
    # single-rank run left (checkpoints 4 and 8, samples, dataset manifest, the prefix claim).
    rank1 = {str(r["event"]) for r in log_events(two.stdout) if r.get("rank") == 1}
    assert rank1 and not rank1 & WRITING_EVENTS, rank1 & WRITING_EVENTS
    assert {r["step"] for r in log_events(two.stdout, "checkpoint_written")} == {4, 8}
    assert _keys(tmp_path / "two" / "storage") == _keys(tmp_path / "one" / "storage")


def test_sigterm_to_launcher_stops_both_ranks_then_resumes_on_one(
    tmp_path: Path, even_mtat: SyntheticMtat
) -> None:
    total = 16
    storage = tmp_path / "run" / "storage"
    config_path = _config(tmp_path, even_mtat, "run", batch_size=2, gpus=2, max_steps=total)
    stderr_path = tmp_path / "launcher.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(config_path)],
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
            if not signalled and '"train_step"' in line and json.loads(line)["step"] >= 3:
                proc.send_signal(signal.SIGTERM)  # the kubelet's, to the pod's main process
                signalled = True
        code = proc.wait(timeout=120)
    first = "".join(lines)
    assert signalled and code == EXIT_STOPPED_WITH_CHECKPOINT, stderr_path.read_text()[-3000:]
    stopped = _by_rank(first, "trainer_stopped")
    assert set(stopped) == {0, 1}, "the stop must reach both ranks"
    stop_step = int(str(stopped[0]["step"]))
    assert stopped[1]["step"] == stop_step and stopped[0]["reason"] == "stop file"
    assert 3 <= stop_step < total and max(step_losses(first)) == stop_step

    verified = CheckpointStore(LocalStorage(storage), 2, tmp_path / "verify").latest_verified()
    assert verified is not None and verified.step == stop_step
    assert verified.manifest["reason"] == "signal"
    assert torch.load(verified.files["state.pt"], weights_only=True)["world_size"] == 2

    # The same run on one process (the pod came back with one GPU, here the CPU).
    single = _config(
        tmp_path, even_mtat, "run-single", batch_size=2, gpus=0, max_steps=total, storage=storage
    )
    resumed = run_trainer(single)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log_events(resumed.stdout, "resumed")[0]["step"] == stop_step
    changed = log_events(resumed.stdout, "world_size_changed")[0]
    assert (changed["saved"], changed["now"]) == (2, 1)
    assert sorted(step_losses(resumed.stdout)) == list(range(stop_step + 1, total + 1))
    assert log_events(resumed.stdout, "trainer_completed")[0]["step"] == total
    final = CheckpointStore(LocalStorage(storage), 2, tmp_path / "verify-final").latest_verified()
    assert final is not None and final.step == total and final.manifest["reason"] == "final"
