"""Evaluation: validation cross-entropy, generated sample clips and their authenticity score.

* Validation CE is the per-codebook cross-entropy over every valid position of the validation
  segments (exact dataset mean), and perplexity ``exp(CE)``.
* Sample clips: ``lm.generate`` with the evaluation prompts (classifier-free guidance at the
  model's coefficient), decoded with the compression model, written as WAV files with a
  ``samples.json`` under ``<storage>/samples/step-000001234/``.
* Authenticity: :func:`fermata_trainer.authenticity.score_clips` against a reference profile built
  once from ``evaluation.referenceUri`` (a folder of audio files) or, by default, from training
  segments decoded from their cached codes (so a cached run never needs the source audio).

Generation runs under a forked RNG seeded by the step, so evaluating never changes the training
random stream (a resumed run reproduces an uninterrupted one whatever was evaluated between).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fermata_api import EvaluationSpec
from fermata_trainer.audio_io import AUDIO_EXTENSIONS, UnreadableAudioError, decode_audio
from fermata_trainer.codes_cache import CodesSplit
from fermata_trainer.conditioning import make_attributes
from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.model_loading import LoadedModel
from fermata_trainer.optimization import codebook_cross_entropy
from fermata_trainer.storage import Storage, open_storage

log = get_logger(__name__)

#: Makes a fresh autocast context (bf16 on GPU) or a null one.
AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]

SAMPLES_PREFIX = "samples"
MAX_REFERENCE_CLIPS = 16
TOP_K = 250


@dataclass
class EvaluationResult:
    step: int
    validation_loss: float | None
    perplexity: float | None
    authenticity: float | None = None
    components: dict[str, float] | None = None
    samples_uri: str | None = None
    per_codebook: list[float] = field(default_factory=list)
    note: str | None = None


def samples_dir(step: int) -> str:
    return f"{SAMPLES_PREFIX}/step-{step:09d}"


@torch.no_grad()
def validation_loss(
    lm: Any,
    split: CodesSplit,
    batch_size: int,
    device: torch.device,
    autocast: AutocastFactory | None = None,
    sample_rate: int = 32000,
) -> tuple[float | None, list[float]]:
    """Mean per-codebook cross-entropy over the whole split (None when it is empty)."""
    if len(split) == 0:
        return None, []
    was_training = lm.training
    lm.eval()
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    try:
        for start in range(0, len(split), batch_size):
            part = split.slice(start, start + batch_size)
            codes = part.codes.to(device=device, dtype=torch.long)
            valid = part.masks.to(device)
            attributes = make_attributes(lm, part.prompts, sample_rate)
            with autocast() if autocast is not None else contextlib.nullcontext():
                tokenized = lm.condition_provider.tokenize(attributes)
                conditions = lm.condition_provider(tokenized)
                out = lm.compute_predictions(codes, [], conditions)
                mask = out.mask & valid[:, None, :]
                _, ce_sum, count = codebook_cross_entropy(out.logits, codes, mask)
            sums = ce_sum.double() if sums is None else sums + ce_sum.double()
            counts = count.double() if counts is None else counts + count.double()
    finally:
        lm.train(was_training)
    assert sums is not None and counts is not None
    per_codebook = (sums / counts.clamp(min=1.0)).tolist()
    return float(sum(per_codebook) / len(per_codebook)), [float(v) for v in per_codebook]


@contextlib.contextmanager
def _isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate_clips(
    model: LoadedModel,
    prompts: list[str],
    seconds: float,
    seed: int,
    device: torch.device,
    autocast: AutocastFactory | None = None,
) -> list[npt.NDArray[np.float32]]:
    """Mono float32 clips at the model's sample rate, one per prompt."""
    lm = model.lm
    was_training = lm.training
    lm.eval()
    frames = max(1, int(math.ceil(seconds * model.frame_rate)))
    try:
        with _isolated_rng(seed, device):
            attributes = make_attributes(lm, prompts, model.sample_rate)
            with autocast() if autocast is not None else contextlib.nullcontext():
                codes = lm.generate(
                    None,
                    attributes,
                    max_gen_len=frames,
                    use_sampling=True,
                    top_k=min(TOP_K, model.cardinality),
                    cfg_coef=None,
                )
            wav = model.compression_model.decode(codes, None).float()
    finally:
        lm.train(was_training)
    wav = wav.mean(dim=1)  # [B, T] mono
    return [w.cpu().numpy().astype(np.float32) for w in wav]


