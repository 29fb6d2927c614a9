"""Fixtures for node tests: a real node process (gunicorn) on 127.0.0.1 serving the tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.processes import ServerProcess


@pytest.fixture(scope="session")
def node_server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        role="node",
        data_dir=tmp_path_factory.mktemp("node"),
        env={
            "SD_MODELS_DIR": str(tiny_models_dir),
            "SD_MAX_BATCH": "8",
            "SD_MAX_QUEUED_PER_USER": "60",
            "SD_MAX_STEPS": "1000",
        },
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def node_url(node_server: ServerProcess) -> str:
    return node_server.url


def as_user(user: str) -> dict[str, str]:
    return {"X-User-Id": user}


def txt2img(url: str, user: str, timeout: float = 120, **fields: Any) -> requests.Response:
    body: dict[str, Any] = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 1}
    body.update(fields)
    return requests.post(f"{url}/sdapi/v1/txt2img", json=body, headers=as_user(user), timeout=timeout)
