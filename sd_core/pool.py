"""The model pool: several models resident on the device within a memory budget, more kept in CPU RAM,
least recently used evicted first, never one in use, and one load per model at a time.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

import torch

from sd_core.checkpoints import AuxiliaryModel, CheckpointFormat, CheckpointInfo
from sd_core.config import CoreConfig
from sd_core.loader import LoadedModel, ModelKey, load_model

log = logging.getLogger(__name__)

Loader = Callable[[CheckpointInfo, AuxiliaryModel | None], LoadedModel]


class Residence(StrEnum):
    DEVICE = "device"
    RAM = "ram"


@dataclass(frozen=True, kw_only=True)
class ResidentModel:
    title: str
    vae: str | None
    residence: Residence
    size_bytes: int
    in_use: int


@dataclass(eq=False)
class _Entry:
    model: LoadedModel
    residence: Residence
    in_use: int = 0


class ModelPool:
    """Models keyed by checkpoint (+ VAE). Use `with pool.acquire(checkpoint, vae) as model:`.

    Eviction, when a model must come onto the device:
    1. device-resident models not in use move to the RAM cache, least recently used first, until the new one fits
       in the budget (`SD_VRAM_BUDGET`; 0 means 90% of the GPU, or no limit on a CPU device);
    2. the RAM cache keeps `SD_RAM_CACHE_MODELS` models; the least recently used beyond that are freed.
    A model in use is never moved or freed; when everything is in use the budget is exceeded rather than fail,
    and settled when models are released.
    """

    def __init__(self, config: CoreConfig, *, loader: Loader | None = None) -> None:
        self.config = config
        self.device = config.torch_device()
        self.budget_bytes = _effective_budget(config, self.device)
        self._loader: Loader = loader or (lambda checkpoint, vae: load_model(checkpoint, vae, config))
        self._lock = threading.Lock()
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()
        self._loading: dict[ModelKey, Future[LoadedModel]] = {}
        self.loads = 0
        self.evictions = 0

    @contextmanager
    def acquire(self, checkpoint: CheckpointInfo, vae: AuxiliaryModel | None = None) -> Iterator[LoadedModel]:
        key = ModelKey(checkpoint_sha256=checkpoint.sha256, vae_sha256=vae.sha256 if vae else None)
        entry = self._claim(key, checkpoint, vae)
        try:
            yield entry.model
        finally:
            with self._lock:
                entry.in_use -= 1
                # A budget exceeded while everything was in use is settled as soon as models are released.
                self._make_room(0, keep=key)

    def resident(self) -> list[ResidentModel]:
        """Most recently used first."""
        with self._lock:
            return [
                ResidentModel(
                    title=entry.model.checkpoint.title,
                    vae=entry.model.vae.name if entry.model.vae else None,
                    residence=entry.residence,
                    size_bytes=entry.model.size_bytes,
                    in_use=entry.in_use,
                )
                for entry in reversed(self._entries.values())
            ]

    def unload_all(self) -> None:
        """Free every model not in use (A1111's unload-checkpoint)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.in_use == 0]:
                self._drop(key)
        _free_device_memory()

    # ------------------------------------------------------------------------------------------------ internals
    def _claim(self, key: ModelKey, checkpoint: CheckpointInfo, vae: AuxiliaryModel | None) -> _Entry:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.in_use += 1
                    self._entries.move_to_end(key)
                    if entry.residence is Residence.RAM:
                        self._make_room(entry.model.size_bytes, keep=key)
                        entry.model.to(self.device)
                        entry.residence = Residence.DEVICE
                    return entry
                pending = self._loading.get(key)
                if pending is None:
                    future: Future[LoadedModel] = Future()
                    self._loading[key] = future
                    self._make_room(_estimated_size(checkpoint), keep=key)
                    break
            pending.result()  # another thread is loading it: wait, then claim what it inserted
        try:
            model = self._loader(checkpoint, vae)
        except BaseException as error:
            with self._lock:
                del self._loading[key]
            future.set_exception(error)
            raise
        with self._lock:
            self.loads += 1
            entry = _Entry(model=model, residence=Residence.DEVICE, in_use=1)
            self._entries[key] = entry
            del self._loading[key]
            self._make_room(0, keep=key)
        future.set_result(model)
        return entry

    def _make_room(self, incoming_bytes: int, *, keep: ModelKey) -> None:
        """Caller holds the lock. Moves LRU idle models off the device, then trims the RAM cache."""
        on_device = [(k, e) for k, e in self._entries.items() if e.residence is Residence.DEVICE and k != keep]
        used = sum(e.model.size_bytes for _, e in on_device) + incoming_bytes
        kept = self._entries.get(keep)
        if kept is not None and kept.residence is Residence.DEVICE:
            used += kept.model.size_bytes
        for _key, entry in on_device:
            if used <= self.budget_bytes:
                break
            if entry.in_use:
                continue
            log.info(
                "pool: moving %s to the RAM cache (device budget %d MB)",
                entry.model.checkpoint.title,
                self.budget_bytes // 10**6,
            )
            entry.model.to(torch.device("cpu"))
            entry.residence = Residence.RAM
            self.evictions += 1
            used -= entry.model.size_bytes
        in_ram = [k for k, e in self._entries.items() if e.residence is Residence.RAM and e.in_use == 0]
        for key in in_ram[: max(0, len(in_ram) - self.config.ram_cache_models)]:
            self._drop(key)
        _free_device_memory()

    def _drop(self, key: ModelKey) -> None:
        entry = self._entries.pop(key)
        log.info("pool: freeing %s", entry.model.checkpoint.title)
        self.evictions += 1
        del entry
        gc.collect()


def _estimated_size(checkpoint: CheckpointInfo) -> int:
    if checkpoint.format is CheckpointFormat.SINGLE_FILE:
        return checkpoint.filename.stat().st_size
    return sum(p.stat().st_size for p in checkpoint.filename.rglob("*.safetensors"))


def _effective_budget(config: CoreConfig, device: torch.device) -> int:
    if config.vram_budget_bytes > 0:
        return config.vram_budget_bytes
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    return sys.maxsize


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
