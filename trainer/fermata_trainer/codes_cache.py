"""Tokenize once, incrementally: EnCodec codes per audio file, then one manifest's segments.

Each clip is decoded, optionally processed (curation), resampled to the compression model's rate
and channel count and encoded into codes ``[K, frames]``. Two layers of objects hold the result,
both in the local cache folder (``<work_dir>/codes``) and mirrored to the cache storage
(``storage.cacheUri``, else ``<checkpoints>/cache``)::

    clips/<c[:2]>/<c>.pt          the codes of one audio file: the source of truth
    <key>/index.json              one manifest's segments, assembled from the clips
    <key>/train-00000.pt, validation-00000.pt, ...

**Per-file codes** (``c``, :func:`clip_key`) are content-addressed: the key hashes the file's
sha256 (as the manifest records it), the compression model (its configuration and a digest of
its weights) and the processing fingerprint (what curation does between decoding and encoding).
Not the segment length, the clip id or the prompt: the whole clip's codes are stored and cut into
segments when assembling, so another ``segmentSeconds``, new prompts, or the same file in another
dataset reuse them. A build skips every file whose codes exist (locally or in the mirror),
encodes the others and writes each one's object as soon as it is encoded (atomically: a
temporary file renamed into place; one PUT on S3), so an interrupted build resumes at the next
file. Each object carries the sha256 of its codes, checked whenever it is read; a corrupt or
truncated object is encoded again.

*One object per file, not shards of N files*: content addressing only works per file. A shard of
N files is keyed by its members, so one file added, changed or removed early in the list would
invalidate every shard after it. Per file, growing a collection by 10 files writes 10 objects.
The price is many small objects (about 12 KB for 30 s with 4 codebooks): the mirror is listed
once per build (1,000 keys a request) instead of probed per file, objects move in parallel
(:data:`TRANSFER_WORKERS`), and a later pod of the same manifest reads the assembled shards —
a few large objects — and never the clips.

**Assembled segments** (``key``, :func:`cache_key`) hash the model id, the compression
configuration, the processing fingerprint, the manifest digest and the segment length. A clip
shorter than ``segmentSeconds`` becomes one padded and masked segment; the tail of a longer clip
becomes its own padded segment when it is at least :data:`MIN_TAIL_FRACTION` (half) of a segment,
else it is dropped (it would be mostly padding). Shards are ``torch.save`` of int16 codes ``[n, K, T]``, int32 lengths ``[n]``, bool
masks ``[n, T]``, clip ids and prompts. ``index.json`` is written last and lists every shard with
its sha256, so a half-written set is ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fermata_trainer.audio_io import decode_audio
from fermata_trainer.dataset import TRAIN, VALIDATION, AudioFetcher, ClipEntry, verify_entry
from fermata_trainer.errors import ObjectNotFoundError
from fermata_trainer.logging_setup import get_logger
from fermata_trainer.model_loading import LoadedModel
from fermata_trainer.storage import LocalStorage, Storage, sha256_bytes, sha256_file

log = get_logger(__name__)

CACHE_FORMAT_VERSION = 2
CLIP_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
CLIPS_DIR = "clips"
SEGMENTS_PER_SHARD = 512
#: The tail of a long clip becomes its own (padded) segment when at least this share of one.
MIN_TAIL_FRACTION = 0.5
#: Parallel reads and writes of per-file objects (small objects: latency, not bandwidth, bound).
TRANSFER_WORKERS = 8

Samples = npt.NDArray[np.float32]
#: ``(samples [C, T], rate) -> (samples, rate)``: applied after decoding, before encoding.
AudioProcessor = Callable[[Samples, int], tuple[Samples, int]]


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
class CodesStats:
    """Where the codes of a build's clips (manifest entries) came from."""

    clips: int = 0
    tokenized: int = 0
    reused_local: int = 0
    reused_mirror: int = 0

    @property
    def reused(self) -> int:
        return self.reused_local + self.reused_mirror

    def as_dict(self) -> dict[str, int]:
        return {
            "clips": self.clips,
            "tokenized": self.tokenized,
            "reused": self.reused,
            "reusedLocal": self.reused_local,
            "reusedMirror": self.reused_mirror,
        }


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
    #: how many clips were tokenized or reused (set by :meth:`CodesCache.build`)
    stats: CodesStats | None = None


