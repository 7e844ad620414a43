"""Loading the model to fine-tune: pretrained MusicGen, or a tiny in-code one.

* ``facebook/musicgen-small`` (any Hugging Face id) or a local folder holding audiocraft's
  ``state_dict.bin`` + ``compression_state_dict.bin`` → ``MusicGen.get_pretrained``.
* ``s3://bucket/prefix`` → that folder is downloaded to the work dir first.
* ``tiny://seed=0`` → :func:`build_tiny_musicgen`, a few-kilobyte EnCodec + LM with random
  weights built from audiocraft modules, for tests and the CPU benchmark (never downloads).

The LM is cast to float32 (pretrained weights come as float16 on GPU); mixed precision is done
with autocast in the training loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.storage import is_s3_uri, local_path_of, open_storage

log = get_logger(__name__)

TINY_SCHEME = "tiny://"


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model (defaults: ~50 Hz codes, 4 codebooks of 64 bins)."""

    seed: int = 0
    sample_rate: int = 16000
    ratios: tuple[int, ...] = (8, 5, 4, 2)
    codebooks: int = 4
    bins: int = 64
    latent_dim: int = 32
    filters: int = 4
    dim: int = 32
    heads: int = 2
    layers: int = 2
    dropout: float = 0.1
    text_bins: int = 512

    @property
    def frame_rate(self) -> float:
        hop = 1
        for r in self.ratios:
            hop *= r
        return self.sample_rate / hop


@dataclass
class LoadedModel:
    """The LM being fine-tuned and the frozen compression model that makes its codes."""

    model_id: str
    lm: Any
    compression_model: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sample_rate(self) -> int:
        return int(self.compression_model.sample_rate)

    @property
    def frame_rate(self) -> float:
        return float(self.compression_model.frame_rate)

    @property
    def channels(self) -> int:
        return int(self.compression_model.channels)

    @property
    def num_codebooks(self) -> int:
        return int(self.compression_model.num_codebooks)

    @property
    def cardinality(self) -> int:
        return int(self.compression_model.cardinality)

    def compression_config(self) -> dict[str, Any]:
        """What determines the codes (part of the code cache key)."""
        return {
            "class": type(self.compression_model).__name__,
            "sampleRate": self.sample_rate,
            "frameRate": self.frame_rate,
            "channels": self.channels,
            "numCodebooks": self.num_codebooks,
            "cardinality": self.cardinality,
        }

    def to(self, device: torch.device) -> LoadedModel:
        self.lm.to(device)
        self.compression_model.to(device)
        return self


