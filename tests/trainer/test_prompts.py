"""Prompts: MagnaTagATune prompt wording, track descriptions and per-epoch augmentation, and the
text conditions a tiny training run actually feeds the model."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from fermata_trainer import training_loop
from fermata_trainer.dataset import ClipEntry, prepare_dataset
from fermata_trainer.prompts import (
    augmented_prompt,
    describe_track,
    moods_of,
    prompt_from_tags,
    tag_terms,
    vocals_of,
)
from fermata_trainer.storage import open_storage
from fermata_trainer.training_loop import Trainer
from tests.trainer.conftest import ConfigFactory

pytestmark = pytest.mark.trainer

REAL_MAKE_ATTRIBUTES = training_loop.make_attributes

DESCRIPTION = "soulful amapiano track at 113 BPM in A minor, piano and log drums"
TAGS = ("amapiano", "soulful", "piano", "log drums", "shakers", "female vocals")


# ----------------------------------------------------------------------------- MagnaTagATune wording


def test_synonymous_moods_are_named_once() -> None:
    assert moods_of(["jazzy", "jazz"]) == ["jazzy"]
    assert moods_of(["jazz", "mellow"]) == ["mellow", "jazzy"]
    assert moods_of(["calm", "relaxing", "chill"]) == ["chill"]
    assert moods_of(["ambient", "spacey", "dark"]) == ["dark", "atmospheric"]
    for clip in map(str, range(20)):
        prompt = prompt_from_tags(clip, ["jazzy", "jazz", "piano", "drums"])
        assert "jazzy and jazz" not in prompt and prompt.count("jazz") == 1


def test_vocals_are_kept_beside_the_instruments() -> None:
    tags = ["piano", "bass", "drums", "percussion", "synth", "female vocal"]
    prompt = prompt_from_tags("1", tags)
    assert prompt.endswith(", female vocals")
    assert "piano, deep bass and drums" in prompt  # three instruments, vocals not among them
    assert prompt_from_tags("1", ["piano", "no vocals"]).endswith(", no vocals")
    assert vocals_of(["male voice", "woman"]) == "female and male vocals"
    assert vocals_of(["vocals", "no vocals", "female"]) == "female vocals"  # specific beats "none"
    assert vocals_of(["no singer"]) == "no vocals"
    assert vocals_of(["piano"]) is None
    assert "vocals" not in prompt_from_tags("1", ["piano", "drums"])


def test_track_descriptions() -> None:
    assert (
        describe_track(
            genre="amapiano", moods=["soulful"], instruments=["piano", "log drums"], bpm=113.2, key="A minor"
        )
        == DESCRIPTION
    )
    assert describe_track(genre=None, bpm=96.0) == "track at 96 BPM"
    assert (
        describe_track(genre="amapiano", key="F# major", vocals="no vocals")
        == "amapiano track in F# major, no vocals"
    )
    assert tag_terms(["Piano, log drums and shakers"]) == ["piano", "log drums", "and", "shakers"]


# ----------------------------------------------------------------------------- augmentation


def _epochs(seed: int, clip: str = "clip-1", epochs: int = 12) -> list[str]:
    return [augmented_prompt(DESCRIPTION, TAGS, 113.2, "A minor", clip, e, seed) for e in range(epochs)]


def test_augmentation_is_reproducible_from_the_seed() -> None:
    assert _epochs(7) == _epochs(7)
    assert _epochs(7) != _epochs(8)
    assert _epochs(7, "clip-1") != _epochs(7, "clip-2")


def test_augmentation_varies_across_epochs_and_names_the_clips_details() -> None:
    prompts = _epochs(7, epochs=20)
    assert prompts[0] == DESCRIPTION  # the first epoch trains on the description itself
    assert len(set(prompts)) >= 4
    later = " | ".join(prompts[1:])
    assert any(t in later for t in ("shakers", "female vocals"))  # tags the description lacks
    # BPM and key reach prompts of clips whose description does not name them
    plain = [
        augmented_prompt("mellow amapiano with log drums", ("mellow", "piano"), 112.6, "C major", "c", e, 3)
        for e in range(1, 30)
    ]
    assert any("113 BPM" in p for p in plain) and any("C major" in p for p in plain)
    assert all(p.strip() for p in plain)


def test_augmentation_without_details_keeps_the_description() -> None:
    assert {augmented_prompt("deep amapiano", (), None, None, "c", e, 1) for e in range(10)} == {
        "deep amapiano"
    }


# ----------------------------------------------------------------------------- in the training loop


def _record_text_conditions(monkeypatch: pytest.MonkeyPatch, trainer: Trainer) -> dict[int, list[str]]:
    """The prompts the training steps hand the model's condition provider, by epoch (the real
    make_attributes still builds the conditions; validation and evaluation build theirs in
    fermata_trainer.evaluation, not recorded here)."""
    seen: dict[int, list[str]] = defaultdict(list)
    real = REAL_MAKE_ATTRIBUTES

    def recording(lm: Any, prompts: list[str | None], sample_rate: int) -> list[Any]:
        seen[trainer.position.epoch].extend(p for p in prompts if p is not None)
        return real(lm, prompts, sample_rate)

    monkeypatch.setattr(training_loop, "make_attributes", recording)
    return seen


def test_training_prompts_change_across_epochs(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(max_steps=8)
    trainer = Trainer(config)
    seen = _record_text_conditions(monkeypatch, trainer)
    trainer.run()

    descriptions = {e.description for e in trainer.clip_meta.values()}
    assert len(seen) >= 2  # epochs 0 and 1
    assert set(seen[0]) <= descriptions  # epoch 0: the descriptions as they are
    later = {p for epoch, prompts in seen.items() if epoch > 0 for p in prompts}
    assert later - descriptions  # later epochs: variants

    # reproducible from the seed: a second run sees exactly the same prompts
    again = Trainer(make_config(max_steps=8, storage=config.storage.checkpoints + "-again"))
    seen_again = _record_text_conditions(monkeypatch, again)
    again.run()
    assert dict(seen_again) == dict(seen)


def test_training_prompts_are_the_descriptions_without_augmentation(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(make_config(max_steps=6, prompt_augmentation=False))
    seen = _record_text_conditions(monkeypatch, trainer)
    trainer.run()
    assert trainer.clip_meta == {}
    assert {p for prompts in seen.values() for p in prompts} <= {
        e.description for e in _train_entries(trainer)
    }


def _train_entries(trainer: Trainer) -> list[ClipEntry]:
    cfg = trainer.config
    return prepare_dataset(cfg.dataset, open_storage(cfg.storage.checkpoints), Path(cfg.work_dir)).train
