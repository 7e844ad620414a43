"""Tokenize once: EnCodec codes of every training segment, cached in shards.

Each clip is decoded, resampled to the compression model's rate and channel count, encoded into
codes ``[K, frames]`` and cut into segments of ``segmentSeconds``. Segments shorter than that
(short clips, the tail of a long one) are padded and masked, never dropped. Segments are stored
in shards (``torch.save`` of int16 codes ``[n, K, T]``, int32 lengths ``[n]`` and bool masks
``[n, T]`` plus clip ids and prompts) under a key hashing the model id, the compression model's
configuration, the dataset manifest and the segment length:

    <work_dir>/codes/<key>/{index.json, train-00000.pt, validation-00000.pt, ...}
    <cache_uri>/<key>/...   (the same files, mirrored)

``index.json`` is written last and lists every shard with its sha256, so a half-written cache is
ignored. A later run (or the next pod) loads the shards and never decodes audio.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fermata_trainer.audio_io import decode_audio
from fermata_trainer.dataset import TRAIN, VALIDATION, AudioFetcher, ClipEntry, verify_entry
from fermata_trainer.errors import ObjectNotFoundError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.model_loading import LoadedModel
from fermata_trainer.storage import Storage, sha256_bytes, sha256_file

log = get_logger(__name__)

CACHE_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SEGMENTS_PER_SHARD = 512
#: The tail of a long clip becomes its own (padded) segment when at least this share of one.
MIN_TAIL_FRACTION = 0.5


@dataclass
class CodesSplit:
    """All segments of one split, stacked."""

    codes: torch.Tensor  # int16 [N, K, T]
    masks: torch.Tensor  # bool [N, T]
    lengths: torch.Tensor  # int32 [N]
    clip_ids: list[str]
    prompts: list[str]

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @classmethod
    def empty(cls, codebooks: int, frames: int) -> CodesSplit:
        return cls(
            torch.zeros((0, codebooks, frames), dtype=torch.int16),
            torch.zeros((0, frames), dtype=torch.bool),
            torch.zeros((0,), dtype=torch.int32),
            [],
            [],
        )

    @classmethod
    def concat(cls, parts: Sequence[CodesSplit], codebooks: int, frames: int) -> CodesSplit:
        if not parts:
            return cls.empty(codebooks, frames)
        return cls(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.masks for p in parts]),
            torch.cat([p.lengths for p in parts]),
            [c for p in parts for c in p.clip_ids],
            [q for p in parts for q in p.prompts],
        )

    def slice(self, start: int, stop: int) -> CodesSplit:
        return CodesSplit(
            self.codes[start:stop],
            self.masks[start:stop],
            self.lengths[start:stop],
            self.clip_ids[start:stop],
            self.prompts[start:stop],
        )


@dataclass
class CodesDataset:
    key: str
    train: CodesSplit
    validation: CodesSplit
    segment_frames: int
    frame_rate: float
    num_codebooks: int
    cardinality: int
    source: str  # "local", "mirror" or "tokenized"


def segment_frames_for(segment_seconds: float, frame_rate: float) -> int:
    return max(1, int(round(segment_seconds * frame_rate)))


def cache_key(
    model_id: str, compression_config: dict[str, Any], manifest_digest: str, segment_frames: int
) -> str:
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "model": model_id,
        "compression": compression_config,
        "manifest": manifest_digest,
        "segmentFrames": segment_frames,
    }
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:32]


def split_into_segments(codes: torch.Tensor, segment_frames: int) -> list[tuple[torch.Tensor, int]]:
    """``[K, F]`` codes → ``(padded [K, T] codes, valid length)`` per segment."""
    frames = int(codes.shape[-1])
    if frames == 0:
        return []
    full = frames // segment_frames
    tail = frames - full * segment_frames
    out: list[tuple[torch.Tensor, int]] = []
    for i in range(full):
        out.append((codes[:, i * segment_frames : (i + 1) * segment_frames], segment_frames))
    if tail and (full == 0 or tail >= MIN_TAIL_FRACTION * segment_frames):
        padded = torch.zeros((codes.shape[0], segment_frames), dtype=codes.dtype)
        padded[:, :tail] = codes[:, full * segment_frames :]
        out.append((padded, tail))
    return out


@torch.inference_mode()
def encode_clip(model: LoadedModel, path: Path, device: torch.device) -> torch.Tensor:
    """Codes ``[K, frames]`` (int64, CPU) of one audio file."""
    from audiocraft.data.audio_utils import convert_audio

    samples, rate = decode_audio(path)
    wav = torch.from_numpy(samples)[None]  # [1, C, T]
    wav = convert_audio(wav, rate, model.sample_rate, model.channels).to(device)
    codes, scale = model.compression_model.encode(wav)
    if scale is not None:  # renormalizing models are not used by MusicGen
        raise ValueError("compression model returned a scale; MusicGen codes expect none")
    out: torch.Tensor = codes[0].to("cpu", torch.int64)
    return out


def _shard_payload(segments: list[tuple[torch.Tensor, int, str, str]], frames: int) -> dict[str, Any]:
    codes = torch.stack([s[0] for s in segments]).to(torch.int16)
    lengths = torch.tensor([s[1] for s in segments], dtype=torch.int32)
    masks = torch.arange(frames)[None, :] < lengths[:, None]
    return {
        "codes": codes,
        "lengths": lengths,
        "masks": masks,
        "clip_ids": [s[2] for s in segments],
        "prompts": [s[3] for s in segments],
    }


def _load_shard(path: Path) -> CodesSplit:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return CodesSplit(
        codes=data["codes"],
        masks=data["masks"].to(torch.bool),
        lengths=data["lengths"],
        clip_ids=list(data["clip_ids"]),
        prompts=list(data["prompts"]),
    )


class CodesCache:
    """The shards for one (model, manifest, segment length), local and mirrored."""

    def __init__(
        self,
        model: LoadedModel,
        manifest_digest: str,
        segment_seconds: float,
        local_root: Path,
        mirror: Storage | None,
    ) -> None:
        self.model = model
        self.segment_frames = segment_frames_for(segment_seconds, model.frame_rate)
        self.key = cache_key(model.model_id, model.compression_config(), manifest_digest, self.segment_frames)
        self.local_dir = local_root / self.key
        self.mirror = mirror.child(self.key) if mirror is not None else None

    # -------------------------------------------------------------------- loading

    def _read_local_index(self) -> dict[str, Any] | None:
        path = self.local_dir / INDEX_NAME
        if not path.is_file():
            return None
        try:
            index: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        for split in index.get("splits", {}).values():
            for shard in split["shards"]:
                shard_path = self.local_dir / shard["name"]
                if not shard_path.is_file() or shard_path.stat().st_size != shard["size"]:
                    return None
                if sha256_file(shard_path) != shard["sha256"]:
                    log.warning("codes_shard_corrupt", shard=str(shard_path))
                    return None
        return index

    def _fetch_mirror(self) -> dict[str, Any] | None:
        if self.mirror is None:
            return None
        try:
            index: dict[str, Any] = json.loads(self.mirror.read_text(INDEX_NAME))
        except ObjectNotFoundError:
            return None
        except json.JSONDecodeError:
            log.warning("codes_mirror_index_corrupt", uri=self.mirror.uri_of(INDEX_NAME))
            return None
        self.local_dir.mkdir(parents=True, exist_ok=True)
        for split in index.get("splits", {}).values():
            for shard in split["shards"]:
                local = self.local_dir / shard["name"]
                try:
                    self.mirror.download_file(shard["name"], local)
                except ObjectNotFoundError:
                    log.warning("codes_mirror_incomplete", missing=shard["name"])
                    return None
                if sha256_file(local) != shard["sha256"]:
                    log.warning("codes_mirror_corrupt", shard=shard["name"])
                    return None
        (self.local_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return index

    def _dataset_from_index(self, index: dict[str, Any], source: str) -> CodesDataset:
        k, t = self.model.num_codebooks, self.segment_frames
        splits: dict[str, CodesSplit] = {}
        for name in (TRAIN, VALIDATION):
            shards = index["splits"].get(name, {"shards": []})["shards"]
            splits[name] = CodesSplit.concat([_load_shard(self.local_dir / s["name"]) for s in shards], k, t)
        return CodesDataset(
            key=self.key,
            train=splits[TRAIN],
            validation=splits[VALIDATION],
            segment_frames=t,
            frame_rate=self.model.frame_rate,
            num_codebooks=k,
            cardinality=self.model.cardinality,
            source=source,
        )

    def load(self) -> CodesDataset | None:
        """The cached codes, from the local folder or the mirror; None when absent."""
        index = self._read_local_index()
        if index is not None:
            log.info("codes_cache_hit", key=self.key, where="local", dir=str(self.local_dir))
            return self._dataset_from_index(index, "local")
        index = self._fetch_mirror()
        if index is not None:
            log.info("codes_cache_hit", key=self.key, where="mirror", uri=self.mirror_uri)
            return self._dataset_from_index(index, "mirror")
        return None

    @property
    def mirror_uri(self) -> str | None:
        return self.mirror.uri if self.mirror is not None else None

    # -------------------------------------------------------------------- building

    def build(
        self,
        entries: Sequence[ClipEntry],
        fetcher: AudioFetcher,
        device: torch.device,
        verify_checksums: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> CodesDataset:
        """Decode, encode and shard every entry; write the cache locally, then mirror it."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        (self.local_dir / INDEX_NAME).unlink(missing_ok=True)
        frames = self.segment_frames
        index: dict[str, Any] = {
            "version": CACHE_FORMAT_VERSION,
            "key": self.key,
            "model": self.model.model_id,
            "compression": self.model.compression_config(),
            "segmentFrames": frames,
            "frameRate": self.model.frame_rate,
            "splits": {},
        }
        total = len(entries)
        done = 0
        for split in (TRAIN, VALIDATION):
            pending: list[tuple[torch.Tensor, int, str, str]] = []
            shards: list[dict[str, Any]] = []
            count = 0
            for entry in (e for e in entries if e.split == split):
                path = verify_entry(entry, fetcher) if verify_checksums else fetcher.local(entry.audio)
                codes = encode_clip(self.model, path, device)
                for seg, length in split_into_segments(codes, frames):
                    pending.append((seg, length, entry.id, entry.description))
                    count += 1
                    if len(pending) >= SEGMENTS_PER_SHARD:
                        shards.append(self._write_shard(f"{split}-{len(shards):05d}.pt", pending))
                        pending = []
                done += 1
                if progress is not None:
                    progress(done, total)
            if pending:
                shards.append(self._write_shard(f"{split}-{len(shards):05d}.pt", pending))
            index["splits"][split] = {"count": count, "shards": shards}
        (self.local_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        log.info(
            "codes_cache_built",
            key=self.key,
            clips=total,
            train_segments=index["splits"][TRAIN]["count"],
            validation_segments=index["splits"][VALIDATION]["count"],
            segment_frames=frames,
        )
        self._upload(index)
        return self._dataset_from_index(index, "tokenized")

    def _write_shard(self, name: str, segments: list[tuple[torch.Tensor, int, str, str]]) -> dict[str, Any]:
        path = self.local_dir / name
        torch.save(_shard_payload(segments, self.segment_frames), path)
        return {
            "name": name,
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
            "count": len(segments),
        }

    def _upload(self, index: dict[str, Any]) -> None:
        if self.mirror is None:
            return
        for split in index["splits"].values():
            for shard in split["shards"]:
                self.mirror.upload_file(self.local_dir / shard["name"], shard["name"])
        self.mirror.write_text(INDEX_NAME, json.dumps(index, indent=2))
        log.info("codes_cache_mirrored", uri=self.mirror.uri)
