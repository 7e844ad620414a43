"""The fine-tuning run: prepare, tokenize, train, evaluate, checkpoint, report.

One optimizer step = ``gradientAccumulation`` micro-batches of ``batchSize`` cached segments per
rank: conditions → ``lm.compute_predictions`` → per-codebook cross-entropy under the pattern and
padding masks, AdamW (β 0.9/0.95) with linear warm-up and cosine decay, gradient clipping.
Autocast over float32 weights as :mod:`fermata_trainer.precision` chooses (``auto``: bf16 on
CUDA ≥ 8.0, fp16 with a gradient scaler on older GPUs, float32 on CPU); the scaler's state is
part of the checkpoint.

Stopping safely: SIGTERM/SIGINT (or the launcher's stop file) only set a flag; the current step
finishes, a checkpoint is written and the process exits 0. A checkpoint request read from
``status.control`` is answered the same way (and acknowledged in
``progress.checkpointRequestAck``), stopping afterwards when it says ``stop``. An evaluation
request (``status.control.evaluationRequest``, e.g. for a gate whose milestone fell between two
scheduled evaluations) is answered once the run is at or past its ``minStep``: by the scheduled
evaluation's code path, or by nothing more than the acknowledgement
(``progress.evaluationRequestAck``) when an evaluation at or after ``minStep`` already exists.
A resumed run
restores model, optimizer, scheduler, RNG states and the data position, so it continues with
exactly the batches and losses the uninterrupted run would have had.

Every evaluation that improves ``evaluation.bestMetric``, and the completed run, leave an export
in audiocraft's release format (:mod:`fermata_trainer.export`), named in ``status.artifacts``;
the best and final refs are part of the checkpoint's state, so a resumed run keeps them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.amp.grad_scaler import GradScaler

from fermata_api import (
    EXIT_STOPPED_WITH_CHECKPOINT,
    Artifacts,
    CheckpointRef,
    CheckpointRequest,
    EvaluationRequest,
    PodEnv,
    PreparationReport,
    StopReport,
    TrainerConfig,
    TrainerProgress,
    TrainerState,
    TrainerStatus,
    read_control,
    report_key,
)
from fermata_trainer.batching import BatchPlan, DataPosition
from fermata_trainer.checkpoints import (
    CheckpointStore,
    VerifiedCheckpoint,
    claim_prefix,
    describe_run,
    step_dir_name,
)
from fermata_trainer.codes_cache import CodesCache, CodesDataset, CodesSplit
from fermata_trainer.conditioning import apply_cfg_dropout, cfg_dropout_mask, make_attributes
from fermata_trainer.curation import audio_processor, processing_fingerprint
from fermata_trainer.dataset import (
    AudioFetcher,
    ClipEntry,
    EmptySubsetError,
    PreparedDataset,
    pinned_dataset,
    prepare_dataset,
)
from fermata_trainer.distributed import (
    DistInfo,
    any_rank,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
)
from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.evaluation import EvaluationResult, Evaluator
from fermata_trainer.export import ExportContext, Exporter, ExportStore
from fermata_trainer.logging_setup import bind_context, get_logger
from fermata_trainer.model_loading import LoadedModel, load_model
from fermata_trainer.model_mirror import RUN_MIRROR_PREFIX
from fermata_trainer.optimization import build_optimizer, build_scheduler, codebook_cross_entropy
from fermata_trainer.precision import PrecisionChoice, choose_precision, device_capability
from fermata_trainer.preparation import preparation_done, preparation_progress
from fermata_trainer.prompts import augmented_prompt
from fermata_trainer.reporter import NullReporter, StatusReporter
from fermata_trainer.storage import RetryPolicy, S3Storage, Storage, open_storage
from fermata_trainer.telemetry import GpuMonitor, ProgressBar, TensorBoardSink

log = get_logger(__name__)

T = TypeVar("T")

STATE_FORMAT_VERSION = 1
TRAIN_LOSS_WINDOW = 50


class LMLoss(nn.Module):
    """The LM and its loss as one module, so DDP sees the forward pass it must synchronise."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, codes: torch.Tensor, valid: torch.Tensor, tokenized: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lm: Any = self.lm
        conditions = lm.condition_provider(tokenized)
        out = lm.compute_predictions(codes, [], conditions)
        mask = out.mask & valid[:, None, :]
        return codebook_cross_entropy(out.logits, codes, mask)


