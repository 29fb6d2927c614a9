"""The node's process-wide singletons: the engine (models folder, pool, generator) and the queue worker.

Built lazily from Django settings, once per process: a node runs one process that owns the device.
"""

from __future__ import annotations

import threading
import uuid
from functools import lru_cache
from pathlib import Path

from django.conf import settings

from gpu_node.registration import start_registration
from gpu_node.worker import Worker
from sd_core.config import CoreConfig
from sd_core.engine import Engine

_lock = threading.Lock()


def core_config() -> CoreConfig:
    return CoreConfig(
        models_dir=Path(settings.SD_MODELS_DIR),
        device=settings.SD_DEVICE,
        dtype=settings.SD_DTYPE,
        vram_budget_bytes=settings.SD_VRAM_BUDGET,
        ram_cache_models=settings.SD_RAM_CACHE_MODELS,
        allow_pickle=settings.SD_ALLOW_PICKLE,
        version=f"sd-multi {settings.SD_VERSION}",
    )


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    with _lock:
        return Engine(core_config())


BOOT_ID = uuid.uuid4().hex


@lru_cache(maxsize=1)
def get_worker() -> Worker:
    """The one worker of this process; it builds the engine lazily, on the first job."""
    return Worker(get_engine, max_batch=settings.SD_MAX_BATCH)


def start_node() -> None:
    """Start the worker thread (called once by the WSGI entry point of a process serving the node role)."""
    get_worker().start()
    start_registration()
