"""Domain errors of the engine. Each message says how to fix the input; the web layer maps them once."""

from __future__ import annotations

from collections.abc import Sequence


class EngineError(Exception):
    """Base class of every error sd_core raises on purpose."""


class InvalidInputError(EngineError, ValueError):
    """A request field holds a value the engine cannot run; `field` names it (A1111 field name)."""

    def __init__(self, field: str, message: str, *, valid_values: Sequence[str] = ()) -> None:
        self.field = field
        self.valid_values = tuple(valid_values)
        if self.valid_values:
            message = f"{message}; valid values: {', '.join(self.valid_values)}"
        super().__init__(message)
        self.message = message


class UnknownSamplerError(InvalidInputError):
    """The sampler or scheduler name is not one we run."""


class CheckpointNotFoundError(InvalidInputError):
    """No checkpoint (or VAE/LoRA) of that name exists in the models folder."""


class CheckpointRefusedError(EngineError):
    """A model file exists but is refused: pickle without SD_ALLOW_PICKLE, a path outside the models
    folder, an oversized or corrupt safetensors header, or an architecture we cannot detect."""


class GenerationInterrupted(EngineError):
    """Raised inside the denoising loop to stop without decoding (used for aborts, not for interrupt)."""


class DeviceOutOfMemoryError(EngineError):
    """The device ran out of memory for this request; memory has been freed and the engine keeps serving."""
