"""Tiny model fixtures: the project's own seeded random-weight checkpoints, written once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sd_core.config import CoreConfig
from sd_core.engine import Engine
from sd_core.tiny import TinyModelFiles, write_tiny_models


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("models")
    write_tiny_models(models_dir)
    return models_dir


@pytest.fixture(scope="session")
def tiny_files(tiny_models_dir: Path) -> TinyModelFiles:
    return write_tiny_models(tiny_models_dir)


@pytest.fixture(scope="session")
def core_config(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CoreConfig:
    return CoreConfig(models_dir=tiny_models_dir, device="cpu", cache_dir=tmp_path_factory.mktemp("sd-cache"))


@pytest.fixture(scope="session")
def engine(core_config: CoreConfig) -> Iterator[Engine]:
    yield Engine(core_config)