def segment_frames_for(segment_seconds: float, frame_rate: float) -> int:
    return max(1, int(round(segment_seconds * frame_rate)))


def _digest(payload: dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:32]


def cache_key(
    model_id: str,
    compression_config: dict[str, Any],
    manifest_digest: str,
    segment_frames: int,
    processing: dict[str, Any] | None = None,
) -> str:
    """The assembled segments of one manifest."""
    return _digest(
        {
            "version": CACHE_FORMAT_VERSION,
            "model": model_id,
            "compression": compression_config,
            "manifest": manifest_digest,
            "segmentFrames": segment_frames,
            "processing": processing or {},
        }
    )


def clip_key(
    content_sha256: str,
    compression_config: dict[str, Any],
    weights_digest: str,
    processing: dict[str, Any] | None = None,
) -> str:
    """The codes of one audio file: its content, the compression model and the processing."""
    return _digest(
        {
            "version": CLIP_FORMAT_VERSION,
            "sha256": content_sha256,
            "compression": compression_config,
            "weights": weights_digest,
            "processing": processing or {},
        }
    )


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes), device-independent."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
def encode_clip(
    model: LoadedModel, path: Path, device: torch.device, process: AudioProcessor | None = None
) -> torch.Tensor:
    """Codes ``[K, frames]`` (int64, CPU) of one audio file; ``process`` runs after decoding."""
    from audiocraft.data.audio_utils import convert_audio

    samples, rate = decode_audio(path)
    if process is not None:
        samples, rate = process(samples, rate)
    wav = torch.from_numpy(samples)[None]  # [1, C, T]
    wav = convert_audio(wav, rate, model.sample_rate, model.channels).to(device)
    codes, scale = model.compression_model.encode(wav)
    if scale is not None:  # renormalizing models are not used by MusicGen
        raise ValueError("compression model returned a scale; MusicGen codes expect none")
    out: torch.Tensor = codes[0].to("cpu", torch.int64)
    return out


# ----------------------------------------------------------------------------- per-file codes


def _codes_sha256(codes: torch.Tensor) -> str:
    return sha256_bytes(codes.contiguous().numpy().tobytes())


def clip_object_name(key: str) -> str:
    return f"{key[:2]}/{key}.pt"


def clip_object_bytes(key: str, codes: torch.Tensor) -> bytes:
    """A per-file object: int16 codes ``[K, frames]`` with their sha256 and key."""
    codes = codes.to(torch.int16).contiguous()
    buffer = io.BytesIO()
    payload = {"format": CLIP_FORMAT_VERSION, "key": key, "codes": codes, "sha256": _codes_sha256(codes)}
    torch.save(payload, buffer)
    return buffer.getvalue()