@dataclass
class RunOutcome:
    exit_code: int
    state: TrainerState
    step: int
    total_steps: int
    last_checkpoint: CheckpointRef | None
    losses: list[float]


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state(legacy=True)
    return {
        "python": _python_rng_state(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


class Trainer:
    """One incarnation of the trainer for a :class:`TrainerConfig`."""

    def __init__(
        self,
        config: TrainerConfig,
        env: PodEnv | None = None,
        reporter: StatusReporter | None = None,
        dist: DistInfo | None = None,
        stop_file: Path | None = None,
    ) -> None:
        self.config = config
        self.env = env or PodEnv()
        self.dist = dist or DistInfo()
        self.reporter: StatusReporter = reporter if reporter is not None else NullReporter()
        self.stop_file = stop_file
        self.device = torch.device("cpu")
        self.state = TrainerState.preparing
        self.step = 0
        self.total_steps = 0
        self.epoch = 0
        self.position = DataPosition()
        self.losses: list[float] = []
        self.loss_window: deque[float] = deque(maxlen=TRAIN_LOSS_WINDOW)
        self.history: list[dict[str, Any]] = []
        self.baseline: float | None = None
        self.last_eval: EvaluationResult | None = None
        self.last_eval_step: int | None = None
        self.last_checkpoint: CheckpointRef | None = None
        #: step of the newest checkpoint, known on every rank (only rank 0 holds the ref)
        self.checkpoint_step: int | None = None
        self.ack: str | None = None
        self.pending_request: CheckpointRequest | None = None
        #: id of the last status.control.evaluationRequest answered (progress.evaluationRequestAck)
        self.evaluation_ack: str | None = None
        #: an evaluation request not answered yet (rank 0 only: it reads status.control)
        self.pending_evaluation: EvaluationRequest | None = None
        self.stop_report: StopReport | None = None
        self.last_report_ok = False
        self.stop_report_uri: str | None = None
        #: another run's checkpoint this run started from (spec.resumeFrom), rank 0
        self.started_from: str | None = None
        #: the deployable exports (status.artifacts, rank 0) and what writes them
        self.artifacts = Artifacts()
        self.exporter: Exporter | None = None
        #: the data the run trains on, for the model card (manifest digest, code cache key)
        self.dataset_facts: dict[str, Any] = {}
        #: spec.preparation.mode Trainer: this pod's own tokenizing report (status.preparation)
        self.preparation: PreparationReport | None = None
        #: the training clips' manifest entries by clip id (tags, BPM, key for prompt augmentation)
        self.clip_meta: dict[str, ClipEntry] = {}
        #: status.cost as last seen in an apply response (the operator computes it)
        self.cost_seen: dict[str, Any] | None = None
        self.signal_received: str | None = None
        self.message: str | None = None
        self._last_report = 0.0
        self._samples_since_report = 0
        self._report_clock = time.monotonic()
        self._samples_per_second: float | None = None
        self._previous_handlers: dict[int, Any] = {}
        self.sample_rate = 32000
        self.gpu: GpuMonitor | None = None
        self.tensorboard: TensorBoardSink | None = None
        #: autocast dtype and gradient scaler, chosen in :meth:`_choose_precision`
        self.precision = PrecisionChoice(None, False, "not chosen yet")
        self.scaler = GradScaler("cpu", enabled=False)

    # ================================================================== signals

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_received is None:
            self.signal_received = name
            # structlog may be mid-write in the interrupted frame: keep the handler minimal
        else:  # a second signal: stop waiting for the step to finish
            signal.signal(signum, signal.SIG_DFL)

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (embedded use): no handlers
                return

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _stop_requested_locally(self) -> bool:
        if self.signal_received is not None:
            return True
        return self.stop_file is not None and self.stop_file.exists()

    # ================================================================== reporting

    def _progress(self, state: TrainerState) -> TrainerProgress:
        gpu_util, gpu_mem = self.gpu.snapshot() if self.gpu is not None else (None, None)
        ev = self.last_eval
        train_loss = float(sum(self.loss_window) / len(self.loss_window)) if self.loss_window else None
        return TrainerProgress(
            state=state,
            heartbeat_time=datetime.now(UTC),
            pod_name=self.env.pod_name,
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch,
            train_loss=_finite(train_loss),
            validation_loss=_finite(ev.validation_loss) if ev else None,
            validation_perplexity=_finite(ev.perplexity) if ev else None,
            baseline_validation_loss=_finite(self.baseline),
            evaluated_step=ev.step if ev else None,
            authenticity=ev.authenticity if ev else None,
            authenticity_components=ev.components if ev else None,
            samples_per_second=self._samples_per_second,
            precision=self.precision.name,
            precision_reason=self.precision.reason,
            gpu_utilization=gpu_util,
            gpu_memory_bytes=gpu_mem,
            checkpoint_request_ack=self.ack,
            evaluation_request_ack=self.evaluation_ack,
            stop_report_uri=self.stop_report_uri,
            message=self.message,
        )

    def report(self, state: TrainerState | None = None, message: str | None = None) -> None:
        """Send the status now (rank 0 only) and pick up any checkpoint or evaluation request."""
        if state is not None:
            self.state = state
        if message is not None:
            self.message = message
        if not self.dist.is_main:
            return
        now = time.monotonic()
        elapsed = now - self._report_clock
        if self._samples_since_report and elapsed > 0:
            self._samples_per_second = round(self._samples_since_report / elapsed, 3)
        self._samples_since_report = 0
        self._report_clock = now
        self._last_report = now
        progress: TrainerProgress | None = None
        try:
            progress = self._progress(self.state)
            status = TrainerStatus(
                progress=progress,
                last_checkpoint=self.last_checkpoint,
                artifacts=self.artifacts if self.artifacts.best or self.artifacts.final else None,
                preparation=self.preparation,
            )
            response = self.reporter.report(status)
        except Exception as exc:  # reporting never stops training
            log.warning("status_report_error", error=f"{type(exc).__name__}: {exc}")
            response = None
        self.last_report_ok = response is not None
        if response:
            self.cost_seen = _cost_of(response) or self.cost_seen
            control = read_control(response)
            if control.stop_report is not None:
                self.stop_report = control.stop_report
            request = control.checkpoint_request
            if request is not None and request.id != self.ack:
                if self.pending_request is None or self.pending_request.id != request.id:
                    log.info(
                        "checkpoint_requested",
                        id=request.id,
                        reason=request.reason,
                        stop=request.stop,
                    )
                self.pending_request = request
            self._pick_up_evaluation_request(control.evaluation_request, response)
        self._log_telemetry(progress)

    def _log_telemetry(self, progress: TrainerProgress | None) -> None:
        """GPU use and the run's accrued cost as TensorBoard scalars at every report; only the
        values known: no ``gpu/*`` without NVML (a CPU run), no ``cost/*`` before a reply from the
        API has carried ``status.cost``."""
        if self.tensorboard is None:
            return
        memory = progress.gpu_memory_bytes if progress is not None else None
        self.tensorboard.scalars(
            self.step,
            {
                "gpu/utilization": progress.gpu_utilization if progress is not None else None,
                "gpu/memory_bytes": float(memory) if memory is not None else None,
                "cost/accrued_usd": self.cost_seen["accruedUSD"] if self.cost_seen else None,
            },
        )

    def _pick_up_evaluation_request(
        self, request: EvaluationRequest | None, response: dict[str, Any]
    ) -> None:
        if request is not None and request.id != self.evaluation_ack:
            if self.pending_evaluation is None or self.pending_evaluation.id != request.id:
                log.info(
                    "evaluation_requested",
                    id=request.id,
                    min_step=request.min_step,
                    reason=request.reason,
                    step=self.step,
                )
            self.pending_evaluation = request
        elif (
            request is None
            and self.pending_evaluation is not None
            and isinstance(response.get("status"), dict)
        ):
            # The operator took it back (the run's status carries no request any more).
            log.info("evaluation_request_withdrawn", id=self.pending_evaluation.id)
            self.pending_evaluation = None

    def _final_report(self, message: str, attempts: int = 5) -> None:
        """The last report before exiting matters (it carries the SIGTERM checkpoint and fetches
        the operator's abort report): retry it briefly instead of giving up at once."""
        for attempt in range(attempts):
            self.report(TrainerState.stopped, message=message)
            if self.last_report_ok or isinstance(self.reporter, NullReporter):
                return
            time.sleep(min(4.0, 0.25 * 2**attempt))

    def _write_stop_report(self, storage: Storage) -> None:
        """Write the operator's abort report (if it sent one) next to the checkpoints."""
        report = self.stop_report
        if report is None or not self.dist.is_main:
            return
        key = report_key(report.id)
        body = {
            **report.wire(),
            "run": self.config.run.wire(),
            "lastCheckpoint": self.last_checkpoint.wire() if self.last_checkpoint else None,
            "trainer": self._progress(TrainerState.stopped).wire(),
        }
        try:
            storage.write_text(key, json.dumps(body, indent=2, sort_keys=True))
        except Exception as exc:  # the summary is in the run's status anyway
            log.warning("stop_report_error", error=f"{type(exc).__name__}: {exc}")
            return
        self.stop_report_uri = storage.uri_of(key)
        log.info("stop_report_written", uri=self.stop_report_uri, reason=report.reason)
        self.report(TrainerState.stopped)

    def _storage_trouble(self, attempt: int, error: BaseException | None) -> None:
        """A storage call failed and is about to be retried: say so in the status now (the
        retries can block the loop, and its heartbeats, for a while)."""
        what = f"{type(error).__name__}: {error}" if error is not None else "error"
        message = f"{STORAGE_TROUBLE}: {what}"[:700] + f"; retrying (attempt {attempt + 2})"
        if self.message and self.message.startswith(CHECKPOINT_FAILED):  # keep saying so
            message = f"{self.message.split(';')[0][:300]}; {message}"
        if threading.current_thread() is threading.main_thread():
            self.report(message=message)
        else:
            self.message = message

    def _heartbeat_due(self) -> bool:
        return time.monotonic() - self._last_report >= self.config.reporting.heartbeat_seconds

    # ================================================================== setup

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast as chosen (training and evaluation alike), or nothing for float32."""
        if self.precision.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def _choose_precision(self) -> None:
        """Pick the precision for this device (every rank alike) and the gradient scaler."""
        requested = self.config.training.precision
        self.precision = choose_precision(requested, self.device.type, device_capability(self.device))
        self.scaler = GradScaler(self.device.type, enabled=self.precision.use_scaler)
        log.info(
            "precision_chosen",
            requested=requested.value,
            precision=self.precision.name,
            gradient_scaler=self.precision.use_scaler,
            reason=self.precision.reason,
        )

    def _seed(self) -> None:
        seed = self.config.training.seed + self.dist.rank
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _prepare_manifest(self, storage: Storage, work_dir: Path) -> tuple[PreparedDataset | None, str]:
        """The dataset manifest (prepared on rank 0; None elsewhere) and its digest, on every
        rank. Runs before the model is loaded: scanning and checking files needs no model, so a
        wrong dataset URI or unusable data fails in seconds, not after a multi-GB download."""
        prepared = self._on_main_then_everywhere(
            lambda: self._pinned_manifest(storage, work_dir)
            or prepare_dataset(self.config.dataset, storage, work_dir)
        )
        manifest_digest = broadcast_object(self.dist, prepared.manifest_digest if prepared else None)
        assert manifest_digest is not None
        return prepared, manifest_digest

    def _pinned_manifest(self, storage: Storage, work_dir: Path) -> PreparedDataset | None:
        """The manifest this run is bound to, when it is: the one its preparation pod verified
        (``spec.preparation.mode: Pod``), or the one its checkpoints were trained on (a resumed
        run keeps its data, so the replay is exact and a file added meanwhile cannot fail it)."""
        cfg = self.config
        want = self.env.prepared_manifest_digest
        if want is not None:
            return pinned_dataset(storage, want)
        store = CheckpointStore(storage, cfg.storage.keep_last, work_dir / "checkpoints", owner=cfg.run)
        return pinned_dataset(storage) if store.steps() else None

    def _prepare_codes(
        self,
        storage: Storage,
        work_dir: Path,
        model: LoadedModel,
        prepared: PreparedDataset | None,
        manifest_digest: str,
    ) -> CodesDataset:
        cfg = self.config
        mirror = open_storage(cfg.storage.cache_uri) if cfg.storage.cache_uri else storage.child("cache")
        cache = CodesCache(
            model,
            manifest_digest,
            cfg.dataset.segment_seconds,
            work_dir / "codes",
            mirror,
            processing=processing_fingerprint(cfg.dataset.curation),
            process=audio_processor(cfg.dataset.curation),
        )
        codes: CodesDataset | None = self._load_prepared(cache, manifest_digest)
        if self.dist.is_main:
            codes = codes or cache.load()
            if codes is None:
                assert prepared is not None
                self.report(TrainerState.tokenizing)
                last = [time.monotonic()]

                def progress(done: int, total: int) -> None:
                    self.preparation = preparation_progress(
                        self.preparation, cache, done, total, self.env.pod_name
                    )
                    if time.monotonic() - last[0] >= cfg.reporting.heartbeat_seconds:
                        last[0] = time.monotonic()
                        self.report(message=f"tokenized {done}/{total} clips")

                codes = cache.build(
                    prepared.entries,
                    AudioFetcher(work_dir),
                    self.device,
                    verify_checksums=cfg.dataset.verify_checksums,
                    progress=progress,
                )
                self.message = None
            if self.env.prepared_codes_key is None:  # mode Pod: status.preparation is the preparer's
                clips = len(prepared.entries) if prepared else 0
                self.preparation = preparation_done(
                    self.preparation, cache, manifest_digest, self.env.pod_name, clips
                )
        barrier(self.dist)
        if codes is None:
            codes = cache.load()
            if codes is None:
                raise RuntimeError(f"rank {self.dist.rank}: code cache {cache.key} missing")
        if len(codes.train) == 0:
            raise EmptySubsetError("the training split has no segments after tokenization")
        self.dataset_facts = {
            "source": cfg.dataset.source.value,
            "uri": cfg.dataset.uri,
            "manifestDigest": manifest_digest,
            "codesKey": codes.key,
            "segmentSeconds": cfg.dataset.segment_seconds,
            "trainSegments": len(codes.train),
            "validationSegments": len(codes.validation),
        }
        log.info(
            "codes_ready",
            key=codes.key,
            source=codes.source,
            train_segments=len(codes.train),
            validation_segments=len(codes.validation),
            segment_frames=codes.segment_frames,
        )
        return codes

    def _load_prepared(self, cache: CodesCache, manifest_digest: str) -> CodesDataset | None:
        """``spec.preparation.mode: Pod``: the dataset a preparation pod prepared and verified —
        exactly that manifest and code cache (on every rank), or a clear error: the GPU pod never
        tokenizes in this mode. None in mode Trainer (no prepared dataset named)."""
        want_manifest, want_key = self.env.prepared_manifest_digest, self.env.prepared_codes_key
        if want_key is None and want_manifest is None:
            return None
        if want_manifest is not None and want_manifest != manifest_digest:
            raise TrainerConfigError(
                f"the dataset manifest is {manifest_digest}, not the prepared and verified "
                f"{want_manifest}: the dataset changed after its preparation pod verified it"
            )
        if want_key is not None and want_key != cache.key:
            raise TrainerConfigError(
                f"this trainer's code cache key is {cache.key}, not the prepared and verified "
                f"{want_key} (another model, segment length or preparation settings?)"
            )
        codes = cache.load()
        if codes is None:
            raise TrainerConfigError(
                f"the prepared code cache {cache.key} is missing from {cache.mirror_uri or 'the cache'} "
                "(spec.preparation.mode Pod: the training pod does not tokenize; delete and re-create "
                "the run, or use mode Trainer)"
            )
        log.info("prepared_dataset_loaded", key=cache.key, manifest=manifest_digest, source=codes.source)
        return codes

    # ================================================================== checkpoint state

    def _state_payload(self, scheduler: Any, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "position": {"epoch": self.position.epoch, "index": self.position.index},
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "losses": list(self.losses),
            "loss_window": list(self.loss_window),
            "history": self.history,
            "baseline": self.baseline,
            "ack": self.ack,
            "evaluation_ack": self.evaluation_ack,
            "last_eval": _eval_to_json(self.last_eval),
            "last_eval_step": self.last_eval_step,
            "model": self.config.model.base,
            "precision": self.precision.name,
            "scaler": self.scaler.state_dict(),  # {} without a scaler
            "artifacts": self.artifacts.wire(),
        }

    def _restore(
        self,
        files: dict[str, str],
        lm: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> None:
        lm.load_state_dict(torch.load(files["lm.pt"], map_location=self.device, weights_only=True))
        optimizer.load_state_dict(
            torch.load(files["optimizer.pt"], map_location=self.device, weights_only=True)
        )
        state = torch.load(files["state.pt"], map_location="cpu", weights_only=True)
        scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.position = DataPosition(int(state["position"]["epoch"]), int(state["position"]["index"]))
        self.losses = [float(x) for x in state["losses"]]
        self.loss_window = deque((float(x) for x in state["loss_window"]), maxlen=TRAIN_LOSS_WINDOW)
        self.history = list(state["history"])
        self.baseline = state["baseline"]
        self.ack = state["ack"]
        self.evaluation_ack = state.get("evaluation_ack")
        self.last_eval = _eval_from_json(state.get("last_eval"))
        self.last_eval_step = state.get("last_eval_step")
        self._restore_scaler(state)
        self.artifacts = Artifacts.model_validate(state.get("artifacts") or {})
        rng_states = state["rng"]
        if len(rng_states) == self.dist.world_size:
            _restore_rng(rng_states[self.dist.rank])
        else:
            log.warning(
                "rng_world_size_changed",
                saved=len(rng_states),
                now=self.dist.world_size,
            )
            _restore_rng(rng_states[0])
        if int(state.get("world_size", 1)) != self.dist.world_size:
            log.warning(
                "world_size_changed",
                saved=state.get("world_size"),
                now=self.dist.world_size,
                note="batches after resume differ from an uninterrupted run",
            )

    def _restore_scaler(self, state: dict[str, Any]) -> None:
        """The gradient scaler's scale and growth tracker, when both runs use one."""
        saved = state.get("scaler") or {}
        if self.scaler.is_enabled() and saved:
            self.scaler.load_state_dict(saved)
        if state.get("precision", self.precision.name) != self.precision.name:
            log.warning(
                "precision_changed",
                saved=state.get("precision"),
                now=self.precision.name,
                note="losses after resume differ from an uninterrupted run",
            )

    def _on_main_then_everywhere(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 (None elsewhere); a failure there is raised on every rank (a
        config error as a config error), so no rank waits for a collective rank 0 never joins."""
        result: T | None = None
        error: Exception | None = None
        if self.dist.is_main:
            try:
                result = fn()
            except Exception as exc:
                error = exc
        failure = broadcast_object(
            self.dist,
            None if error is None else (isinstance(error, TrainerConfigError), str(error)),
        )
        if error is not None:
            raise error
        if failure is not None:
            is_config, message = failure
            raise TrainerConfigError(message) if is_config else RuntimeError(f"rank 0: {message}")
        return result

    def _resume_source(self, store: CheckpointStore) -> VerifiedCheckpoint | None:
        """Rank 0: the checkpoint to resume from (see :meth:`CheckpointStore.resolve_resume`);
        only a checkpoint of this run's own becomes ``status.lastCheckpoint``."""
        verified = store.resolve_resume(
            self.env.resume_from,
            expected_digest=self.env.resume_digest,
            explicit=self.env.resume_explicit,
        )
        if verified is None:
            return None
        if verified.in_store and verified.other_run is None:
            self.last_checkpoint = verified.ref
            started_from = verified.manifest.get("startedFrom")
            self.started_from = str(started_from) if started_from else None
            return verified
        source = describe_run(verified.other_run) if verified.other_run else "another location"
        self.message = (
            f"started from another run's checkpoint {verified.ref.uri} (step {verified.step}, {source})"
        )[:1000]
        log.warning(
            "resumed_from_other_run",
            checkpoint=verified.ref.uri,
            digest=verified.ref.digest,
            step=verified.step,
            source_run=verified.other_run,
        )
        return verified

    # ================================================================== main

    def run(self) -> RunOutcome:
        self._install_signal_handlers()
        try:
            return self._run()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            self.report(TrainerState.failed, message=f"{type(exc).__name__}: {exc}"[:1000])
            raise
        finally:
            self._restore_signal_handlers()
            if self.tensorboard is not None:
                with contextlib.suppress(Exception):
                    self.tensorboard.close()
            if self.gpu is not None:
                self.gpu.close()
            with contextlib.suppress(Exception):
                self.reporter.close()

    def _run(self) -> RunOutcome:
        cfg = self.config
        self.device = init_distributed(self.dist)
        if cfg.gpus == 0 or (cfg.gpus > 0 and self.device.type != "cuda"):
            if cfg.gpus > 0:
                log.warning("no_cuda", gpus_requested=cfg.gpus, note="training on CPU")
            self.device = torch.device("cpu")
        if self.dist.enabled:
            bind_context(rank=self.dist.rank)
        self._choose_precision()
        self._seed()
        work_dir = Path(cfg.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(cfg.storage.checkpoints)
        if isinstance(storage, S3Storage):  # children (cache, samples, tensorboard) inherit it
            r = storage.retry
            storage.retry = _ReportingRetry(r.attempts, r.base_delay, r.max_delay, self._storage_trouble)
        if self.dist.is_main:
            self.gpu = GpuMonitor()
        log.info(
            "trainer_starting",
            run=cfg.run.name or None,
            model=cfg.model.base,
            storage=storage.uri,
            device=str(self.device),
            world_size=self.dist.world_size,
            incarnation=self.env.incarnation,
            pod=self.env.pod_name,
        )
        self._on_main_then_everywhere(lambda: claim_prefix(storage, cfg.run))
        self.report(TrainerState.preparing)
        prepared, manifest_digest = self._prepare_manifest(storage, work_dir)
        self.clip_meta = self._clip_meta(prepared)

        model = load_model(
            cfg.model.base,
            self.device,
            work_dir,
            mirror=storage.child(RUN_MIRROR_PREFIX),
            publish=self.dist.is_main,
        )
        self.sample_rate = model.sample_rate
        self.exporter = Exporter(
            ExportStore(storage, work_dir / "exports-staging"), model, cfg.evaluation.best_metric
        )
        codes = self._prepare_codes(storage, work_dir, model, prepared, manifest_digest)
        train = codes.train
        if self._stop_requested_locally() and self.dist.is_main:
            log.info("stopping_before_training", signal=self.signal_received)

        tcfg = cfg.training
        plan = BatchPlan(
            len(train), tcfg.batch_size, tcfg.gradient_accumulation, self.dist.world_size, tcfg.seed
        )
        self.total_steps = plan.total_steps(tcfg.epochs, tcfg.max_steps)
        lm: nn.Module = model.lm
        store = CheckpointStore(storage, cfg.storage.keep_last, work_dir / "checkpoints", owner=cfg.run)

        verified = self._on_main_then_everywhere(lambda: self._resume_source(store))
        resumed_files = broadcast_object(
            self.dist, {k: str(v) for k, v in verified.files.items()} if verified else None
        )
        from_other_run = bool(
            broadcast_object(self.dist, verified is not None and self.last_checkpoint is None)
        )
        if from_other_run and verified is not None:
            self.started_from = verified.ref.uri

        loss_module: nn.Module = LMLoss(lm)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            loss_module = DistributedDataParallel(
                loss_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        optimizer = build_optimizer(lm, tcfg.learning_rate, tcfg.weight_decay)
        scheduler = build_scheduler(optimizer, tcfg.warmup_steps, self.total_steps)
        if resumed_files is not None:
            self._restore(resumed_files, lm, optimizer, scheduler)
            self.checkpoint_step = self.step
            if from_other_run:
                # the other run's control-channel answers mean nothing to this run's operator
                self.ack = None
                self.evaluation_ack = None
                self.artifacts = Artifacts()  # the other run's exports are not this run's
            log.info(
                "resumed",
                step=self.step,
                epoch=self.position.epoch,
                index=self.position.index,
                checkpoint=verified.ref.uri if verified else None,
                from_other_run=from_other_run,
            )
        lm.train()

        evaluator = Evaluator(
            model, cfg.evaluation, storage, work_dir, self.device, tcfg.seed, tcfg.batch_size
        )
        if self.dist.is_main:
            self.tensorboard = TensorBoardSink(work_dir / "tensorboard", storage.child("tensorboard"))

        log.info(
            "training_plan",
            train_segments=len(train),
            steps_per_epoch=plan.steps_per_epoch,
            total_steps=self.total_steps,
            start_step=self.step,
            samples_per_step=plan.samples_per_step,
        )

        if resumed_files is None and self.step == 0 and not self._stop_requested_locally():
            self._evaluate(evaluator, codes, baseline=True)
        if self.state is not TrainerState.training:
            self.report(TrainerState.training)

        bar = ProgressBar(self.total_steps, self.step) if self.dist.is_main else None
        try:
            outcome = self._loop(plan, codes, lm, loss_module, optimizer, scheduler, store, evaluator, bar)
        finally:
            if bar is not None:
                bar.close()
        return outcome

    def _loop(
        self,
        plan: BatchPlan,
        codes: CodesDataset,
        lm: nn.Module,
        loss_module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        store: CheckpointStore,
        evaluator: Evaluator,
        bar: ProgressBar | None,
    ) -> RunOutcome:
        tcfg = self.config.training
        while True:
            stop_local = self._stop_requested_locally()
            request = self.pending_request
            evaluation, evaluation_needed = self._due_evaluation()
            # Only rank 0 reads status.control: the OR makes its decisions every rank's.
            stop, requested, request_stop, evaluate_now = any_rank(
                self.dist,
                [stop_local, request is not None, bool(request and request.stop), evaluation_needed],
                self.device,
            )
            if stop or requested:
                reason = "signal" if stop else "request"
                self._checkpoint(store, lm, optimizer, scheduler, reason, request)
                if stop or request_stop:
                    why = self.signal_received or (
                        f"checkpoint request {request.id}" if request else "stop file"
                    )
                    self._final_report(f"stopped after step {self.step}: {why}")
                    self._write_stop_report(store.storage)
                    log.info("trainer_stopped", step=self.step, reason=why)
                    return self._outcome(EXIT_STOPPED_WITH_CHECKPOINT, TrainerState.stopped)
                self.report(TrainerState.training)

            if evaluate_now or evaluation is not None:
                self._answer_evaluation(evaluation, evaluate_now, evaluator, codes)

            if self.step >= self.total_steps:
                break

            started = time.monotonic()
            loss, grad_norm = self._train_step(plan, codes, lm, loss_module, optimizer, scheduler)
            self.step += 1
            self.epoch = self.position.epoch
            self.position = plan.advance(self.position)
            self.losses.append(loss)
            self.loss_window.append(loss)
            self._samples_since_report += plan.samples_per_step
            if self.gpu is not None:
                self.gpu.sample()
            if self.dist.is_main:
                self._log_step(loss, float(scheduler.get_last_lr()[0]), grad_norm, started, bar)

            if self.step % tcfg.evaluate_every_steps == 0:
                self._evaluate(evaluator, codes)
            if self.step % tcfg.checkpoint_every_steps == 0:
                self._periodic_checkpoint(store, lm, optimizer, scheduler)
                self.report(TrainerState.training)
            elif self._heartbeat_due():
                self.report(TrainerState.training)

        # completed
        if self.last_eval_step != self.step:
            self._evaluate(evaluator, codes)
        export_error = self._export_final()  # before the final checkpoint, which records it
        if self.checkpoint_step != self.step:
            self._checkpoint(store, lm, optimizer, scheduler, "final", None)
        if export_error is not None:  # the retried pod resumes from that checkpoint and exports
            raise export_error
        if self.tensorboard is not None:
            self.tensorboard.sync()
        self.report(TrainerState.completed, message=f"completed {self.step} steps")
        log.info(
            "trainer_completed",
            step=self.step,
            train_loss=self.losses[-1] if self.losses else None,
            validation_loss=self.last_eval.validation_loss if self.last_eval else None,
            baseline_validation_loss=self.baseline,
        )
        return self._outcome(0, TrainerState.completed)

    def _log_step(
        self, loss: float, lr: float, grad_norm: float, started: float, bar: ProgressBar | None
    ) -> None:
        log.info(
            "train_step",
            step=self.step,
            epoch=self.epoch,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            seconds=round(time.monotonic() - started, 4),
        )
        if self.tensorboard is not None:
            self.tensorboard.scalars(
                self.step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}
            )
        if bar is not None:
            bar.update(self.step, loss)

    def _periodic_checkpoint(
        self, store: CheckpointStore, lm: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> None:
        try:
            self._checkpoint(store, lm, optimizer, scheduler, "periodic", None)
            if self.message and self.message.startswith((CHECKPOINT_FAILED, STORAGE_TROUBLE)):
                self.message = None  # storage is back: the trouble is over
        except Exception as exc:  # the next periodic (or final) checkpoint retries
            log.error("checkpoint_failed", step=self.step, error=f"{type(exc).__name__}: {exc}")
            # Surfaced in status.progress.message until a checkpoint succeeds again.
            self.message = (
                f"{CHECKPOINT_FAILED} at step {self.step}: {type(exc).__name__}: {exc}"[:700]
                + "; training goes on, the next checkpoint retries"
            )

    def _outcome(self, code: int, state: TrainerState) -> RunOutcome:
        return RunOutcome(code, state, self.step, self.total_steps, self.last_checkpoint, list(self.losses))

    # ================================================================== one step

    def _train_step(
        self,
        plan: BatchPlan,
        codes: CodesDataset,
        lm: nn.Module,
        loss_module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> tuple[float, float]:
        tcfg = self.config.training
        train = codes.train
        micro_batches = plan.micro_batches(self.position, self.dist.rank)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for m, indices in enumerate(micro_batches):
            batch_codes = train.codes[indices].to(device=self.device, dtype=torch.long)
            valid = train.masks[indices].to(self.device)
            drop = cfg_dropout_mask(
                len(indices),
                tcfg.cfg_dropout,
                tcfg.seed,
                self.step,
                m * self.dist.world_size + self.dist.rank,
            )
            prompts = apply_cfg_dropout(self._train_prompts(train, indices), drop)
            attributes = make_attributes(lm, prompts, self.sample_rate)
            provider: Any = lm.condition_provider
            tokenized = provider.tokenize(attributes)
            last = m == len(micro_batches) - 1
            sync = (
                contextlib.nullcontext() if last or not self.dist.enabled else loss_module.no_sync()  # type: ignore[operator]
            )
            with sync:
                with self._autocast():
                    loss, _, _ = loss_module(batch_codes, valid, tokenized)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += float(loss.detach()) / len(micro_batches)
        grad_norm = self._optimizer_step(lm, optimizer)
        scheduler.step()
        if self.dist.enabled:
            import torch.distributed as dist

            value = torch.tensor([total], device=self.device, dtype=torch.float64)
            dist.all_reduce(value)
            total = float(value.item()) / self.dist.world_size
        return total, grad_norm

    def _clip_meta(self, prepared: PreparedDataset | None) -> dict[str, ClipEntry]:
        """Rank 0's training entries by clip id, on every rank (augmentation needs them)."""
        if not self.config.training.prompt_augmentation:
            return {}
        meta = {e.id: e for e in prepared.train} if prepared is not None else None
        return dict(broadcast_object(self.dist, meta) or {})

    def _train_prompts(self, train: CodesSplit, indices: list[int]) -> list[str]:
        """The text prompts of training segments ``indices``: with training.promptAugmentation a
        per-epoch variant (a pure function of seed, epoch and clip id, so resuming replays it)."""
        tcfg = self.config.training
        if not tcfg.prompt_augmentation:
            return [train.prompts[i] for i in indices]
        out: list[str] = []
        for i in indices:
            clip_id = train.clip_ids[i]
            entry = self.clip_meta.get(clip_id)
            out.append(
                augmented_prompt(
                    train.prompts[i],
                    entry.tags if entry else (),
                    entry.bpm if entry else None,
                    entry.key if entry else None,
                    clip_id,
                    self.position.epoch,
                    tcfg.seed,
                )
            )
        return out

    def _optimizer_step(self, lm: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """Unscale (fp16), clip and step; a step with non-finite gradients is skipped, and with a
        gradient scaler that also lowers the loss scale (expected now and then in fp16). The
        gradients are all-reduced already, so every rank skips the same steps."""
        self.scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(lm.parameters(), self.config.training.gradient_clip))
        if math.isfinite(grad_norm):
            self.scaler.step(optimizer)  # without a scaler: optimizer.step()
        else:
            log.warning(
                "non_finite_gradients_skipped",
                step=self.step + 1,
                grad_norm=grad_norm,
                loss_scale=self.scaler.get_scale() if self.scaler.is_enabled() else None,
            )
            optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # without a scaler: nothing
        return grad_norm

    # ================================================================== evaluation

    def _evaluate(self, evaluator: Evaluator, codes: CodesDataset, baseline: bool = False) -> None:
        if self.dist.is_main:
            self.report(TrainerState.evaluating)
            result = evaluator.evaluate(self.step, codes.train, codes.validation, autocast=self._autocast)
            self.last_eval = result
            if baseline:
                self.baseline = result.validation_loss
            else:
                self._export_best()
            entry = _eval_to_json(result) or {}
            entry["baseline"] = baseline
            self.history.append(entry)
            if self.tensorboard is not None:
                values: dict[str, float | None] = {
                    "validation/loss": result.validation_loss,
                    "validation/perplexity": result.perplexity,
                    "authenticity/score": result.authenticity,
                }
                for name, value in (result.components or {}).items():
                    values[f"authenticity/{name}"] = value
                self.tensorboard.scalars(self.step, values)
                self.tensorboard.sync()
            self.report(TrainerState.training)
        self.last_eval_step = self.step
        barrier(self.dist)

    def _due_evaluation(self) -> tuple[EvaluationRequest | None, bool]:
        """The pending evaluation request once the run is at or past its minStep (rank 0; None
        elsewhere), and whether answering it needs an evaluation: not when one at or after
        minStep exists already (e.g. the scheduled evaluation at this very step)."""
        request = self.pending_evaluation
        if request is None or self.step < request.min_step:
            return None, False
        evaluated = self.last_eval_step is not None and self.last_eval_step >= request.min_step
        return request, not evaluated

    def _answer_evaluation(
        self,
        request: EvaluationRequest | None,
        evaluate: bool,
        evaluator: Evaluator,
        codes: CodesDataset,
    ) -> None:
        """Evaluate (every rank, when any must) and acknowledge the request (rank 0)."""
        if evaluate:
            self._evaluate(evaluator, codes)
        if request is None:
            return
        self.evaluation_ack = request.id
        self.pending_evaluation = None
        log.info(
            "evaluation_request_answered",
            id=request.id,
            min_step=request.min_step,
            evaluated_step=self.last_eval_step,
            evaluated_now=evaluate,
        )
        self.report(TrainerState.training)

    # ================================================================== exports

    def _export_context(self) -> ExportContext:
        return ExportContext(
            base_model=self.config.model.base,
            run=self.config.run,
            step=self.step,
            epoch=self.epoch,
            total_steps=self.total_steps,
            evaluation=self.last_eval if self.last_eval and self.last_eval.step == self.step else None,
            baseline=self.baseline,
            train_loss=float(sum(self.loss_window) / len(self.loss_window)) if self.loss_window else None,
            incarnation=self.env.incarnation,
            pod=self.env.pod_name,
            started_from=self.started_from,
            precision=self.precision.name,
            dataset=dict(self.dataset_facts),
            cost=self.cost_seen,
        )

    def _export_best(self) -> None:
        """Rank 0, after an evaluation: export it when it improves evaluation.bestMetric. A
        failure is logged and shown in the status; training goes on."""
        if self.exporter is None:
            return
        try:
            self.artifacts = self.exporter.on_evaluation(self.artifacts, self._export_context())
            if self.message and self.message.startswith(EXPORT_FAILED):
                self.message = None
        except Exception as exc:
            log.error("export_failed", step=self.step, error=f"{type(exc).__name__}: {exc}")
            self.message = f"{EXPORT_FAILED} at step {self.step}: {type(exc).__name__}: {exc}"[:1000]

    def _export_final(self) -> Exception | None:
        """The final export (rank 0); its failure, on every rank, for the caller to raise."""

        def export() -> None:
            if self.exporter is not None:
                self.artifacts = self.exporter.on_completion(self.artifacts, self._export_context())

        try:
            self._on_main_then_everywhere(export)
        except Exception as exc:
            log.error("export_failed", step=self.step, final=True, error=f"{type(exc).__name__}: {exc}")
            return exc
        return None

    # ================================================================== checkpoints

    def _checkpoint(
        self,
        store: CheckpointStore,
        lm: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        reason: str,
        request: CheckpointRequest | None,
    ) -> None:
        previous_ack = self.ack
        if request is not None:
            self.ack = request.id  # stored in the checkpoint that answers it
        rng = gather_objects(self.dist, _rng_state())
        error: Exception | None = None
        if self.dist.is_main:
            try:
                if self.last_checkpoint is not None and self.last_checkpoint.step == self.step:
                    log.info(
                        "checkpoint_current", step=self.step, reason=reason, uri=self.last_checkpoint.uri
                    )
                elif self.step == 0:
                    log.info("checkpoint_skipped_no_progress", reason=reason)
                else:
                    self.report(TrainerState.checkpointing)
                    self._write_checkpoint(store, lm, optimizer, scheduler, reason, rng)
                if self.tensorboard is not None:
                    self.tensorboard.sync()
            except Exception as exc:  # every rank learns of it below, then all raise alike
                error = exc
        (failed,) = any_rank(self.dist, [error is not None], self.device)
        if failed:
            self.ack = previous_ack  # unanswered: the request stays pending
            if error is not None:
                raise error
            raise RuntimeError(f"checkpoint at step {self.step} failed on rank 0")
        if request is not None:
            self.pending_request = None
        if self.step > 0:
            self.checkpoint_step = self.step

    def _write_checkpoint(
        self,
        store: CheckpointStore,
        lm: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        reason: str,
        rng: list[dict[str, Any]],
    ) -> None:
        staging = store.local_dir.parent / "staging" / step_dir_name(self.step)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        files = {
            "lm.pt": staging / "lm.pt",
            "optimizer.pt": staging / "optimizer.pt",
            "state.pt": staging / "state.pt",
            "metrics.json": staging / "metrics.json",
        }
        serialize_started = time.monotonic()  # the checkpoint's duration counts from here
        torch.save(lm.state_dict(), files["lm.pt"])
        torch.save(optimizer.state_dict(), files["optimizer.pt"])
        torch.save(self._state_payload(scheduler, rng), files["state.pt"])
        files["metrics.json"].write_text(
            json.dumps(
                {
                    "step": self.step,
                    "baselineValidationLoss": self.baseline,
                    "evaluations": self.history,
                    "trainLoss": self.losses[-TRAIN_LOSS_WINDOW:],
                },
                indent=2,
            )
        )
        serialize_seconds = time.monotonic() - serialize_started
        try:
            self.last_checkpoint = store.write(
                self.step,
                self.epoch,
                reason,
                files,
                extra={
                    "model": self.config.model.base,
                    "runName": self.config.run.name or None,
                    "incarnation": self.env.incarnation,
                    "pod": self.env.pod_name,
                    "checkpointRequestAck": self.ack,
                    "startedFrom": self.started_from,
                },
                serialize_seconds=serialize_seconds,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            store.prune()
        except Exception as exc:  # pruning is housekeeping: never fatal
            log.warning("checkpoint_prune_failed", error=f"{type(exc).__name__}: {exc}")


#: Prefixes of ``status.progress.message`` while storage calls are being retried, and after a
#: checkpoint could not be written; cleared by the next checkpoint that is.
STORAGE_TROUBLE = "storage trouble"
CHECKPOINT_FAILED = "checkpoint failed"
#: Prefix of ``status.progress.message`` after an export of a best evaluation failed.
EXPORT_FAILED = "export failed"


@dataclass(frozen=True)
class _ReportingRetry(RetryPolicy):
    """The storage retry policy, telling the trainer each time a call is about to be retried."""

    on_retry: Callable[[int, BaseException | None], None] | None = None

    def delay(self, attempt: int) -> float:
        if self.on_retry is not None:
            # Called from the retry loop's ``except`` block: the error being retried is current.
            self.on_retry(attempt, sys.exc_info()[1])
        return super().delay(attempt)


def _cost_of(run_object: dict[str, Any]) -> dict[str, Any] | None:
    """``status.cost`` of a TrainingRun as the API returned it: {accruedUSD, updated}, or None."""
    cost = (run_object.get("status") or {}).get("cost")
    if not isinstance(cost, dict):
        return None
    accrued = cost.get("accruedUSD")
    if isinstance(accrued, bool) or not isinstance(accrued, int | float) or not math.isfinite(accrued):
        return None
    return {"accruedUSD": float(accrued), "updated": cost.get("updated")}


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _eval_to_json(result: EvaluationResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "step": result.step,
        "validationLoss": result.validation_loss,
        "validationPerplexity": result.perplexity,
        "authenticity": result.authenticity,
        "components": result.components,
        "samples": result.samples_uri,
        "perCodebook": result.per_codebook,
        "note": result.note,
    }


def _eval_from_json(data: dict[str, Any] | None) -> EvaluationResult | None:
    if not data:
        return None
    return EvaluationResult(
        step=int(data["step"]),
        validation_loss=data.get("validationLoss"),
        perplexity=data.get("validationPerplexity"),
        authenticity=data.get("authenticity"),
        components=data.get("components"),
        samples_uri=data.get("samples"),
        per_codebook=list(data.get("perCodebook") or []),
        note=data.get("note"),
    )
