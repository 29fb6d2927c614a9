"""The engine's configuration: one frozen value built once (from Django settings on a node, by hand in tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL_SUBFOLDERS = ("Stable-diffusion", "Lora", "VAE", "embeddings", "ControlNet")
DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024
ENGINE_VERSION = "sd-multi 0.1.0"


@dataclass(frozen=True, kw_only=True)
class CoreConfig:
    """Everything sd_core needs to know about its host. Paths are absolute."""

    models_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    vram_budget_bytes: int = 0
    ram_cache_models: int = 2
    allow_pickle: bool = False
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    cache_dir: Path | None = None
    version: str = ENGINE_VERSION
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def checkpoints_dir(self) -> Path:
        return self.models_dir / "Stable-diffusion"

    @property
    def lora_dir(self) -> Path:
        return self.models_dir / "Lora"

    @property
    def vae_dir(self) -> Path:
        return self.models_dir / "VAE"

    @property
    def embeddings_dir(self) -> Path:
        return self.models_dir / "embeddings"

    @property
    def work_dir(self) -> Path:
        """Where derived data (architecture config folders with tokenizer files) is written."""
        return self.cache_dir if self.cache_dir is not None else self.models_dir / ".sd_multi_cache"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """float32 on CPU; float16 on CUDA unless bfloat16/float32 is asked for."""
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if self.dtype != "auto":
            return names[self.dtype]
        return torch.float16 if self.torch_device().type == "cuda" else torch.float32
