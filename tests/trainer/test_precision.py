"""``training.precision`` by hardware: the pure choice by compute capability, and the fp16 loop
with its gradient scaler on the CPU (torch runs fp16 autocast and ``GradScaler`` there too)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fermata_api import Precision, TrainerState
from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.precision import choose_precision
from fermata_trainer.reporter import NullReporter
from fermata_trainer.storage import LocalStorage
from fermata_trainer.training_loop import Trainer
from tests.trainer.conftest import ConfigFactory

pytestmark = pytest.mark.trainer

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    ("capability", "dtype", "scaler"),
    [
        ((7, 0), FP16, True),  # V100
        ((7, 5), FP16, True),  # T4
        ((8, 0), BF16, False),  # A100
        ((8, 6), BF16, False),  # A10G
        ((8, 9), BF16, False),  # L4
        ((9, 0), BF16, False),  # H100
    ],
)
def test_auto_on_cuda_follows_compute_capability(
    capability: tuple[int, int], dtype: torch.dtype, scaler: bool
) -> None:
    choice = choose_precision(Precision.auto, "cuda", capability)
    assert (choice.dtype, choice.use_scaler) == (dtype, scaler)
    assert f"{capability[0]}.{capability[1]}" in choice.reason
    assert choice.name == ("bf16" if dtype is BF16 else "fp16")


def test_auto_on_cpu_is_fp32() -> None:
    choice = choose_precision(Precision.auto, "cpu", None)
    assert (choice.dtype, choice.use_scaler, choice.name) == (None, False, "fp32")
    assert "CPU" in choice.reason


@pytest.mark.parametrize(
    ("device", "capability"), [("cpu", None), ("cuda", (7, 0)), ("cuda", (7, 5)), ("cuda", (9, 0))]
)
def test_explicit_fp16_and_fp32_run_anywhere(device: str, capability: tuple[int, int] | None) -> None:
    fp16 = choose_precision(Precision.fp16, device, capability)
    assert (fp16.dtype, fp16.use_scaler, fp16.name) == (FP16, True, "fp16")
    fp32 = choose_precision(Precision.fp32, device, capability)
    assert (fp32.dtype, fp32.use_scaler, fp32.name) == (None, False, "fp32")


@pytest.mark.parametrize(("device", "capability"), [("cpu", None), ("cuda", (8, 0)), ("cuda", (9, 0))])
def test_explicit_bf16_where_native(device: str, capability: tuple[int, int] | None) -> None:
    choice = choose_precision(Precision.bf16, device, capability)
    assert (choice.dtype, choice.use_scaler, choice.name) == (BF16, False, "bf16")


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])
def test_explicit_bf16_on_an_older_gpu_is_a_config_error(capability: tuple[int, int]) -> None:
    with pytest.raises(TrainerConfigError, match=r"bf16 needs CUDA compute capability ≥ 8\.0.*use auto"):
        choose_precision(Precision.bf16, "cuda", capability)


def test_fp16_with_scaler_trains_on_cpu_and_checkpoints_the_scaler(
    tmp_path: Path, make_config: ConfigFactory
) -> None:
    config = make_config(max_steps=30, checkpoint_every=1000, precision=Precision.fp16)
    trainer = Trainer(config, reporter=NullReporter())
    outcome = trainer.run()

    assert outcome.state is TrainerState.completed and outcome.step == 30
    assert all(math.isfinite(x) for x in outcome.losses)
    first, last = sum(outcome.losses[:5]) / 5, sum(outcome.losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    progress = trainer._progress(TrainerState.completed)
    assert progress.precision == "fp16"
    assert progress.precision_reason is not None and "gradient scaler" in progress.precision_reason
    assert progress.wire()["precisionReason"] == progress.precision_reason

    storage = LocalStorage(tmp_path / "storage")
    local = tmp_path / "state.pt"
    local.write_bytes(storage.get_bytes("checkpoints/step-000000030/state.pt"))
    state = torch.load(local, weights_only=True)
    assert state["precision"] == "fp16"
    scaler = state["scaler"]
    assert scaler["scale"] > 0 and scaler["scale"] == trainer.scaler.get_scale()
    assert set(scaler) >= {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