def parse_tiny(base: str) -> TinySpec:
    """``tiny://seed=3,layers=2`` → :class:`TinySpec`."""
    if not base.startswith(TINY_SCHEME):
        raise ValueError(f"not a tiny model reference: {base!r}")
    params: dict[str, Any] = {}
    body = base[len(TINY_SCHEME) :].strip("/")
    for part in filter(None, (p.strip() for p in body.replace(";", ",").split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise TrainerConfigError(f"model.base {base!r}: expected key=value, got {part!r}")
        name = name.strip().replace("-", "_")
        if name not in {"seed", "layers", "dim", "heads", "bins", "codebooks", "sample_rate"}:
            raise TrainerConfigError(f"model.base {base!r}: unknown tiny parameter {name!r}")
        try:
            params[name] = int(value)
        except ValueError:
            raise TrainerConfigError(f"model.base {base!r}: {name} must be an integer") from None
    return TinySpec(**params)


def build_tiny_musicgen(seed: int = 0, spec: TinySpec | None = None) -> LoadedModel:
    """A small EnCodec + MusicGen LM with random weights, deterministic for a seed.

    EnCodec: SEANet encoder/decoder (4 filters, ratios 8·5·4·2 → 50 Hz at 16 kHz), residual VQ
    with 4 codebooks of 64 bins (uniform init: k-means init would leave codebooks at zero).
    LM: 2 layers, dim 32, 2 heads, delayed codebook pattern, a lookup-table text conditioner
    (``noop`` tokenizer: one hashed token per description, no spaCy, no T5) fused by
    cross-attention.
    """
    from audiocraft.models.encodec import EncodecModel
    from audiocraft.models.lm import LMModel
    from audiocraft.modules.codebooks_patterns import DelayedPatternProvider
    from audiocraft.modules.conditioners import (
        ConditionFuser,
        ConditioningProvider,
        LUTConditioner,
    )
    from audiocraft.modules.seanet import SEANetDecoder, SEANetEncoder
    from audiocraft.quantization.vq import ResidualVectorQuantizer

    spec = spec or TinySpec(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        seanet: dict[str, Any] = {
            "channels": 1,
            "dimension": spec.latent_dim,
            "n_filters": spec.filters,
            "n_residual_layers": 1,
            "ratios": list(spec.ratios),
            "lstm": 0,
        }
        encoder = SEANetEncoder(**seanet)
        decoder = SEANetDecoder(**seanet)
        quantizer = ResidualVectorQuantizer(
            dimension=spec.latent_dim, n_q=spec.codebooks, bins=spec.bins, kmeans_init=False
        )
        compression = EncodecModel(
            encoder,
            decoder,
            quantizer,
            frame_rate=int(spec.frame_rate),
            sample_rate=spec.sample_rate,
            channels=1,
            causal=False,
            renormalize=False,
        ).eval()
        conditioner = LUTConditioner(
            n_bins=spec.text_bins, dim=spec.dim, output_dim=spec.dim, tokenizer="noop"
        )
        provider = ConditioningProvider({"description": conditioner}, device="cpu")
        fuser = ConditionFuser({"cross": ["description"], "prepend": [], "sum": [], "input_interpolate": []})
        lm = LMModel(
            DelayedPatternProvider(n_q=spec.codebooks),
            provider,
            fuser,
            n_q=spec.codebooks,
            card=spec.bins,
            dim=spec.dim,
            num_heads=spec.heads,
            hidden_scale=2,
            norm="layer_norm",
            norm_first=True,
            num_layers=spec.layers,
            causal=True,
            cross_attention=True,
            custom=True,
            dropout=spec.dropout,
            cfg_coef=3.0,
        )
    for p in compression.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        model_id=f"{TINY_SCHEME}seed={spec.seed}",
        lm=lm.float(),
        compression_model=compression,
        extra={"tiny": spec},
    )


@contextlib.contextmanager
def _trusted_checkpoint_loading() -> Iterator[None]:
    """audiocraft's loaders call ``torch.load`` without ``weights_only``; their checkpoints hold
    configs that torch ≥ 2.6's weights-only default rejects. The model reference is the run's
    own configuration, so allow full unpickling for that call only."""
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _download_model_dir(uri: str, work_dir: Path) -> Path:
    storage = open_storage(uri)
    target = work_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    objects = storage.list()
    if not objects:
        raise TrainerConfigError(f"model.base {uri}: no objects under that prefix")
    names = {o.key for o in objects}
    if "state_dict.bin" not in names:
        raise TrainerConfigError(
            f"model.base {uri}: expected audiocraft's state_dict.bin (and "
            f"compression_state_dict.bin) under that prefix, found {sorted(names)[:10]}"
        )
    for obj in objects:
        local = target / obj.key
        if not local.is_file() or local.stat().st_size != obj.size:
            storage.download_file(obj.key, local)
    return target


def load_model(base: str, device: torch.device, work_dir: Path) -> LoadedModel:
    """The model named by ``model.base`` on ``device``, LM in float32 and in train mode."""
    if base.startswith(TINY_SCHEME):
        model = build_tiny_musicgen(spec=parse_tiny(base))
    else:
        from audiocraft.models.musicgen import MusicGen

        source: str = base
        if is_s3_uri(base):
            source = str(_download_model_dir(base, work_dir))
        elif base.startswith("/") or base.startswith("file://") or base.startswith("."):
            path = local_path_of(base)
            if not path.exists():
                raise TrainerConfigError(f"model.base {base}: {path} does not exist")
            source = str(path)
        log.info("model_loading", base=base, source=source, device=str(device))
        try:
            with _trusted_checkpoint_loading():
                musicgen = MusicGen.get_pretrained(source, device=str(device))
        except (FileNotFoundError, OSError, KeyError, AssertionError) as exc:
            raise TrainerConfigError(f"model.base {base}: cannot load MusicGen: {exc}") from exc
        model = LoadedModel(model_id=base, lm=musicgen.lm, compression_model=musicgen.compression_model)
        for p in model.compression_model.parameters():
            p.requires_grad_(False)
    model.lm = model.lm.float()
    model.compression_model.eval()
    model.to(device)
    model.lm.train()
    log.info(
        "model_loaded",
        model=model.model_id,
        lm_parameters=sum(p.numel() for p in model.lm.parameters()),
        sample_rate=model.sample_rate,
        frame_rate=model.frame_rate,
        codebooks=model.num_codebooks,
        cardinality=model.cardinality,
    )
    return model
