"""The model pool: LRU eviction within the device budget, the RAM cache, never evicting a model in use, and one
load per model under concurrency. Real tiny models, real loads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sd_core.checkpoints import AuxiliaryModel, CheckpointInfo, CheckpointRegistry
from sd_core.config import CoreConfig
from sd_core.loader import LoadedModel, load_model
from sd_core.pool import ModelPool, Residence


class CountingLoader:
    """The real loader, counting its calls (and slowed down so that concurrent claims overlap)."""

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, checkpoint: CheckpointInfo, vae: AuxiliaryModel | None) -> LoadedModel:
        with self._lock:
            self.calls.append(checkpoint.name)
        threading.Event().wait(0.2)
        return load_model(checkpoint, vae, self.config)


@pytest.fixture
def registry(tiny_models_dir: Path, tmp_path: Path) -> CheckpointRegistry:
    return CheckpointRegistry(CoreConfig(models_dir=tiny_models_dir, device="cpu", cache_dir=tmp_path))


def _pool(registry: CheckpointRegistry, *, budget: int, ram_cache: int) -> tuple[ModelPool, CountingLoader]:
    config = CoreConfig(
        models_dir=registry.config.models_dir,
        device="cpu",
        cache_dir=registry.config.cache_dir,
        vram_budget_bytes=budget,
        ram_cache_models=ram_cache,
    )
    loader = CountingLoader(config)
    return ModelPool(config, loader=loader), loader


def _residence(pool: ModelPool) -> dict[str, Residence]:
    return {model.title.split(" [")[0]: model.residence for model in pool.resident()}


def test_it_loads_a_model_once_under_eight_concurrent_requests(registry: CheckpointRegistry):
    pool, loader = _pool(registry, budget=0, ram_cache=2)
    checkpoint = registry.resolve("tiny-sd1.safetensors")
    seen: list[LoadedModel] = []
    start = threading.Barrier(8)

    def claim() -> None:
        start.wait()
        with pool.acquire(checkpoint) as model:
            seen.append(model)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.calls == ["tiny-sd1.safetensors"]
    assert len(seen) == 8
    assert all(model is seen[0] for model in seen)


def test_it_evicts_the_least_recently_used_model_to_ram_then_frees_it(registry: CheckpointRegistry):
    sd1, sd1_folder, sdxl = (
        registry.resolve(n) for n in ("tiny-sd1.safetensors", "tiny-sd1-diffusers", "tiny-sdxl.safetensors")
    )
    budget = 7_000_000  # one tiny SDXL (6.4 MB) or one tiny SD1 (3.7 MB) fits, not two models
    pool, loader = _pool(registry, budget=budget, ram_cache=1)
    with pool.acquire(sd1):
        pass
    with pool.acquire(sd1_folder):
        pass
    assert _residence(pool) == {"tiny-sd1-diffusers": Residence.DEVICE, "tiny-sd1.safetensors": Residence.RAM}
    with pool.acquire(sdxl):
        pass
    assert _residence(pool) == {"tiny-sdxl.safetensors": Residence.DEVICE, "tiny-sd1-diffusers": Residence.RAM}
    assert pool.evictions >= 3
    with pool.acquire(sd1_folder):  # back from the RAM cache: no new load
        pass
    assert loader.calls.count("tiny-sd1-diffusers") == 1
    assert _residence(pool)["tiny-sd1-diffusers"] is Residence.DEVICE


def test_it_never_evicts_a_model_in_use(registry: CheckpointRegistry):
    sd1, sdxl = registry.resolve("tiny-sd1.safetensors"), registry.resolve("tiny-sdxl.safetensors")
    pool, _ = _pool(registry, budget=1, ram_cache=0)
    with pool.acquire(sd1) as in_use, pool.acquire(sdxl):
        assert _residence(pool) == {"tiny-sd1.safetensors": Residence.DEVICE, "tiny-sdxl.safetensors": Residence.DEVICE}
        assert in_use.pipeline.unet is not None
    with pool.acquire(sd1):
        pass
    assert [model.title.split(" [")[0] for model in pool.resident()] == ["tiny-sd1.safetensors"]


def test_a_separate_vae_is_its_own_pool_entry(registry: CheckpointRegistry):
    sd1 = registry.resolve("tiny-sd1.safetensors")
    vae = registry.resolve_vae("tiny-vae.safetensors")
    pool, loader = _pool(registry, budget=0, ram_cache=2)
    with pool.acquire(sd1) as plain, pool.acquire(sd1, vae) as with_vae:
        assert plain is not with_vae
        assert plain.pipeline.vae is not with_vae.pipeline.vae
    assert len(loader.calls) == 2
    assert {model.vae for model in pool.resident()} == {None, "tiny-vae.safetensors"}


def test_img2img_and_inpaint_pipelines_share_the_loaded_weights(registry: CheckpointRegistry):
    from sd_core.loader import PipelineKind

    pool, _ = _pool(registry, budget=0, ram_cache=1)
    with pool.acquire(registry.resolve("tiny-sdxl.safetensors")) as model:
        for kind in (PipelineKind.IMG2IMG, PipelineKind.INPAINT):
            variant = model.variant(kind)
            assert variant.unet is model.pipeline.unet
            assert variant.vae is model.pipeline.vae
            assert variant.text_encoder_2 is model.pipeline.text_encoder_2
        assert model.variant(PipelineKind.IMG2IMG) is model.variant(PipelineKind.IMG2IMG)
