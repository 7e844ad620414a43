"""Tokenize once: EnCodec codes cached in shards, reused without decoding audio."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fermata_api import DatasetSpec
from fermata_dev.synthetic import SyntheticMtat
from fermata_trainer.audio_io import decode_count
from fermata_trainer.codes_cache import INDEX_NAME, CodesCache, split_into_segments
from fermata_trainer.dataset import AudioFetcher, prepare_dataset
from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.model_loading import build_tiny_musicgen, parse_tiny
from fermata_trainer.storage import LocalStorage

pytestmark = pytest.mark.trainer

CPU = torch.device("cpu")


def test_segments_pad_and_mask_short_clips() -> None:
    codes = torch.arange(4 * 130).reshape(4, 130)
    segments = split_into_segments(codes, 50)
    assert [length for _, length in segments] == [50, 50, 30]  # 30-frame tail ≥ half: kept
    tail, length = segments[-1]
    assert torch.equal(tail[:, :30], codes[:, 100:]) and not tail[:, 30:].any()
    assert [n for _, n in split_into_segments(codes[:, :65], 50)] == [50]  # 15-frame tail dropped
    assert [n for _, n in split_into_segments(codes[:, :20], 50)] == [20]  # short clip: kept
    assert parse_tiny("tiny://seed=3,layers=1").layers == 1


def test_tiny_dropout_parameter() -> None:
    assert parse_tiny("tiny://seed=0").dropout == 0.1
    assert parse_tiny("tiny://seed=0,dropout=0").dropout == 0.0
    assert parse_tiny("tiny://dropout=0.25").dropout == 0.25
    with pytest.raises(TrainerConfigError, match="dropout must be a number"):
        parse_tiny("tiny://dropout=none")
    with pytest.raises(TrainerConfigError, match=r"dropout must be in \[0, 1\)"):
        parse_tiny("tiny://dropout=1")
    with pytest.raises(TrainerConfigError, match="layers must be an integer"):
        parse_tiny("tiny://layers=1.5")


def test_codes_cached_once_and_reused(tmp_path: Path, mtat: SyntheticMtat) -> None:
    model = build_tiny_musicgen(seed=0)
    storage = LocalStorage(tmp_path / "storage")
    work = tmp_path / "work"
    spec = DatasetSpec(uri=str(mtat.root), min_tags=3, segment_seconds=1.0)
    prepared = prepare_dataset(spec, storage, work)

    def cache() -> CodesCache:
        return CodesCache(model, prepared.manifest_digest, 1.0, work / "codes", storage.child("cache"))

    assert cache().load() is None
    decoded = decode_count()
    built = cache().build(prepared.entries, AudioFetcher(work), CPU)
    assert decode_count() - decoded == len(prepared.entries) == 12
    assert built.source == "tokenized" and built.segment_frames == 50
    assert built.num_codebooks == 4 and built.cardinality == 64

    train = built.train
    assert train.codes.dtype == torch.int16 and train.codes.shape[1:] == (4, 50)
    assert len(train) + len(built.validation) == 24  # 3 × (1.3 s → 1, 2.6 s → 3, 0.7 s → 1, 3.2 s → 3)
    lengths = set(train.lengths.tolist()) | set(built.validation.lengths.tolist())
    assert lengths == {50, 35, 30}  # the 0.7 s clip is padded and masked, not dropped
    assert torch.equal(train.masks.sum(dim=1).to(torch.int32), train.lengths)
    assert int(train.codes.max()) < 64 and len(set(train.codes.flatten().tolist())) > 8
    short = train.lengths.tolist().index(35) if 35 in train.lengths.tolist() else None
    if short is not None:
        assert not train.codes[short, :, 35:].any()
    assert set(train.prompts) <= {e.description for e in prepared.entries}

    index = json.loads((work / "codes" / cache().key / INDEX_NAME).read_text())
    assert index["splits"]["train"]["count"] == len(train)
    assert storage.exists(f"cache/{cache().key}/{INDEX_NAME}")  # mirrored

    # second run: the audio is gone, the shards are enough — nothing is decoded
    shutil.rmtree(mtat.root / "mp3")
    decoded = decode_count()
    again = cache().load()
    assert again is not None and again.source == "local"
    assert torch.equal(again.train.codes, train.codes)
    assert torch.equal(again.validation.masks, built.validation.masks)
    # a new pod: empty work dir, shards come from the mirror
    shutil.rmtree(work / "codes")
    mirrored = cache().load()
    assert mirrored is not None and mirrored.source == "mirror"
    assert torch.equal(mirrored.train.codes, train.codes)
    assert decode_count() == decoded

    # the key follows the segment length and the manifest
    assert CodesCache(model, prepared.manifest_digest, 2.0, work, None).key != cache().key
    assert CodesCache(model, "0" * 64, 1.0, work, None).key != cache().key
