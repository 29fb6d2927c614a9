"""The engine's front door: the models folder, the model pool and the generator, wired from one CoreConfig."""

from __future__ import annotations

from sd_core.checkpoints import CheckpointRegistry
from sd_core.config import CoreConfig
from sd_core.generate import Generator, StepCallback
from sd_core.pool import ModelPool
from sd_core.types import GenerationControl, GenerationRequest, GenerationResult


class Engine:
    """One per process (per device): `generate(request, cancel=..., on_step=...)` and `generate_batch(requests)`."""

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.registry = CheckpointRegistry(config)
        self.pool = ModelPool(config)
        self.generator = Generator(config, self.registry, self.pool)

    def generate(
        self,
        request: GenerationRequest,
        *,
        cancel: GenerationControl | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        return self.generator.generate(request, cancel=cancel, on_step=on_step)

    def generate_batch(
        self,
        requests: list[GenerationRequest],
        *,
        controls: list[GenerationControl] | None = None,
        on_steps: list[StepCallback | None] | None = None,
    ) -> list[GenerationResult]:
        return self.generator.generate_batch(requests, controls=controls, on_steps=on_steps)
