"""Fixtures for the trainer tests: synthetic MagnaTagATune trees, tiny-model configs, S3.

Everything runs on the CPU with the tiny in-code MusicGen (random weights) and data the tests
make themselves; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fermata_api import TrainerConfig
from fermata_dev.synthetic import SyntheticMtat, make_mtat_tree
from tests.s3_fixture import s3_server  # noqa: F401  (the S3 server fixture)
from tests.trainer.helpers import tiny_config

ConfigFactory = Callable[..., TrainerConfig]


@pytest.fixture
def mtat(tmp_path: Path) -> SyntheticMtat:
    """12 clips (WAV/FLAC, 0.7-3.2 s), every one carrying amapiano-like proxy tags."""
    return make_mtat_tree(tmp_path / "mtat", clips=12)


@pytest.fixture(scope="session")
def shared_mtat(tmp_path_factory: pytest.TempPathFactory) -> SyntheticMtat:
    """One synthetic tree for the session (tests that only read it)."""
    return make_mtat_tree(tmp_path_factory.mktemp("shared") / "mtat", clips=12)


@pytest.fixture
def make_config(tmp_path: Path, mtat: SyntheticMtat) -> ConfigFactory:
    def factory(**kwargs: Any) -> TrainerConfig:
        kwargs.setdefault("data", mtat.root)
        kwargs.setdefault("storage", tmp_path / "storage")
        kwargs.setdefault("work_dir", tmp_path / "work")
        return tiny_config(**kwargs)

    return factory
