"""Loading the model to fine-tune: pretrained MusicGen, or a tiny in-code one.

* ``facebook/musicgen-small`` (any Hugging Face id) or a local folder holding audiocraft's
  ``state_dict.bin`` + ``compression_state_dict.bin`` (e.g. a run's export) →
  ``MusicGen.get_pretrained``, with the Hub switched off: the files and the T5 text encoders
  are fetched into the Hugging Face cache first (:mod:`fermata_trainer.model_hub`), or restored
  from the run's model mirror (:mod:`fermata_trainer.model_mirror`).
* ``s3://bucket/prefix`` → a mirror staged there (``fermata-train stage-models``) or a folder,
  downloaded to the work dir first.
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
from fermata_trainer.model_hub import (
    check_text_tokenizer,
    fetch_model,
    fetch_text_encoder,
    hub_cache,
    hub_offline,
    text_encoders_of,
)
from fermata_trainer.model_mirror import (
    MirrorCorruptError,
    ModelFiles,
    publish_mirror,
    read_mirror,
    restore_mirror,
)
from fermata_trainer.storage import Storage, is_s3_uri, local_path_of, open_storage

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
    #: audiocraft's ``xp.cfg`` of the LM (what an export's ``state_dict.bin`` carries), if known
    lm_config: Any = None
    #: the ``compression_state_dict.bin`` the compression model was loaded from, if any
    compression_file: Path | None = None
    #: the text encoders (Hugging Face ids) the LM's conditioners load, e.g. ``["t5-base"]``
    text_encoders: list[str] = field(default_factory=list)
    #: audiocraft's ``xp.cfg`` of a compression model built in code (no file to copy): an export
    #: packages it with the weights as its ``compression_state_dict.bin``
    compression_xp_config: Any = None

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
    """``tiny://seed=3,layers=2`` → :class:`TinySpec` (``dropout=0`` turns the LM's dropout off,
    for runs whose losses must not depend on how a batch is split across ranks; ``filters`` sizes
    the EnCodec's convolutions, and so what tokenizing costs)."""
    if not base.startswith(TINY_SCHEME):
        raise ValueError(f"not a tiny model reference: {base!r}")
    params: dict[str, Any] = {}
    body = base[len(TINY_SCHEME) :].strip("/")
    for part in filter(None, (p.strip() for p in body.replace(";", ",").split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise TrainerConfigError(f"model.base {base!r}: expected key=value, got {part!r}")
        name = name.strip().replace("-", "_")
        if name not in {
            "seed",
            "layers",
            "dim",
            "heads",
            "bins",
            "codebooks",
            "sample_rate",
            "filters",
            "dropout",
        }:
            raise TrainerConfigError(f"model.base {base!r}: unknown tiny parameter {name!r}")
        params[name] = _tiny_number(base, name, value)
    return TinySpec(**params)


def _tiny_number(base: str, name: str, value: str) -> int | float:
    try:
        if name != "dropout":
            return int(value)
        dropout = float(value)
    except ValueError:
        kind = "a number" if name == "dropout" else "an integer"
        raise TrainerConfigError(f"model.base {base!r}: {name} must be {kind}") from None
    if not 0.0 <= dropout < 1.0:
        raise TrainerConfigError(f"model.base {base!r}: dropout must be in [0, 1)")
    return dropout


def tiny_lm_config(spec: TinySpec) -> dict[str, Any]:
    """The tiny LM's audiocraft ``xp.cfg`` (the parts ``builders.get_lm_model`` reads): 2 layers,
    dim 32, 2 heads, delayed codebook pattern, a lookup-table text conditioner (``noop``
    tokenizer: one hashed token per description, no spaCy, no T5) fused by cross-attention."""
    return {
        "device": "cpu",
        "dtype": "float32",
        "lm_model": "transformer_lm",
        "dataset": {"segment_duration": 30.0},
        "codebooks_pattern": {
            "modeling": "delay",
            "delay": {"delays": list(range(spec.codebooks)), "flatten_first": 0, "empty_initial": 0},
        },
        "transformer_lm": {
            "n_q": spec.codebooks,
            "card": spec.bins,
            "dim": spec.dim,
            "num_heads": spec.heads,
            "num_layers": spec.layers,
            "hidden_scale": 2,
            "norm": "layer_norm",
            "norm_first": True,
            "causal": True,
            "cross_attention": True,
            "custom": True,
            "dropout": spec.dropout,
        },
        "attribute_dropout": {},
        # the trainer drops conditions itself (training.cfgDropout)
        "classifier_free_guidance": {"training_dropout": 0.0, "inference_coef": 3.0},
        "fuser": {"sum": [], "prepend": [], "cross": ["description"], "input_interpolate": []},
        "conditioners": {
            "description": {
                "model": "lut",
                "lut": {"n_bins": spec.text_bins, "dim": spec.dim, "tokenizer": "noop"},
            },
        },
    }


def tiny_compression_config(spec: TinySpec) -> dict[str, Any]:
    """The tiny EnCodec's ``xp.cfg``: SEANet encoder/decoder (4 filters, ratios 8·5·4·2 → 50 Hz
    at 16 kHz), residual VQ with 4 codebooks of 64 bins (uniform init: k-means init would leave
    codebooks at zero)."""
    return {
        "device": "cpu",
        "dtype": "float32",
        "sample_rate": spec.sample_rate,
        "channels": 1,
        "compression_model": "encodec",
        "encodec": {
            "autoencoder": "seanet",
            "quantizer": "rvq",
            "sample_rate": spec.sample_rate,
            "channels": 1,
            "causal": False,
            "renormalize": False,
        },
        "seanet": {
            "channels": 1,
            "dimension": spec.latent_dim,
            "n_filters": spec.filters,
            "n_residual_layers": 1,
            "ratios": list(spec.ratios),
            "lstm": 0,
            "encoder": {},
            "decoder": {},
        },
        "rvq": {"n_q": spec.codebooks, "bins": spec.bins, "kmeans_init": False},
    }


def build_tiny_musicgen(seed: int = 0, spec: TinySpec | None = None) -> LoadedModel:
    """A small EnCodec + MusicGen LM with random weights, deterministic for a seed, built from
    :func:`tiny_lm_config` / :func:`tiny_compression_config` by audiocraft's own builders, so it
    carries the ``xp.cfg`` an export needs (and loads back with ``MusicGen.get_pretrained``)."""
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    spec = spec or TinySpec(seed=seed)
    lm_cfg = OmegaConf.create(tiny_lm_config(spec))
    compression_cfg = OmegaConf.create(tiny_compression_config(spec))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        compression = builders.get_compression_model(compression_cfg).eval()
        lm = builders.get_lm_model(lm_cfg)
    for p in compression.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        model_id=f"{TINY_SCHEME}seed={spec.seed}",
        lm=lm.float(),
        compression_model=compression,
        extra={"tiny": spec},
        lm_config=lm_cfg,
        compression_xp_config=compression_cfg,
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
        if "/" in obj.key:  # a folder model is flat; an export's neighbours are not part of it
            continue
        local = target / obj.key
        if not local.is_file() or local.stat().st_size != obj.size:
            storage.download_file(obj.key, local)
    return target


def read_lm_config(state_dict_file: Path) -> Any:
    """The ``xp.cfg`` of an audiocraft ``state_dict.bin`` (memory-mapped: the weights stay on
    disk), as an OmegaConf config."""
    from omegaconf import OmegaConf

    try:
        pkg = torch.load(state_dict_file, map_location="cpu", mmap=True, weights_only=False)
    except (RuntimeError, ValueError, OSError) as exc:
        raise TrainerConfigError(f"{state_dict_file}: not an audiocraft state_dict.bin: {exc}") from None
    if not isinstance(pkg, dict) or "xp.cfg" not in pkg:
        raise TrainerConfigError(f"{state_dict_file}: not an audiocraft release (no xp.cfg)")
    return OmegaConf.create(pkg["xp.cfg"])


def _folder_files(load_from: Path) -> ModelFiles:
    if not (load_from / "state_dict.bin").is_file():
        raise TrainerConfigError(
            f"model.base {load_from}: expected audiocraft's state_dict.bin and "
            "compression_state_dict.bin in that folder"
        )
    encoders = tuple(
        fetch_text_encoder(n) for n in text_encoders_of(read_lm_config(load_from / "state_dict.bin"))
    )
    return ModelFiles(str(load_from), load_from, None, encoders, "folder")


def resolve_model_files(base: str, work_dir: Path, mirror: Storage | None) -> ModelFiles:
    """The base model and its text encoders on local disk, from (in this order) the run's
    mirror, a staged mirror at ``base``, a folder at ``base``, or the Hub."""
    if mirror is not None:
        manifest = read_mirror(mirror)
        if manifest is not None and manifest.get("base") == base:
            try:
                return restore_mirror(mirror, manifest, hub_cache(), work_dir)
            except MirrorCorruptError as exc:  # fetched again from the source, and re-mirrored
                log.warning("model_mirror_corrupt", mirror=mirror.uri, error=str(exc))
        elif manifest is not None:
            log.warning(
                "model_mirror_other_base", mirror=mirror.uri, mirrored=manifest.get("base"), base=base
            )
    if is_s3_uri(base) or base.startswith(("/", "file://", ".")):
        if not is_s3_uri(base) and not local_path_of(base).exists():
            raise TrainerConfigError(f"model.base {base}: {local_path_of(base)} does not exist")
        source = open_storage(base)
        staged = read_mirror(source)
        if staged is not None:
            try:
                return restore_mirror(source, staged, hub_cache(), work_dir)
            except MirrorCorruptError as exc:  # nobody rewrites a staged mirror but its owner
                raise TrainerConfigError(f"model.base {base}: {exc}; stage the model again") from None
        folder = _download_model_dir(base, work_dir) if is_s3_uri(base) else local_path_of(base)
        return _folder_files(folder)
    repo = fetch_model(base)
    config = read_lm_config(repo.snapshot / "state_dict.bin")
    encoders = tuple(fetch_text_encoder(n) for n in text_encoders_of(config))
    return ModelFiles(base, repo.snapshot, repo, encoders, "hub")


def _load_pretrained(base: str, files: ModelFiles, device: torch.device) -> LoadedModel:
    from audiocraft.models.musicgen import MusicGen

    log.info("model_loading", base=base, source=files.load_from, origin=files.origin, device=str(device))
    try:
        with hub_offline(), _trusted_checkpoint_loading():
            musicgen = MusicGen.get_pretrained(files.load_from, device=str(device))
    except (FileNotFoundError, OSError, KeyError, AssertionError) as exc:
        raise TrainerConfigError(f"model.base {base}: cannot load MusicGen: {exc}") from exc
    check_text_tokenizer(musicgen.lm)
    model = LoadedModel(
        model_id=base,
        lm=musicgen.lm,
        compression_model=musicgen.compression_model,
        lm_config=getattr(musicgen.lm, "cfg", None),
        compression_file=files.compression_file,
        text_encoders=[e.repo_id for e in files.text_encoders],
    )
    for p in model.compression_model.parameters():
        p.requires_grad_(False)
    return model


def load_model(
    base: str,
    device: torch.device,
    work_dir: Path,
    mirror: Storage | None = None,
    publish: bool = True,
) -> LoadedModel:
    """The model named by ``model.base`` on ``device``, LM in float32 and in train mode.

    ``mirror``: the run's model mirror (``<storage.checkpoints>/model``). A base fetched from
    the Hub or a folder is copied there (when ``publish``: rank 0), so later pods of the run
    restore it instead of fetching it again.
    """
    if base.startswith(TINY_SCHEME):
        model = build_tiny_musicgen(spec=parse_tiny(base))
    else:
        files = resolve_model_files(base, work_dir, mirror)
        model = _load_pretrained(base, files, device)
        if mirror is not None and publish and files.origin != "mirror":
            try:
                publish_mirror(mirror, base, files)
            except Exception as exc:  # the next pod fetches again: slower, not wrong
                log.warning("model_mirror_failed", mirror=mirror.uri, error=f"{type(exc).__name__}: {exc}")
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
        text_encoders=model.text_encoders,
    )
    return model


#: What ``fermata-train stage-models`` stages when no model is named.
STAGED_MODELS = (
    "facebook/musicgen-small",
    "facebook/musicgen-medium",
    "facebook/musicgen-large",
    "facebook/musicgen-melody",
)


def stage_model(repo_id: str, destination: Storage) -> str:
    """Fetch ``repo_id`` and its text encoders (Hub or cache) and write a model mirror at
    ``destination/<repo_id>``, for runs that must never touch the Hub; returns its manifest URI."""
    repo = fetch_model(repo_id)
    encoders = tuple(
        fetch_text_encoder(n) for n in text_encoders_of(read_lm_config(repo.snapshot / "state_dict.bin"))
    )
    files = ModelFiles(repo_id, repo.snapshot, repo, encoders, "hub")
    return publish_mirror(
        destination.child(repo_id), repo_id, files, extra={"stagedBy": "fermata-train stage-models"}
    )