@torch.no_grad()
def reference_from_codes(
    model: LoadedModel,
    split: CodesSplit,
    device: torch.device,
    limit: int = MAX_REFERENCE_CLIPS,
    min_seconds: float = 0.0,
) -> list[npt.NDArray[np.float32]]:
    """Up to ``limit`` training segments (evenly spread over those at least ``min_seconds``
    long) decoded from their codes."""
    min_frames = int(math.ceil(min_seconds * model.frame_rate))
    eligible = [i for i in range(len(split)) if int(split.lengths[i]) >= min_frames]
    if not eligible:
        return []
    count = min(limit, len(eligible))
    indices = sorted({eligible[int(i * len(eligible) / count)] for i in range(count)})
    by_length: dict[int, list[int]] = {}
    for i in indices:
        by_length.setdefault(int(split.lengths[i]), []).append(i)
    decoded: dict[int, npt.NDArray[np.float32]] = {}
    for length, group in by_length.items():  # one decoder call per segment length
        codes = split.codes[group, :, :length].to(device=device, dtype=torch.long)
        wavs = model.compression_model.decode(codes, None).float().mean(dim=1)
        for i, wav in zip(group, wavs, strict=True):
            decoded[i] = wav.cpu().numpy().astype(np.float32)
    return [decoded[i] for i in indices]


def reference_from_uri(
    uri: str, sample_rate: int, work_dir: Path, limit: int = MAX_REFERENCE_CLIPS
) -> list[npt.NDArray[np.float32]]:
    """Up to ``limit`` audio files from a folder (local or s3://), mono at ``sample_rate``."""
    from audiocraft.data.audio_utils import convert_audio

    storage = open_storage(uri)
    files = [o for o in storage.list() if Path(o.key).suffix.lower() in AUDIO_EXTENSIONS][:limit]
    if not files:
        raise TrainerConfigError(f"evaluation.referenceUri {uri}: no audio files found")
    clips = []
    for obj in files:
        local = storage.local_path(obj.key)
        if local is None:
            local = work_dir / "reference" / obj.key
            if not local.is_file():
                storage.download_file(obj.key, local)
        try:
            samples, rate = decode_audio(local)
        except UnreadableAudioError as exc:
            log.warning("reference_clip_skipped", file=obj.key, reason=str(exc))
            continue
        wav = convert_audio(torch.from_numpy(samples)[None], rate, sample_rate, 1)[0, 0]
        clips.append(wav.numpy().astype(np.float32))
    return clips