def parse_clip_object(key: str, data: bytes) -> torch.Tensor:
    """The codes of a per-file object; ``ValueError`` when it is not intact or not ``key``'s."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports a truncated zip or bad pickle in several ways
        raise ValueError(f"not a readable codes object ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CLIP_FORMAT_VERSION:
        raise ValueError("not a codes object of this format")
    codes = payload.get("codes")
    if payload.get("key") != key or not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError("codes object of another clip or shape")
    if codes.dtype != torch.int16 or _codes_sha256(codes) != payload.get("sha256"):
        raise ValueError("codes do not match their recorded sha256")
    return codes


class ClipStore:
    """Per-file codes in ``<local_root>/clips`` and, when there is a mirror, ``<mirror>/clips``."""

    def __init__(self, local_root: Path, mirror: Storage | None) -> None:
        self.local = LocalStorage(local_root / CLIPS_DIR)
        self.mirror = mirror.child(CLIPS_DIR) if mirror is not None else None

    def mirror_keys(self) -> set[str]:
        """Every clip key the mirror holds (one listing, not a request per file)."""
        if self.mirror is None:
            return set()
        return {Path(o.key).stem for o in self.mirror.list() if o.key.endswith(".pt")}

    def _read(self, storage: Storage, key: str) -> tuple[torch.Tensor, bytes] | None:
        name = clip_object_name(key)
        try:
            data = storage.get_bytes(name)
            return parse_clip_object(key, data), data
        except ObjectNotFoundError:
            return None
        except ValueError as exc:
            log.warning("codes_clip_corrupt", uri=storage.uri_of(name), problem=str(exc))
            return None

    def find(self, key: str, in_mirror: bool) -> tuple[torch.Tensor, str] | None:
        """``(codes, "local" | "mirror")``; a clip found in the mirror is copied locally."""
        local = self._read(self.local, key)
        if local is not None:
            return local[0], "local"
        if not in_mirror or self.mirror is None:
            return None
        mirrored = self._read(self.mirror, key)
        if mirrored is None:
            return None
        self.local.put_bytes(clip_object_name(key), mirrored[1])
        return mirrored[0], "mirror"

    def save(self, key: str, codes: torch.Tensor) -> bytes:
        data = clip_object_bytes(key, codes)
        self.local.put_bytes(clip_object_name(key), data)
        return data

    def upload(self, key: str, data: bytes) -> None:
        if self.mirror is not None:
            self.mirror.put_bytes(clip_object_name(key), data)


# ----------------------------------------------------------------------------- shards


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
    """The codes for one (model, manifest, segment length, processing), local and mirrored.

    ``processing`` is the fingerprint of what ``process`` does to the decoded samples (part of
    every key); a ``process`` without a fingerprint is refused, as its codes could not be told
    apart from unprocessed ones.
    """

    def __init__(
        self,
        model: LoadedModel,
        manifest_digest: str,
        segment_seconds: float,
        local_root: Path,
        mirror: Storage | None,
        *,
        processing: dict[str, Any] | None = None,
        process: AudioProcessor | None = None,
    ) -> None:
        if process is not None and not processing:
            raise ValueError("an audio processor needs a processing fingerprint (part of the cache key)")
        self.model = model
        self.processing: dict[str, Any] = dict(processing or {})
        self.process = process
        self.segment_frames = segment_frames_for(segment_seconds, model.frame_rate)
        self.key = cache_key(
            model.model_id, model.compression_config(), manifest_digest, self.segment_frames, self.processing
        )
        self.local_dir = local_root / self.key
        self.mirror = mirror.child(self.key) if mirror is not None else None
        self.clips = ClipStore(local_root, mirror)
        self.stats: CodesStats | None = None
        self._weights: str | None = None

    def clip_key(self, content_sha256: str) -> str:
        if self._weights is None:
            self._weights = weights_digest(self.model.compression_model)
        return clip_key(content_sha256, self.model.compression_config(), self._weights, self.processing)

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
            stats=self.stats,
        )

    def load(self) -> CodesDataset | None:
        """The assembled codes, from the local folder or the mirror; None when absent."""
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
        """Codes for every entry — reused where a file's codes exist, else encoded and written at
        once — then the segments assembled, written locally and mirrored.

        ``progress(done, total)`` counts clips, reused ones included; :attr:`stats` (also on the
        returned dataset) says how many were tokenized and how many reused.
        """
        self.local_dir.mkdir(parents=True, exist_ok=True)
        (self.local_dir / INDEX_NAME).unlink(missing_ok=True)
        keys = {e.id: self.clip_key(e.sha256) for e in entries}
        found = self._find_existing(sorted(set(keys.values())))
        log.info(
            "codes_clips_found",
            key=self.key,
            clips=len(entries),
            local=sum(1 for _, where in found.values() if where == "local"),
            mirror=sum(1 for _, where in found.values() if where == "mirror"),
            to_tokenize=sum(1 for k in keys.values() if k not in found),
        )
        self.stats = CodesStats(clips=len(entries))
        codes = self._collect(entries, keys, found, fetcher, device, verify_checksums, progress)
        index = self._assemble(entries, keys, codes)
        log.info(
            "codes_cache_built",
            key=self.key,
            clips=len(entries),
            tokenized=self.stats.tokenized,
            reused=self.stats.reused,
            reused_mirror=self.stats.reused_mirror,
            train_segments=index["splits"][TRAIN]["count"],
            validation_segments=index["splits"][VALIDATION]["count"],
            segment_frames=self.segment_frames,
        )
        self._upload(index)
        return self._dataset_from_index(index, "tokenized")

    def _find_existing(self, keys: list[str]) -> dict[str, tuple[torch.Tensor, str]]:
        listed = self.clips.mirror_keys()
        with ThreadPoolExecutor(max_workers=TRANSFER_WORKERS) as pool:
            results = pool.map(lambda k: self.clips.find(k, k in listed), keys)
            return {k: r for k, r in zip(keys, results, strict=True) if r is not None}

    def _collect(
        self,
        entries: Sequence[ClipEntry],
        keys: dict[str, str],
        found: dict[str, tuple[torch.Tensor, str]],
        fetcher: AudioFetcher,
        device: torch.device,
        verify_checksums: bool,
        progress: Callable[[int, int], None] | None,
    ) -> dict[str, torch.Tensor]:
        """The codes of every clip key: found ones as they are, the others encoded one by one,
        each written locally at once and uploaded in the background."""
        assert self.stats is not None
        codes = {k: c for k, (c, _) in found.items()}
        uploads: list[Future[None]] = []
        with ThreadPoolExecutor(max_workers=TRANSFER_WORKERS) as pool:
            for done, entry in enumerate(entries, start=1):
                key = keys[entry.id]
                if key in codes:
                    where = found[key][1] if key in found else "local"
                    if where == "mirror":
                        self.stats.reused_mirror += 1
                    else:
                        self.stats.reused_local += 1
                else:
                    path = verify_entry(entry, fetcher) if verify_checksums else fetcher.local(entry.audio)
                    codes[key] = encode_clip(self.model, path, device, self.process).to(torch.int16)
                    data = self.clips.save(key, codes[key])
                    uploads.append(pool.submit(self.clips.upload, key, data))
                    self.stats.tokenized += 1
                if progress is not None:
                    progress(done, len(entries))
            for upload in uploads:
                upload.result()
        return codes

    def _assemble(
        self, entries: Sequence[ClipEntry], keys: dict[str, str], codes: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        index: dict[str, Any] = {
            "version": CACHE_FORMAT_VERSION,
            "key": self.key,
            "model": self.model.model_id,
            "compression": self.model.compression_config(),
            "processing": self.processing,
            "segmentFrames": self.segment_frames,
            "frameRate": self.model.frame_rate,
            "clips": {e.id: keys[e.id] for e in entries},
            "splits": {},
        }
        for split in (TRAIN, VALIDATION):
            pending: list[tuple[torch.Tensor, int, str, str]] = []
            shards: list[dict[str, Any]] = []
            count = 0
            for entry in (e for e in entries if e.split == split):
                for seg, length in split_into_segments(codes[keys[entry.id]], self.segment_frames):
                    pending.append((seg, length, entry.id, entry.description))
                    count += 1
                    if len(pending) >= SEGMENTS_PER_SHARD:
                        shards.append(self._write_shard(f"{split}-{len(shards):05d}.pt", pending))
                        pending = []
            if pending:
                shards.append(self._write_shard(f"{split}-{len(shards):05d}.pt", pending))
            index["splits"][split] = {"count": count, "shards": shards}
        (self.local_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return index

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
