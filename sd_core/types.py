"""Values that cross the engine's boundary: the generation request, its result, step progress, control."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from PIL import Image


class GenerationMode(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One A1111 txt2img/img2img request, validated, with A1111 field names and API defaults.

    `checkpoint` is a checkpoint title or any A1111 alias of it; `init_images` non-empty means img2img
    (with `mask`, inpainting).
    """

    checkpoint: str
    prompt: str = ""
    negative_prompt: str = ""
    sampler_name: str = "Euler"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    eta: float | None = None
    denoising_strength: float | None = None
    vae: str | None = None
    disable_extra_networks: bool = False
    emphasis: str = "Original"
    eta_noise_seed_delta: int = 0
    preview_every_n_steps: int = 0
    # img2img / inpaint
    init_images: tuple[Image.Image, ...] = ()
    mask: Image.Image | None = None
    resize_mode: int = 0
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float = 1.0
    img2img_fix_steps: bool = False
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    # infotext switches (A1111 options add_model_hash_to_info, ...)
    add_model_hash_to_info: bool = True
    add_model_name_to_info: bool = True
    add_version_to_infotext: bool = True

    @property
    def mode(self) -> GenerationMode:
        return GenerationMode.IMG2IMG if self.init_images else GenerationMode.TXT2IMG

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """Images with their A1111 metadata. `info` is the dict behind A1111's `info` JSON string."""

    images: tuple[Image.Image, ...]
    infotexts: tuple[str, ...]
    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]
    info: Mapping[str, object]
    interrupted: bool = False
    duration_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class StepProgress:
    """Progress of one job: batch `batch_index` of `batch_count`, sampling step `step` of `total_steps`."""

    batch_index: int
    batch_count: int
    step: int
    total_steps: int
    preview: Image.Image | None = None

    @property
    def fraction(self) -> float:
        """A1111's progress formula without its 0.01 head start."""
        if self.batch_count <= 0 or self.total_steps <= 0:
            return 0.0
        per_batch = 1.0 / self.batch_count
        return min(1.0, self.batch_index * per_batch + per_batch * self.step / self.total_steps)


@dataclass(eq=False)
class GenerationControl:
    """Per-job stop switches. `interrupt()` stops at the next step and keeps what was produced;
    `skip()` stops the current batch only and goes on with the next one."""

    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)

    def interrupt(self) -> None:
        self.interrupted.set()

    def skip(self) -> None:
        self.skipped.set()

    def should_stop_batch(self) -> bool:
        return self.interrupted.is_set() or self.skipped.is_set()

    def begin_batch(self) -> None:
        """A skip applies to one batch: clear it when the next batch starts."""
        self.skipped.clear()
