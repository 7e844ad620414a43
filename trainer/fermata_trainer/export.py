"""Exports: the fine-tuned model in audiocraft's own release format, with a model card.

Layout::

    <storage>/exports/step-000001234/state_dict.bin              ← the LM
                                    /compression_state_dict.bin  ← its EnCodec
                                    /model_card.json             ← written last

``state_dict.bin`` is what ``audiocraft.utils.export.export_lm`` writes: ``{'best_state': LM
state dict (floating tensors in float16, as the Hub's releases), 'xp.cfg': the LM's config as a
YAML string, 'version', 'exported': True}``; nothing in it needs more than torch's default
``weights_only=True`` loading. ``compression_state_dict.bin`` is the one the base model came
from (its ``xp.cfg`` rewritten as YAML when it was a pickled config, as in the Hub's releases), or, for a model built in code, the same kind of package of its weights and
config. So ``MusicGen.get_pretrained(<local copy of the folder>)`` loads an export, and so does
``model.base`` of a later run.

``model_card.json`` is the export's manifest: base model, dataset fingerprint (manifest digest,
code cache key), step, metrics, cost as last seen in the run's status (null when the trainer
never saw one), text encoders, time, the run, and every file's sha256 and size. An export
exists only once its card does; the card's sha256 is the export's digest
(``status.artifacts.*.digest``).

Which steps are exported (:class:`Exporter`): every evaluation after step 0 that improves
``evaluation.bestMetric`` (``status.artifacts.best``; the export it supersedes is deleted), and
the end of the run (``status.artifacts.final``; the best export's folder when that is the last
step). Checkpoint pruning never touches ``exports/``.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fermata_api import ArtifactRef, Artifacts, BestMetric, RunRef
from fermata_trainer.checkpoints import run_identity, step_dir_name
from fermata_trainer.evaluation import EvaluationResult
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.model_loading import LoadedModel
from fermata_trainer.storage import Storage, sha256_bytes, sha256_file

log = get_logger(__name__)

EXPORTS_PREFIX = "exports"
STATE_DICT_NAME = "state_dict.bin"
COMPRESSION_NAME = "compression_state_dict.bin"
CARD_NAME = "model_card.json"
CARD_FORMAT = "fermata.dev/model-card/v1"


class ExportUnavailableError(Exception):
    """The model lacks what an export needs (its audiocraft config)."""


def export_key(step: int) -> str:
    return f"{EXPORTS_PREFIX}/{step_dir_name(step)}"


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# ----------------------------------------------------------------------------- packages


def _yaml(config: Any) -> str:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, str):
        return config
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    return OmegaConf.to_yaml(config)


def lm_config_of(model: LoadedModel) -> Any:
    """The LM's ``xp.cfg``: :attr:`LoadedModel.lm_config`, else the ``cfg`` audiocraft's loader
    sets on a pretrained LM."""
    config = model.lm_config if model.lm_config is not None else getattr(model.lm, "cfg", None)
    if config is None:
        raise ExportUnavailableError(f"{model.model_id}: no audiocraft config (xp.cfg) for the LM")
    return config


def release_package(state: dict[str, torch.Tensor], config: Any, half: bool) -> dict[str, Any]:
    """audiocraft's release package of ``state`` (on the CPU; floating tensors in float16 when
    ``half``)."""
    import audiocraft

    best_state = {
        k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
        for k, v in state.items()
    }
    return {
        "best_state": best_state,
        "xp.cfg": _yaml(config),
        "version": audiocraft.__version__,
        "exported": True,
    }


def portable_compression(source: Path, target: Path) -> Path:
    """The base's ``compression_state_dict.bin`` as an export carries it: as it is when torch's
    default ``weights_only=True`` loads it, else (the Hub's releases pickle an OmegaConf config)
    with its ``xp.cfg`` as YAML, so whoever serves the export needs no unsafe loading."""
    try:
        torch.load(source, map_location="cpu", weights_only=True)
        return source
    except pickle.UnpicklingError:  # holds more than weights: rewritten below (the base was trusted)
        pass
    package = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(package, dict):
        raise ExportUnavailableError(f"{source}: not an audiocraft compression package")
    if "xp.cfg" in package:
        package["xp.cfg"] = _yaml(package["xp.cfg"])
    torch.save(package, target)
    return target


def stage_files(model: LoadedModel, staging: Path) -> dict[str, Path]:
    """``state_dict.bin`` (and, for a compression model built in code,
    ``compression_state_dict.bin``) written under ``staging``; name → local file."""
    files = {STATE_DICT_NAME: staging / STATE_DICT_NAME}
    torch.save(release_package(model.lm.state_dict(), lm_config_of(model), half=True), files[STATE_DICT_NAME])
    if model.compression_file is not None:
        files[COMPRESSION_NAME] = portable_compression(
            Path(model.compression_file), staging / COMPRESSION_NAME
        )
    elif model.compression_xp_config is not None:
        files[COMPRESSION_NAME] = staging / COMPRESSION_NAME
        package = release_package(
            model.compression_model.state_dict(), model.compression_xp_config, half=False
        )
        torch.save(package, files[COMPRESSION_NAME])
    else:
        raise ExportUnavailableError(f"{model.model_id}: no compression_state_dict.bin to export with it")
    return files


# ----------------------------------------------------------------------------- storage


class ExportStore:
    """The exports under one storage prefix (``<storage>/exports/``)."""

    def __init__(self, storage: Storage, staging: Path) -> None:
        self.storage = storage
        self.staging = staging

    def uri(self, step: int) -> str:
        return self.storage.uri_of(export_key(step))

    def write(self, step: int, model: LoadedModel, card: dict[str, Any]) -> tuple[str, str, datetime]:
        """Upload the model files, then the card listing them: (folder URI, digest, time)."""
        staging = self.staging / step_dir_name(step)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        prefix = export_key(step)
        try:
            files = stage_files(model, staging)
            # a card left by an earlier incarnation at this step must not vouch for new files
            self.storage.delete(f"{prefix}/{CARD_NAME}")
            entries = []
            for name in sorted(files):
                path = files[name]
                entries.append({"name": name, "sha256": sha256_file(path), "size": path.stat().st_size})
                self.storage.upload_file(path, f"{prefix}/{name}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        now = datetime.now(UTC)
        body = {**card, "step": step, "time": now.isoformat(), "files": entries}
        data = json.dumps(body, indent=2, sort_keys=True, allow_nan=False).encode()
        self.storage.put_bytes(f"{prefix}/{CARD_NAME}", data)
        return self.uri(step), f"sha256:{sha256_bytes(data)}", now

    def steps(self) -> dict[int, list[str]]:
        """Step → the keys of its export folder (complete or not)."""
        by_step: dict[int, list[str]] = defaultdict(list)
        for obj in self.storage.list(f"{EXPORTS_PREFIX}/"):
            parts = obj.key.split("/")
            if len(parts) == 3 and parts[1].startswith("step-") and parts[1][5:].isdigit():
                by_step[int(parts[1][5:])].append(obj.key)
        return dict(by_step)

    def prune(self, keep: set[int]) -> list[int]:
        """Delete every export folder but those of ``keep`` (the card first: an interrupted
        delete leaves a folder that no longer claims to be an export)."""
        deleted = []
        for step, keys in sorted(self.steps().items()):
            if step in keep:
                continue
            card = f"{export_key(step)}/{CARD_NAME}"
            self.storage.delete(card)
            for key in keys:
                if key != card:
                    self.storage.delete(key)
            deleted.append(step)
        if deleted:
            log.info("exports_pruned", deleted=deleted, kept=sorted(keep))
        return deleted


# ----------------------------------------------------------------------------- policy


@dataclass
class ExportContext:
    """What the trainer knows at an export, for the model card."""

    base_model: str
    run: RunRef
    step: int
    epoch: int
    total_steps: int
    evaluation: EvaluationResult | None
    baseline: float | None = None
    train_loss: float | None = None
    incarnation: int = 0
    pod: str | None = None
    started_from: str | None = None
    precision: str | None = None
    #: manifest digest, code cache key, split sizes (see ``Trainer._prepare_codes``)
    dataset: dict[str, Any] = field(default_factory=dict)
    #: ``status.cost`` as last seen in an apply response ({accruedUSD, updated}), if ever
    cost: dict[str, Any] | None = None


def metric_value(metric: BestMetric, result: EvaluationResult | None) -> float | None:
    if result is None:
        return None
    value = result.validation_loss if metric is BestMetric.validation_loss else result.authenticity
    return _finite(value)


def improves(metric: BestMetric, value: float | None, best: ArtifactRef | None) -> bool:
    """Whether ``value`` beats the best export's (strictly; lower loss, higher authenticity)."""
    if value is None:
        return False
    if best is None or best.metric != metric.value or best.value is None:
        return True
    return value < best.value if metric is BestMetric.validation_loss else value > best.value


def model_card(context: ExportContext, model: LoadedModel, metric: BestMetric) -> dict[str, Any]:
    import audiocraft

    ev = context.evaluation
    return {
        "format": CARD_FORMAT,
        "baseModel": context.base_model,
        "startedFrom": context.started_from,
        "run": {**run_identity(context.run), "incarnation": context.incarnation, "pod": context.pod},
        "epoch": context.epoch,
        "totalSteps": context.total_steps,
        "metric": {"name": metric.value, "value": metric_value(metric, ev)},
        "metrics": {
            "evaluatedStep": ev.step if ev else None,
            "validationLoss": _finite(ev.validation_loss) if ev else None,
            "validationPerplexity": _finite(ev.perplexity) if ev else None,
            "baselineValidationLoss": _finite(context.baseline),
            "authenticity": _finite(ev.authenticity) if ev else None,
            "authenticityComponents": dict(ev.components) if ev and ev.components else None,
            "trainLoss": _finite(context.train_loss),
        },
        "dataset": context.dataset,
        "cost": context.cost,
        "model": {
            "format": "audiocraft",
            "audiocraftVersion": audiocraft.__version__,
            "weights": "float16",
            "lmParameters": sum(p.numel() for p in model.lm.parameters()),
            "textEncoders": list(model.text_encoders),
            "sampleRate": model.sample_rate,
            "frameRate": model.frame_rate,
            "channels": model.channels,
            "codebooks": model.num_codebooks,
            "cardinality": model.cardinality,
            "trainingPrecision": context.precision,
        },
    }


class Exporter:
    """Decides what to export and keeps ``status.artifacts`` (rank 0 only)."""

    def __init__(self, store: ExportStore, model: LoadedModel, metric: BestMetric) -> None:
        self.store = store
        self.model = model
        self.metric = metric

    def _write(self, context: ExportContext) -> ArtifactRef:
        card = model_card(context, self.model, self.metric)
        uri, digest, when = self.store.write(context.step, self.model, card)
        ref = ArtifactRef(
            uri=uri,
            step=context.step,
            metric=self.metric.value,
            value=metric_value(self.metric, context.evaluation),
            digest=digest,
            time=when,
        )
        log.info(
            "model_exported",
            step=ref.step,
            uri=ref.uri,
            digest=ref.digest,
            metric=ref.metric,
            value=ref.value,
        )
        return ref

    def on_evaluation(self, artifacts: Artifacts, context: ExportContext) -> Artifacts:
        """Export when the evaluation improves the metric (never at step 0: that is the base
        model), then delete the export it supersedes."""
        value = metric_value(self.metric, context.evaluation)
        if context.step == 0 or not improves(self.metric, value, artifacts.best):
            return artifacts
        updated = Artifacts(best=self._write(context), final=artifacts.final)
        self._prune(updated)
        return updated

    def _prune(self, artifacts: Artifacts) -> None:
        """Delete the exports ``artifacts`` no longer name (a superseded best or final, or one
        a lost incarnation left), never the current best or final."""
        keep = {r.step for r in (artifacts.best, artifacts.final) if r is not None}
        try:
            self.store.prune(keep)
        except Exception as exc:  # housekeeping: the next export retries
            log.warning("export_prune_failed", error=f"{type(exc).__name__}: {exc}")

    def on_completion(self, artifacts: Artifacts, context: ExportContext) -> Artifacts:
        """The final export: the best one's folder when that is this step, else a new one."""
        if artifacts.final is not None and artifacts.final.step == context.step:
            return artifacts
        best = artifacts.best
        if best is not None and best.step == context.step:
            final = best.model_copy()
            log.info(
                "model_exported", step=final.step, uri=final.uri, digest=final.digest, final_is_best=True
            )
        else:
            final = self._write(context)
        updated = Artifacts(best=best, final=final)
        self._prune(updated)  # a final export from before the run was extended
        return updated
