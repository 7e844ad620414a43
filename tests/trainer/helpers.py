"""Helpers for the trainer tests: tiny-model configs and running ``fermata-train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fermata_api import (
    DatasetSpec,
    EvaluationSpec,
    ModelSpec,
    ReportingSpec,
    StorageSpec,
    TrainerConfig,
    TrainingSpec,
)

REPO = Path(__file__).resolve().parents[2]
TRAIN_BIN = REPO / ".venv" / "bin" / "fermata-train"


def tiny_config(
    data: Path | str,
    storage: Path | str,
    work_dir: Path | str,
    *,
    max_steps: int | None = 30,
    epochs: int = 50,
    batch_size: int = 4,
    evaluate_every: int = 1000,
    checkpoint_every: int = 1000,
    keep_last: int = 3,
    clip_seconds: float = 0.3,
    segment_seconds: float = 1.0,
    learning_rate: float = 3e-3,
    cache_uri: str | None = None,
    heartbeat_seconds: float = 30.0,
    **training: Any,
) -> TrainerConfig:
    return TrainerConfig(
        model=ModelSpec(base="tiny://seed=0"),
        dataset=DatasetSpec(
            uri=str(data), min_tags=3, segment_seconds=segment_seconds, validation_fraction=0.2
        ),
        training=TrainingSpec(
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=3,
            evaluate_every_steps=evaluate_every,
            checkpoint_every_steps=checkpoint_every,
            cfg_dropout=0.2,
            seed=7,
            **training,
        ),
        evaluation=EvaluationSpec(prompts=["deep amapiano with log drums"], clip_seconds=clip_seconds),
        storage=StorageSpec(checkpoints=str(storage), keep_last=keep_last, cache_uri=cache_uri),
        reporting=ReportingSpec(heartbeat_seconds=heartbeat_seconds),
        gpus=0,
        work_dir=str(work_dir),
    )


def write_config(config: TrainerConfig, path: Path) -> Path:
    path.write_text(json.dumps(config.wire(), indent=2))
    return path


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERMATA_", "AWS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


def train_command(config_path: Path) -> list[str]:
    if TRAIN_BIN.exists():
        return [str(TRAIN_BIN), "run", "--config", str(config_path)]
    return [sys.executable, "-m", "fermata_trainer.cli", "run", "--config", str(config_path)]


def run_trainer(
    config_path: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        train_command(config_path),
        env=trainer_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def log_events(stdout: str, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines of a trainer's stdout (optionally only one event)."""
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or record.get("event") == event:
            out.append(record)
    return out


def step_losses(stdout: str) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in log_events(stdout, "train_step")}
