"""``fermata-train``: the trainer's command line.

    fermata-train run [--config PATH] [--model tiny://seed=0]
    fermata-train prepare [--config PATH] [--tokenize]
    fermata-train stage-models --to s3://bucket/models [--model facebook/musicgen-small]
    fermata-train tiny-config --data DIR --storage DIR

``run`` reads the config from ``--config``, else ``$FERMATA_CONFIG``, else
``/etc/fermata/trainer.json``; outside Kubernetes (``run.name`` empty) it only logs. Scratch
files go to ``$FERMATA_WORK_DIR`` (the pod's scratch volume) when set, else the config's
``workDir``. With
``gpus > 1`` and that many CUDA devices it relaunches itself under ``torch.distributed.run``
(one process per GPU) and forwards SIGTERM to the workers through a stop file, so every rank
finishes its step and rank 0 writes the checkpoint.

Exit codes: 0 completed or stopped after a checkpoint, 2 bad configuration or dataset
(permanent: also a ``storage.checkpoints`` prefix another TrainingRun has claimed, or a resume
source that is not this run's or not the checkpoint the operator expects), 1 anything else (the
pod is restarted and resumes from its last checkpoint).

Resuming: ``$FERMATA_RESUME_FROM`` names the checkpoint manifest to resume from,
``$FERMATA_RESUME_DIGEST`` the sha256 it must have (``status.lastCheckpoint.digest``), and
``$FERMATA_RESUME_EXPLICIT=1`` says the user chose it (``spec.resumeFrom``), so another run's
checkpoint is accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from fermata_api import (
    EXIT_CONFIG_ERROR,
    DatasetSource,
    DatasetSpec,
    EvaluationSpec,
    ModelSpec,
    PodEnv,
    StorageSpec,
    TrainerConfig,
    TrainingSpec,
)
from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.logging_setup import LiveStream, configure_logging, get_logger


def _log() -> Any:
    """This module's logger, made when used: one bound at import time would keep structlog's
    default console format instead of the JSON lines :func:`configure_logging` sets up."""
    return get_logger("fermata_trainer.cli")


EXIT_FAILURE = 1


def _load_config(path_arg: str | None, env: PodEnv) -> tuple[TrainerConfig, Path]:
    """The config and its path; the pod's scratch directory (``$FERMATA_WORK_DIR``), when set,
    replaces ``workDir``."""
    path = Path(path_arg or env.config_path)
    if not path.is_file():
        raise TrainerConfigError(f"config file {path} does not exist")
    try:
        config = TrainerConfig.load(path)
    except ValidationError as exc:
        raise TrainerConfigError(f"config file {path} is invalid:\n{exc}") from None
    except ValueError as exc:
        raise TrainerConfigError(f"config file {path} is not valid JSON: {exc}") from None
    if env.work_dir:
        config.work_dir = env.work_dir
    return config, path


def tiny_config(
    data: str,
    storage: str,
    source: DatasetSource = DatasetSource.magnatagatune,
    work_dir: str | None = None,
    seed: int = 0,
) -> TrainerConfig:
    """A config for the tiny in-code model: a few CPU steps over a local dataset."""
    return TrainerConfig(
        model=ModelSpec(base=f"tiny://seed={seed}"),
        dataset=DatasetSpec(
            source=source, uri=data, min_tags=1, segment_seconds=2.0, validation_fraction=0.2
        ),
        training=TrainingSpec(
            epochs=5,
            batch_size=4,
            learning_rate=3e-3,
            warmup_steps=5,
            checkpoint_every_steps=20,
            evaluate_every_steps=20,
            cfg_dropout=0.2,
            seed=seed,
        ),
        evaluation=EvaluationSpec(clip_seconds=2.0),
        storage=StorageSpec(checkpoints=storage, keep_last=2),
        gpus=0,
        work_dir=work_dir or str(Path(tempfile.gettempdir()) / "fermata-tiny"),
    )


# ----------------------------------------------------------------------------- torchrun relaunch


def _wants_torchrun(config: TrainerConfig) -> bool:
    from fermata_trainer.distributed import launched_by_torchrun

    if config.gpus <= 1 or launched_by_torchrun():
        return False
    import torch

    available = torch.cuda.device_count()
    if available < config.gpus:
        _log().warning("gpus_unavailable", requested=config.gpus, available=available)
        return False
    return True


def _relaunch_under_torchrun(config: TrainerConfig, config_path: Path, model: str | None) -> int:
    from fermata_trainer.distributed import ENV_STOP_FILE

    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stop_file = work_dir / f"stop-{os.getpid()}"
    stop_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={config.gpus}",
        "-m",
        "fermata_trainer.cli",
        "run",
        "--config",
        str(config_path),
    ]
    if model:
        command += ["--model", model]
    env = dict(os.environ, **{ENV_STOP_FILE: str(stop_file)})
    _log().info("relaunching_under_torchrun", gpus=config.gpus)
    # own session: a terminal's Ctrl-C or the kubelet's SIGTERM reaches only this launcher,
    # which turns it into the stop file every worker polls after each step
    child = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(signum: int, _frame: FrameType | None) -> None:
        stop_file.touch()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_file.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    env = PodEnv.from_environ()
    config, config_path = _load_config(args.config, env)
    if args.model:
        config.model.base = args.model
    if _wants_torchrun(config):
        return _relaunch_under_torchrun(config, config_path, args.model)

    from fermata_trainer.distributed import ENV_STOP_FILE, barrier, dist_info_from_env, shutdown
    from fermata_trainer.reporter import make_reporter
    from fermata_trainer.training_loop import Trainer

    dist = dist_info_from_env()
    stop_file = Path(os.environ[ENV_STOP_FILE]) if os.environ.get(ENV_STOP_FILE) else None
    reporter = make_reporter(config.run) if dist.is_main else None
    trainer = Trainer(config, env, reporter=reporter, dist=dist, stop_file=stop_file)
    try:
        outcome = trainer.run()
        # torchrun stops the other workers as soon as one exits non-zero (a stop after a
        # checkpoint exits 3): every rank has finished, and said so, before any leaves
        barrier(dist)
    finally:
        shutdown(dist)
    return outcome.exit_code


def cmd_prepare(args: argparse.Namespace) -> int:
    """Build (or reuse) the dataset manifest; with ``--tokenize`` (the preparation pod) also the
    code cache, verified and reported in ``status.preparation`` (exit codes as ``run``)."""
    from fermata_api.meta import PREPARER_FIELD_MANAGER
    from fermata_trainer.preparation import Preparer
    from fermata_trainer.reporter import make_reporter

    env = PodEnv.from_environ()
    config, _ = _load_config(args.config, env)
    if args.model:
        config.model.base = args.model
    if args.tokenize:
        reporter = make_reporter(config.run, PREPARER_FIELD_MANAGER)
        return Preparer(config, env, reporter).run(tokenize=True, rebuild=args.rebuild)

    from fermata_trainer.checkpoints import claim_prefix
    from fermata_trainer.dataset import prepare_dataset
    from fermata_trainer.storage import open_storage

    storage = open_storage(config.storage.checkpoints)
    claim_prefix(storage, config.run)  # it writes the dataset manifest there
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_dataset(config.dataset, storage, work_dir, reuse=not args.rebuild, verify_reused=True)
    report: dict[str, Any] = dict(prepared.report)
    report["reused"] = prepared.reused
    print(json.dumps(report, indent=2), flush=True)
    return 0


def cmd_stage_models(args: argparse.Namespace) -> int:
    from fermata_trainer.model_loading import STAGED_MODELS, stage_model
    from fermata_trainer.storage import open_storage

    destination = open_storage(args.to)
    staged = {model: stage_model(model, destination) for model in (args.model or STAGED_MODELS)}
    for model, uri in staged.items():
        print(f"{model}\t{uri.removesuffix('/mirror.json')}", flush=True)
    return 0


def cmd_tiny_config(args: argparse.Namespace) -> int:
    config = tiny_config(
        args.data,
        args.storage,
        DatasetSource(args.source),
        work_dir=args.work_dir,
        seed=args.seed,
    )
    print(json.dumps(config.wire(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fermata-train", description="Fine-tune MusicGen inside a Fermata TrainingRun pod."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="prepare, tokenize, train, evaluate and checkpoint")
    run.add_argument("--config", help="trainer.json (default: $FERMATA_CONFIG or the pod mount)")
    run.add_argument("--model", help="override model.base (e.g. tiny://seed=0)")
    run.set_defaults(func=cmd_run)

    prepare = sub.add_parser(
        "prepare",
        help="build the dataset manifest (and with --tokenize the code cache, as the preparation pod does)",
    )
    prepare.add_argument("--config", help="trainer.json (default: $FERMATA_CONFIG)")
    prepare.add_argument("--rebuild", action="store_true", help="ignore an existing manifest and scan again")
    prepare.add_argument(
        "--tokenize",
        action="store_true",
        help="also tokenize into the code cache, verify it and report status.preparation",
    )
    prepare.add_argument("--model", help="override model.base (e.g. tiny://seed=0)")
    prepare.set_defaults(func=cmd_prepare)

    stage = sub.add_parser(
        "stage-models",
        help="copy MusicGen models and their T5 text encoders to storage, for runs without the Hub",
    )
    stage.add_argument(
        "--to", required=True, help="s3://bucket/prefix (or a path); each model goes to <to>/<id>"
    )
    stage.add_argument(
        "--model",
        action="append",
        help="Hugging Face id (repeatable; default: facebook/musicgen-{small,medium,large,melody})",
    )
    stage.set_defaults(func=cmd_stage_models)

    tiny = sub.add_parser("tiny-config", help="print a config for the tiny CPU model")
    tiny.add_argument("--data", required=True, help="dataset root (MagnaTagATune) or manifest")
    tiny.add_argument("--storage", required=True, help="checkpoint/sample storage URI or path")
    tiny.add_argument(
        "--source", default=DatasetSource.magnatagatune.value, choices=[s.value for s in DatasetSource]
    )
    tiny.add_argument("--work-dir", default=None)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `run` (and the preparation pod) log JSON lines to stdout (the pod log); the others print
    # their result there
    pod = args.command == "run" or (args.command == "prepare" and args.tokenize)
    configure_logging(
        os.environ.get("FERMATA_LOG_LEVEL", "INFO"),
        stream=LiveStream("stdout" if pod else "stderr"),
    )
    try:
        code: int = args.func(args)
    except TrainerConfigError as exc:
        _log().error("config_error", error=str(exc), error_type=type(exc).__name__)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        _log().error("interrupted")
        return 130
    except Exception as exc:
        _log().exception("trainer_failed", error=f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
