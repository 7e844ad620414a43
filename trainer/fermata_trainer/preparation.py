"""``fermata-train prepare --tokenize``: the preparation pod (``spec.preparation.mode: Pod``).

On CPU capacity, before the GPU pod: scan, verify and filter the dataset (the manifest, with
its sha256, in storage), load the compression model only (EnCodec: no LM, no text encoder is
loaded), decode, resample, segment and tokenize every clip into the code cache (per-file codes,
so a re-created pod resumes where the last one stopped, then the assembled shards with their
index), mirror it to storage, verify what storage holds against the digests, and report it all in
``status.preparation`` under the field manager ``fermata-preparer``: files done of total, how
many were tokenized here and how many reused, the ETA, and at the end the manifest digest and
the code cache key the training pod must load.

Exit codes as ``fermata-train run``: 0 verified (or stopped by SIGTERM: the next pod resumes),
2 bad configuration or dataset (the run fails), 1 anything else (the pod is retried).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from fermata_api import PodEnv, PreparationReport, PreparationState, PreparationStatus, TrainerConfig
from fermata_trainer.checkpoints import claim_prefix
from fermata_trainer.codes_cache import INDEX_NAME, CodesCache, CodesDataset
from fermata_trainer.curation import audio_processor, processing_fingerprint
from fermata_trainer.dataset import MANIFEST_KEY, AudioFetcher, PreparedDataset, prepare_dataset
from fermata_trainer.errors import ObjectNotFoundError, TrainerConfigError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.model_loading import TINY_SCHEME, LoadedModel, build_tiny_musicgen, parse_tiny
from fermata_trainer.model_mirror import RUN_MIRROR_PREFIX
from fermata_trainer.reporter import NullReporter, StatusReporter
from fermata_trainer.storage import Storage, open_storage, sha256_bytes

log = get_logger(__name__)


class PreparationStopped(Exception):
    """SIGTERM during tokenizing: every clip encoded so far is in the cache; the next pod resumes."""


def codes_mirror(config: TrainerConfig, storage: Storage) -> Storage:
    """Where the code cache is mirrored (as the training loop has it)."""
    cfg = config.storage
    return open_storage(cfg.cache_uri) if cfg.cache_uri else storage.child("cache")


def load_compression_model(
    base: str, device: torch.device, work_dir: Path, mirror: Storage | None
) -> LoadedModel:
    """Only the compression model of ``model.base`` (what tokenizing needs), as a
    :class:`LoadedModel` without an LM. The base model's files are fetched as the trainer would
    (run mirror, staged mirror, folder, Hub) and published to the run's model mirror, so the GPU
    pod restores them from there."""
    if base.startswith(TINY_SCHEME):
        model = build_tiny_musicgen(spec=parse_tiny(base))  # a few kilobytes: LM and all
        model.compression_model.eval()
        return model
    from audiocraft.models import loaders

    from fermata_trainer.model_hub import hub_offline
    from fermata_trainer.model_loading import _trusted_checkpoint_loading, resolve_model_files
    from fermata_trainer.model_mirror import publish_mirror

    files = resolve_model_files(base, work_dir, mirror)
    log.info("compression_model_loading", base=base, source=str(files.load_from), origin=files.origin)
    try:
        with hub_offline(), _trusted_checkpoint_loading():
            compression = loaders.load_compression_model(files.load_from, device=str(device))
    except (FileNotFoundError, OSError, KeyError, AssertionError) as exc:
        raise TrainerConfigError(f"model.base {base}: cannot load its compression model: {exc}") from exc
    if mirror is not None and files.origin != "mirror":
        try:
            publish_mirror(mirror, base, files)
        except Exception as exc:  # the GPU pod fetches again: slower, not wrong
            log.warning("model_mirror_failed", mirror=mirror.uri, error=f"{type(exc).__name__}: {exc}")
    for p in compression.parameters():
        p.requires_grad_(False)
    compression.eval()
    return LoadedModel(
        model_id=base, lm=None, compression_model=compression, compression_file=files.compression_file
    )


class Preparer:
    """One preparation pod's work and its reports."""

    def __init__(
        self,
        config: TrainerConfig,
        env: PodEnv,
        reporter: StatusReporter | None = None,
        heartbeat_seconds: float | None = None,
    ) -> None:
        self.config = config
        self.env = env
        self.reporter: StatusReporter = reporter if reporter is not None else NullReporter()
        self.heartbeat_seconds = heartbeat_seconds or config.reporting.heartbeat_seconds
        now = datetime.now(UTC)
        self.report = PreparationReport(
            state=PreparationState.scanning, heartbeat_time=now, pod_name=env.pod_name, started_at=now
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.signal_received: str | None = None

    # ------------------------------------------------------------------ reporting

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.report = self.report.model_copy(update=fields)

    def send(self, attempts: int = 1) -> bool:
        for attempt in range(attempts):
            with self._lock:
                self.report = self.report.model_copy(update={"heartbeat_time": datetime.now(UTC)})
                body = PreparationStatus(preparation=self.report)
            try:
                sent = self.reporter.report(body) is not None or isinstance(self.reporter, NullReporter)
            except Exception as exc:  # reporting never stops the preparation
                log.warning("preparation_report_error", error=f"{type(exc).__name__}: {exc}")
                sent = False
            if sent:
                return True
            if attempt + 1 < attempts:
                time.sleep(min(5.0, 0.5 * 2**attempt))
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            self.send()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal_received is None:
            self.signal_received = signal.Signals(signum).name
        else:
            signal.signal(signum, signal.SIG_DFL)

    # ------------------------------------------------------------------ the work

    def run(self, tokenize: bool = True, rebuild: bool = False) -> int:
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                previous[sig] = signal.signal(sig, self._on_signal)
        beat = threading.Thread(target=self._heartbeat, name="preparation-heartbeat", daemon=True)
        beat.start()
        try:
            return self._run(tokenize, rebuild)
        except PreparationStopped:
            log.info("preparation_stopped", signal=self.signal_received, done=self.report.files_done)
            self.update(
                state=PreparationState.stopped, eta_seconds=None, message=f"stopped by {self.signal_received}"
            )
            self.send(attempts=3)
            return 0
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt | SystemExit):
                self.update(state=PreparationState.failed, message=f"{type(exc).__name__}: {exc}"[:1000])
                self.send(attempts=3)
            raise
        finally:
            self._stop.set()
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)
            with contextlib.suppress(Exception):
                self.reporter.close()

    def _run(self, tokenize: bool, rebuild: bool) -> int:
        cfg = self.config
        storage = open_storage(cfg.storage.checkpoints)
        claim_prefix(storage, cfg.run)  # the dataset manifest and the code cache go there
        work_dir = Path(cfg.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.send()
        prepared = prepare_dataset(cfg.dataset, storage, work_dir, reuse=not rebuild, verify_reused=True)
        self.update(
            files_total=len(prepared.entries),
            manifest_uri=storage.uri_of(MANIFEST_KEY),
            manifest_digest=prepared.manifest_digest,
        )
        if not tokenize:
            return 0
        self._raise_if_stopped()
        device = torch.device("cpu")
        model = load_compression_model(cfg.model.base, device, work_dir, storage.child(RUN_MIRROR_PREFIX))
        mirror = codes_mirror(cfg, storage)
        cache = CodesCache(
            model,
            prepared.manifest_digest,
            cfg.dataset.segment_seconds,
            work_dir / "codes",
            mirror,
            processing=processing_fingerprint(cfg.dataset.curation),
            process=audio_processor(cfg.dataset.curation),
        )
        self.update(codes_key=cache.key, codes_uri=cache.mirror_uri)
        codes = cache.load()
        if codes is None:
            codes = self._tokenize(cache, prepared, work_dir, device)
        else:
            self.update(files_done=len(prepared.entries), reused=len(prepared.entries))
        self.update(state=PreparationState.verifying, eta_seconds=None)
        self.send()
        self._verify(storage, cache, prepared, codes)
        self.update(state=PreparationState.completed, finished_at=datetime.now(UTC), message=None)
        if not self.send(attempts=6):
            raise RuntimeError("could not report the verified preparation to the TrainingRun")
        log.info(
            "preparation_completed",
            manifest=prepared.manifest_digest,
            codes=cache.key,
            clips=len(prepared.entries),
            tokenized=self.report.tokenized,
            reused=self.report.reused,
        )
        return 0

    def _raise_if_stopped(self) -> None:
        if self.signal_received is not None:
            raise PreparationStopped(self.signal_received)

    def _tokenize(
        self, cache: CodesCache, prepared: PreparedDataset, work_dir: Path, device: torch.device
    ) -> CodesDataset:
        self.update(state=PreparationState.tokenizing)
        self.send()
        clock = time.monotonic()
        last = [clock]

        def progress(done: int, total: int) -> None:
            stats = cache.stats
            reused = stats.reused if stats is not None else 0
            tokenized = stats.tokenized if stats is not None else done
            elapsed = time.monotonic() - clock
            eta = (total - done) * elapsed / tokenized if tokenized else None
            self.update(
                files_done=done, files_total=total, tokenized=tokenized, reused=reused, eta_seconds=eta
            )
            self._raise_if_stopped()
            if time.monotonic() - last[0] >= self.heartbeat_seconds:
                last[0] = time.monotonic()
                self.send()

        codes = cache.build(
            prepared.entries,
            AudioFetcher(work_dir),
            device,
            verify_checksums=self.config.dataset.verify_checksums,
            progress=progress,
        )
        stats = cache.stats
        if stats is not None:
            self.update(tokenized=stats.tokenized, reused=stats.reused, files_done=stats.clips)
        return codes

    def _verify(
        self, storage: Storage, cache: CodesCache, prepared: PreparedDataset, codes: CodesDataset
    ) -> None:
        """What storage holds is what was prepared: the manifest by its digest, the code cache
        index by its key and every shard it lists."""
        manifest = storage.get_bytes(MANIFEST_KEY)
        if sha256_bytes(manifest) != prepared.manifest_digest.removeprefix("sha256:"):
            raise RuntimeError(f"{storage.uri_of(MANIFEST_KEY)} does not match {prepared.manifest_digest}")
        if codes.key != cache.key:
            raise RuntimeError(f"code cache {codes.key} is not {cache.key}")
        if cache.mirror is None:
            return
        try:
            index = json.loads(cache.mirror.read_text(INDEX_NAME))
        except ObjectNotFoundError:
            raise RuntimeError(f"code cache index {cache.mirror.uri_of(INDEX_NAME)} missing") from None
        sizes = {o.key: o.size for o in cache.mirror.list()}
        for split in index.get("splits", {}).values():
            for shard in split["shards"]:
                if sizes.get(shard["name"]) != shard["size"]:
                    raise RuntimeError(
                        f"code cache shard {cache.mirror.uri_of(shard['name'])} missing or incomplete"
                    )


# ----------------------------------------------------------------------------- mode Trainer


def preparation_progress(
    previous: PreparationReport | None, cache: CodesCache, done: int, total: int, pod: str | None
) -> PreparationReport:
    """The GPU pod's own tokenizing report (``spec.preparation.mode: Trainer``)."""
    now = datetime.now(UTC)
    start = previous.started_at if previous is not None and previous.started_at else now
    stats = cache.stats
    tokenized = stats.tokenized if stats is not None else done
    elapsed = (now - start).total_seconds()
    return PreparationReport(
        state=PreparationState.tokenizing,
        heartbeat_time=now,
        pod_name=pod,
        files_done=done,
        files_total=total,
        tokenized=tokenized,
        reused=stats.reused if stats is not None else 0,
        eta_seconds=(total - done) * elapsed / tokenized if tokenized else None,
        codes_key=cache.key,
        codes_uri=cache.mirror_uri,
        started_at=start,
    )


def preparation_done(
    previous: PreparationReport | None,
    cache: CodesCache,
    manifest_digest: str,
    pod: str | None,
    clips: int = 0,
) -> PreparationReport:
    """The GPU pod's codes are ready, tokenized or loaded (``spec.preparation.mode: Trainer``;
    in mode Pod the preparation pod's report stays as it wrote it)."""
    now = datetime.now(UTC)
    stats = cache.stats
    clips = stats.clips if stats is not None else clips
    return PreparationReport(
        state=PreparationState.completed,
        heartbeat_time=now,
        pod_name=pod,
        files_done=clips,
        files_total=clips,
        tokenized=stats.tokenized if stats is not None else 0,
        reused=stats.reused if stats is not None else clips,
        manifest_digest=manifest_digest,
        codes_key=cache.key,
        codes_uri=cache.mirror_uri,
        started_at=previous.started_at if previous is not None else now,
        finished_at=now,
    )