class Evaluator:
    """Runs the evaluation at a step and keeps the reference profile between evaluations."""

    def __init__(
        self,
        model: LoadedModel,
        spec: EvaluationSpec,
        storage: Storage,
        work_dir: Path,
        device: torch.device,
        seed: int,
        batch_size: int,
    ) -> None:
        self.model = model
        self.spec = spec
        self.storage = storage
        self.work_dir = work_dir
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self._profile: Any = None
        self._profile_error: str | None = None

    def _authenticity(self) -> Any | None:
        try:
            from fermata_trainer import authenticity
        except ImportError as exc:  # pragma: no cover - shipped with the trainer
            self._profile_error = f"authenticity module unavailable: {exc}"
            return None
        return authenticity

    def reference_profile(self, train: CodesSplit) -> Any | None:
        if self._profile is not None or self._profile_error is not None:
            return self._profile
        module = self._authenticity()
        if module is None:
            return None
        try:
            if self.spec.reference_uri:
                clips = reference_from_uri(self.spec.reference_uri, self.model.sample_rate, self.work_dir)
            else:
                min_seconds = float(getattr(module, "MIN_SECONDS", 0.0))
                clips = reference_from_codes(self.model, train, self.device, min_seconds=min_seconds)
                if not clips:
                    raise ValueError(
                        f"no training segment is at least {min_seconds:g} s long (the scorer's "
                        f"minimum); use longer dataset.segmentSeconds or evaluation.referenceUri"
                    )
            self._profile = module.build_reference_profile(
                clips, self.model.sample_rate, self.spec.bpm_min, self.spec.bpm_max
            )
            log.info(
                "reference_profile_built",
                clips=len(clips),
                source=self.spec.reference_uri or "training codes",
            )
        except TrainerConfigError:
            raise
        except Exception as exc:
            self._profile_error = f"no reference profile: {exc}"
            log.warning("reference_profile_failed", error=str(exc)[:500])
        return self._profile

    def evaluate(
        self,
        step: int,
        train: CodesSplit,
        validation: CodesSplit,
        autocast: AutocastFactory | None = None,
    ) -> EvaluationResult:
        loss, per_codebook = validation_loss(
            self.model.lm,
            validation,
            self.batch_size,
            self.device,
            autocast,
            sample_rate=self.model.sample_rate,
        )
        perplexity = math.exp(min(loss, 80.0)) if loss is not None else None
        result = EvaluationResult(step, loss, perplexity, per_codebook=per_codebook)

        prompts = list(self.spec.prompts)
        clips = generate_clips(
            self.model, prompts, self.spec.clip_seconds, self.seed * 7919 + step, self.device, autocast
        )
        profile = self.reference_profile(train)
        scores: dict[str, Any] = {}
        if profile is not None:
            module = self._authenticity()
            assert module is not None
            scored = module.score_clips(clips, self.model.sample_rate, profile)
            result.authenticity = float(scored.score)
            result.components = {k: float(v) for k, v in scored.components.items()}
            scores = {
                "score": result.authenticity,
                "components": result.components,
                "clips": [c.model_dump(mode="json") for c in getattr(scored, "clips", [])],
                "reason": getattr(scored, "reason", None),
            }
        else:
            result.note = self._profile_error
        result.samples_uri = self._save_samples(step, prompts, clips, result, scores)
        log.info(
            "evaluation",
            step=step,
            validation_loss=loss,
            validation_perplexity=perplexity,
            per_codebook=per_codebook,
            authenticity=result.authenticity,
            authenticity_components=result.components,
            samples=result.samples_uri,
            note=result.note,
        )
        return result

    def _save_samples(
        self,
        step: int,
        prompts: list[str],
        clips: list[npt.NDArray[np.float32]],
        result: EvaluationResult,
        scores: dict[str, Any],
    ) -> str:
        import soundfile as sf

        prefix = samples_dir(step)
        files = []
        for i, (prompt, clip) in enumerate(zip(prompts, clips, strict=True)):
            name = f"sample-{i:02d}.wav"
            buffer = io.BytesIO()
            sf.write(buffer, np.clip(clip, -1.0, 1.0), self.model.sample_rate, format="WAV", subtype="PCM_16")
            self.storage.put_bytes(f"{prefix}/{name}", buffer.getvalue())
            files.append({"file": name, "prompt": prompt, "seconds": len(clip) / self.model.sample_rate})
        summary = {
            "step": step,
            "model": self.model.model_id,
            "sampleRate": self.model.sample_rate,
            "clipSeconds": self.spec.clip_seconds,
            "validationLoss": result.validation_loss,
            "validationPerplexity": result.perplexity,
            "authenticity": scores or None,
            "note": result.note,
            "samples": files,
        }
        self.storage.write_text(f"{prefix}/samples.json", json.dumps(summary, indent=2) + "\n")
        return self.storage.uri_of(prefix)
