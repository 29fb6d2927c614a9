"""Loading a checkpoint into diffusers pipelines, fully offline, the same way for real and tiny models.

Single files load with `from_single_file(path, config=<local diffusers-format folder>, local_files_only=True)`:
the checkpoint's own sibling `<stem>.config/` folder when it has one, else the shipped folder of its architecture.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from sd_core.architectures import Architecture, Family, shipped_config_folder
from sd_core.checkpoints import AuxiliaryModel, CheckpointFormat, CheckpointInfo
from sd_core.config import CoreConfig
from sd_core.errors import CheckpointRefusedError

log = logging.getLogger(__name__)

# We log our own loading stages; diffusers' and transformers' progress bars and cast notices would only add noise
# to a server log.
diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()


class PipelineKind(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


# diffusers pipelines are dynamic objects (components are attributes set at run time): typed as Any here.
_PIPELINE_CLASSES: dict[tuple[bool, PipelineKind], Any] = {
    (False, PipelineKind.TXT2IMG): StableDiffusionPipeline,
    (False, PipelineKind.IMG2IMG): StableDiffusionImg2ImgPipeline,
    (False, PipelineKind.INPAINT): StableDiffusionInpaintPipeline,
    (True, PipelineKind.TXT2IMG): StableDiffusionXLPipeline,
    (True, PipelineKind.IMG2IMG): StableDiffusionXLImg2ImgPipeline,
    (True, PipelineKind.INPAINT): StableDiffusionXLInpaintPipeline,
}


@dataclass(frozen=True, kw_only=True)
class ModelKey:
    """What identifies one resident model: the checkpoint and the VAE replacing its own (if any)."""

    checkpoint_sha256: str
    vae_sha256: str | None = None


@dataclass(eq=False)
class LoadedModel:
    """A checkpoint's pipelines. img2img/inpaint variants share the loaded modules (`from_pipe`), never a copy.

    `lock` serialises generations on this model: LoRA adapters and the scheduler are set per generation.
    """

    checkpoint: CheckpointInfo
    vae: AuxiliaryModel | None
    pipeline: Any
    size_bytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    _variants: dict[PipelineKind, Any] = field(default_factory=dict)
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Samplers replace the scheduler per generation; each new one is built from the model's own config.
        self.scheduler_config = dict(self.pipeline.scheduler.config)

    @property
    def key(self) -> ModelKey:
        return ModelKey(checkpoint_sha256=self.checkpoint.sha256, vae_sha256=self.vae.sha256 if self.vae else None)

    @property
    def architecture(self) -> Architecture:
        return self.checkpoint.architecture

    @property
    def device(self) -> torch.device:
        return torch.device(self.pipeline.device)

    def variant(self, kind: PipelineKind) -> Any:
        """The pipeline for `kind`, built once from the loaded components."""
        if kind is PipelineKind.TXT2IMG and not self.architecture.inpainting:
            return self.pipeline
        if kind not in self._variants:
            cls = _PIPELINE_CLASSES[(self.architecture.family is Family.SDXL, kind)]
            pipe = cls.from_pipe(self.pipeline)
            pipe.set_progress_bar_config(disable=True)
            self._variants[kind] = pipe
        return self._variants[kind]

    def to(self, device: torch.device) -> None:
        self.pipeline.to(device)


def load_model(
    checkpoint: CheckpointInfo, vae: AuxiliaryModel | None, config: CoreConfig, *, device: torch.device | None = None
) -> LoadedModel:
    """Load `checkpoint` (with `vae` replacing its own) offline onto `device`, logging each stage."""
    started = time.monotonic()
    target = device if device is not None else config.torch_device()
    dtype = config.torch_dtype()
    config_folder = config_folder_for(checkpoint, config)
    base_class = _PIPELINE_CLASSES[(checkpoint.architecture.family is Family.SDXL, PipelineKind.TXT2IMG)]
    if checkpoint.architecture.inpainting:
        base_class = _PIPELINE_CLASSES[(checkpoint.architecture.family is Family.SDXL, PipelineKind.INPAINT)]
    log.info(
        "loading %s (%s, %s) 1/3: reading weights", checkpoint.title, checkpoint.architecture.label, checkpoint.format
    )
    try:
        if checkpoint.format is CheckpointFormat.DIFFUSERS:
            pipeline = base_class.from_pretrained(str(checkpoint.filename), local_files_only=True, dtype=dtype)
        else:
            pipeline = base_class.from_single_file(
                str(checkpoint.filename), config=str(config_folder), local_files_only=True, torch_dtype=dtype
            )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointRefusedError(f"cannot load {checkpoint.name}: {error}") from error
    if vae is not None:
        log.info("loading %s 2/3: VAE %s", checkpoint.title, vae.name)
        pipeline.vae = load_vae(vae, config_folder, dtype)
    log.info("loading %s 3/3: moving to %s (%s)", checkpoint.title, target, dtype)
    pipeline.to(target)
    pipeline.set_progress_bar_config(disable=True)
    size = pipeline_size_bytes(pipeline)
    log.info("loaded %s in %.1fs, %.1f MB", checkpoint.title, time.monotonic() - started, size / 1e6)
    return LoadedModel(checkpoint=checkpoint, vae=vae, pipeline=pipeline, size_bytes=size)


def config_folder_for(checkpoint: CheckpointInfo, config: CoreConfig) -> Path:
    if checkpoint.config_folder is not None:
        return checkpoint.config_folder
    return shipped_config_folder(checkpoint.architecture, config.work_dir)


def load_vae(vae: AuxiliaryModel, config_folder: Path, dtype: torch.dtype) -> AutoencoderKL:
    try:
        return AutoencoderKL.from_single_file(
            str(vae.filename), config=str(config_folder), subfolder="vae", local_files_only=True, torch_dtype=dtype
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointRefusedError(f"cannot load VAE {vae.name}: {error}") from error


def pipeline_size_bytes(pipeline: Any) -> int:
    total = 0
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in module.parameters())
            total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total
