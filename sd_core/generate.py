"""Generation with A1111 semantics on diffusers pipelines: txt2img (+ hires fix), img2img and inpaint, for one
request or a batch of compatible requests run as one pipeline call.

A single request and a batch share one path: a job is a list of iterations (A1111's n_iter), each a list of rows
(images). A batch of requests is one iteration whose rows come from several requests; since every row's noise
comes from its own seed, each image equals what its request alone would give.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from sd_core import images as image_ops
from sd_core.architectures import Family
from sd_core.checkpoints import AuxiliaryModel, CheckpointInfo, CheckpointRegistry
from sd_core.config import CoreConfig
from sd_core.errors import DeviceOutOfMemoryError, InvalidInputError
from sd_core.infotext import format_infotext
from sd_core.loader import LoadedModel, PipelineKind
from sd_core.lora import AppliedLora, applied_loras, find_loras
from sd_core.pool import ModelPool
from sd_core.prompts import ExtraNetworkCall, PromptEncoder, extract_extra_networks
from sd_core.samplers import ResolvedSampler, make_scheduler, resolve_sampler
from sd_core.seeds import JobSeeds, image_noise
from sd_core.types import GenerationControl, GenerationMode, GenerationRequest, GenerationResult, StepProgress

log = logging.getLogger(__name__)

StepCallback = Callable[[StepProgress], None]

LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
HIRES_DEFAULT_DENOISE = 0.7
INPAINT_FILL_NAMES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


@dataclass(frozen=True, kw_only=True)
class _Row:
    """One image to make: which request it belongs to, its prompts (extra networks removed) and seeds."""

    request_index: int
    image_index: int
    prompt: str
    negative_prompt: str
    seed: int
    subseed: int


@dataclass(kw_only=True)
class _Job:
    """A resolved request: its checkpoint, VAE, sampler, LoRAs and seeds, and what it has produced so far."""

    request: GenerationRequest
    checkpoint: CheckpointInfo
    vae: AuxiliaryModel | None
    sampler: ResolvedSampler
    clean_prompt: str
    clean_negative_prompt: str
    networks: tuple[ExtraNetworkCall, ...]
    seeds: JobSeeds
    control: GenerationControl
    on_step: StepCallback | None
    images: list[Image.Image] = field(default_factory=list)
    image_seeds: list[int] = field(default_factory=list)
    image_subseeds: list[int] = field(default_factory=list)
    loras: tuple[AppliedLora, ...] = ()


class Generator:
    """Runs requests on models from the pool. Thread-safe: each model is used by one generation at a time."""

    def __init__(self, config: CoreConfig, registry: CheckpointRegistry, pool: ModelPool) -> None:
        self.config = config
        self.registry = registry
        self.pool = pool

    # ------------------------------------------------------------------------------------------- public entry
    def generate(
        self,
        request: GenerationRequest,
        *,
        cancel: GenerationControl | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        return self.generate_batch([request], controls=[cancel or GenerationControl()], on_steps=[on_step])[0]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        controls: Sequence[GenerationControl] | None = None,
        on_steps: Sequence[StepCallback | None] | None = None,
    ) -> list[GenerationResult]:
        """Run `requests` (one, or several sharing `batch_key`) and return one result per request.

        1. Resolve each request: checkpoint, VAE, sampler, extra networks, seeds.
        2. Take the model from the pool and lock it; apply the LoRAs for this generation.
        3. Plan iterations: one request runs n_iter iterations of batch_size rows; a batch runs one iteration.
        4. Per iteration: encode prompts, make noise from each row's seed, run the pipeline (+ hires fix).
        5. Assemble each request's images, infotexts and A1111 info.
        """
        started = time.monotonic()
        jobs = [self._resolve(r, c, s) for r, c, s in _zip_callbacks(requests, controls, on_steps)]
        if len(jobs) > 1:
            _check_batchable(jobs)
        lead = jobs[0]
        lora_files = find_loras(lead.networks, self.registry)
        with self.pool.acquire(lead.checkpoint, lead.vae) as model, model.lock:
            kind = _pipeline_kind(lead.request, model)
            pipe = model.variant(kind)
            try:
                with applied_loras(pipe, lora_files) as applied:
                    for job in jobs:
                        job.loras = applied
                    for rows in _plan_iterations(jobs):
                        if all(
                            job.control.interrupted.is_set()
                            for job in {r.request_index: jobs[r.request_index] for r in rows}.values()
                        ):
                            break
                        self._run_iteration(model, pipe, kind, jobs, rows)
            except torch.cuda.OutOfMemoryError as error:
                _free_memory()
                raise DeviceOutOfMemoryError(
                    f"the device ran out of memory for {lead.request.width}x{lead.request.height}, "
                    f"{sum(len(j.seeds.seeds) for j in jobs)} image(s); use a smaller size or batch"
                ) from error
        duration = time.monotonic() - started
        return [self._result(job, duration) for job in jobs]

    # ----------------------------------------------------------------------------------------------- resolving
    def _resolve(self, request: GenerationRequest, control: GenerationControl, on_step: StepCallback | None) -> _Job:
        _check_request(request)
        checkpoint = self.registry.resolve(request.checkpoint, field="sd_model_checkpoint")
        vae = self.registry.resolve_vae(request.vae, field="sd_vae") if request.vae else None
        sampler = resolve_sampler(request.sampler_name, request.scheduler)
        prompt, networks = (
            (request.prompt, ()) if request.disable_extra_networks else extract_extra_networks(request.prompt)
        )
        negative, _ = extract_extra_networks(request.negative_prompt)
        seeds = JobSeeds.for_job(
            seed=request.seed,
            subseed=request.subseed,
            subseed_strength=request.subseed_strength,
            image_count=request.image_count,
        )
        return _Job(
            request=request,
            checkpoint=checkpoint,
            vae=vae,
            sampler=sampler,
            clean_prompt=prompt,
            clean_negative_prompt=negative,
            networks=tuple(networks),
            seeds=seeds,
            control=control,
            on_step=on_step,
        )

    # ----------------------------------------------------------------------------------------------- iteration
    def _run_iteration(
        self, model: LoadedModel, pipe: Any, kind: PipelineKind, jobs: list[_Job], rows: list[_Row]
    ) -> None:
        lead = jobs[rows[0].request_index]
        request = lead.request
        for job in {id(jobs[r.request_index]): jobs[r.request_index] for r in rows}.values():
            job.control.begin_batch()
        iteration = rows[0].image_index // max(1, request.batch_size) if len(jobs) == 1 else 0
        iterations = request.n_iter if len(jobs) == 1 else 1
        sdxl = model.architecture.family is Family.SDXL
        # One seed per image: DPM++ SDE draws its noise from per-image Brownian trees seeded this way.
        pipe.scheduler = make_scheduler(lead.sampler, model.scheduler_config, seed=[r.seed for r in rows], sdxl=sdxl)
        encoder = PromptEncoder.from_pipeline(pipe)
        encoded = encoder.encode(
            [r.prompt for r in rows],
            [r.negative_prompt for r in rows],
            clip_skip=request.clip_skip,
            emphasis=request.emphasis,
        )
        callback = _StepReporter(
            jobs=[jobs[i] for i in sorted({r.request_index for r in rows})],
            batch_index=iteration,
            batch_count=iterations,
            architecture=model.architecture.family.value,
        )
        common: dict[str, Any] = {
            "prompt_embeds": encoded.prompt_embeds,
            "negative_prompt_embeds": encoded.negative_prompt_embeds,
            "guidance_scale": request.cfg_scale,
            "generator": [torch.Generator("cpu").manual_seed(r.seed + request.eta_noise_seed_delta) for r in rows],
            "callback_on_step_end": callback,
            "callback_on_step_end_tensor_inputs": ["latents"],
        }
        if encoded.pooled_prompt_embeds is not None:
            common["pooled_prompt_embeds"] = encoded.pooled_prompt_embeds
            common["negative_pooled_prompt_embeds"] = encoded.negative_pooled_prompt_embeds
        eta = request.eta if request.eta is not None else None
        if eta is not None:
            common["eta"] = eta
        if kind is PipelineKind.TXT2IMG:
            produced = self._txt2img(model, pipe, request, rows, common, callback)
        else:
            produced = self._img2img(model, pipe, kind, request, rows, common)
        for row, image in zip(rows, produced, strict=True):
            job = jobs[row.request_index]
            job.images.append(image)
            job.image_seeds.append(row.seed)
            job.image_subseeds.append(row.subseed)

    def _txt2img(
        self,
        model: LoadedModel,
        pipe: Any,
        request: GenerationRequest,
        rows: list[_Row],
        common: dict[str, Any],
        callback: _StepReporter,
    ) -> list[Image.Image]:
        scale = pipe.vae_scale_factor
        shape = (
            pipe.unet.config.in_channels if not model.architecture.inpainting else 4,
            request.height // scale,
            request.width // scale,
        )
        resize_from = None
        if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
            resize_from = (request.seed_resize_from_w, request.seed_resize_from_h)
        noise = torch.stack(
            [
                image_noise(
                    seed=r.seed,
                    subseed=r.subseed,
                    subseed_strength=request.subseed_strength,
                    shape=shape,
                    seed_resize_from=resize_from,
                )
                for r in rows
            ]
        )
        first_pass_output = "latent" if request.enable_hr else "pil"
        output = pipe(
            num_inference_steps=request.steps,
            height=request.height,
            width=request.width,
            latents=noise.to(model.device, pipe.unet.dtype),
            output_type=first_pass_output,
            **common,
        )
        if not request.enable_hr or callback.stopped():
            return _as_images(pipe, output, first_pass_output)
        return self._hires_pass(model, request, output.images, common, callback, [r.seed for r in rows])

    def _hires_pass(
        self,
        model: LoadedModel,
        request: GenerationRequest,
        latents: torch.Tensor,
        common: dict[str, Any],
        callback: _StepReporter,
        seeds: list[int],
    ) -> list[Image.Image]:
        """Hires fix: upscale the first pass (in latent space, or decoded with a pixel upscaler), then img2img."""
        width, height = hires_size(request)
        pipe = model.variant(PipelineKind.IMG2IMG)
        pipe.scheduler = make_scheduler(
            resolve_sampler(request.sampler_name, request.scheduler),
            model.scheduler_config,
            seed=[seed + 1 for seed in seeds],
            sdxl=model.architecture.family is Family.SDXL,
        )
        if request.hr_upscaler in LATENT_UPSCALE_MODES:
            mode, antialias = LATENT_UPSCALE_MODES[request.hr_upscaler]
            scale = pipe.vae_scale_factor
            init: Any = torch.nn.functional.interpolate(
                latents,
                size=(height // scale, width // scale),
                mode=mode,
                antialias=antialias if mode in ("bilinear", "bicubic") else False,
            )
        else:
            decoded = _decode_latents(pipe, latents)
            init = [image.resize((width, height), PIXEL_UPSCALERS[request.hr_upscaler]) for image in decoded]
        callback.phase_started()
        output = pipe(
            image=init,
            strength=request.denoising_strength or HIRES_DEFAULT_DENOISE,
            num_inference_steps=request.hr_second_pass_steps or request.steps,
            **common,
        )
        return list(output.images)

    def _img2img(
        self,
        model: LoadedModel,
        pipe: Any,
        kind: PipelineKind,
        request: GenerationRequest,
        rows: list[_Row],
        common: dict[str, Any],
    ) -> list[Image.Image]:
        """img2img and inpaint: init images resized like A1111, the mask prepared, unmasked pixels kept."""
        originals = [image_ops.flatten_alpha(image) for image in request.init_images]
        per_row = [originals[row.image_index % len(originals)] for row in rows]
        denoise = request.denoising_strength if request.denoising_strength is not None else 0.75
        strength = min(max(denoise, 0.001), 0.999)
        steps = request.steps
        if request.img2img_fix_steps or int(steps * strength) < 1:
            # A1111 runs int(steps * denoise) steps, but always at least one; with img2img_fix_steps, `steps`.
            steps = math.ceil(max(request.steps if request.img2img_fix_steps else 1, 1) / strength)
        base = {"strength": strength, "num_inference_steps": steps, **common}
        if kind is PipelineKind.IMG2IMG:
            resized = [
                image_ops.resize_image(image, request.width, request.height, request.resize_mode) for image in per_row
            ]
            return list(pipe(image=resized, **base).images)
        assert request.mask is not None
        prepared = [
            image_ops.prepare_inpaint(
                image,
                request.mask,
                width=request.width,
                height=request.height,
                resize_mode=request.resize_mode,
                invert=bool(request.inpainting_mask_invert),
                blur_x=request.mask_blur_x,
                blur_y=request.mask_blur_y,
                full_res=request.inpaint_full_res,
                padding=request.inpaint_full_res_padding,
                inpainting_fill=request.inpainting_fill,
            )
            for image in per_row
        ]
        if any(inputs is None for inputs in prepared):
            # A blank mask with "Only masked": A1111 falls back to plain img2img.
            plain = model.variant(PipelineKind.IMG2IMG)
            plain.scheduler = pipe.scheduler
            return self._img2img(model, plain, PipelineKind.IMG2IMG, replace(request, mask=None), rows, common)
        ready = [inputs for inputs in prepared if inputs is not None]
        generated = pipe(
            image=[inputs.image for inputs in ready],
            mask_image=[inputs.mask for inputs in ready],
            height=request.height,
            width=request.width,
            **base,
        ).images
        return [
            image_ops.paste_back(inputs.original, image, inputs.overlay_mask, inputs.crop)
            for inputs, image in zip(ready, generated, strict=True)
        ]

    # --------------------------------------------------------------------------------------------------- result
    def _result(self, job: _Job, duration: float) -> GenerationResult:
        request = job.request
        prompts = [request.prompt] * len(job.seeds.seeds)
        negatives = [request.negative_prompt] * len(job.seeds.seeds)
        infotexts = [
            self._infotext(job, seed, subseed)
            for seed, subseed in zip(job.image_seeds, job.image_subseeds, strict=True)
        ]
        for image, infotext in zip(job.images, infotexts, strict=True):
            image.info["parameters"] = infotext  # what A1111 writes as the PNG `parameters` chunk
        extra = self._extra_params(job)
        info: dict[str, object] = {
            "prompt": request.prompt,
            "all_prompts": prompts,
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": negatives,
            "seed": job.seeds.seeds[0],
            "all_seeds": list(job.seeds.seeds),
            "subseed": job.seeds.subseeds[0],
            "all_subseeds": list(job.seeds.subseeds),
            "subseed_strength": request.subseed_strength,
            "width": request.width,
            "height": request.height,
            "sampler_name": job.sampler.infotext_sampler_name,
            "cfg_scale": request.cfg_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": job.checkpoint.model_name,
            "sd_model_hash": job.checkpoint.shorthash,
            "sd_vae_name": job.vae.name.rsplit(".", 1)[0] if job.vae else None,
            "sd_vae_hash": job.vae.shorthash if job.vae else None,
            "seed_resize_from_w": request.seed_resize_from_w,
            "seed_resize_from_h": request.seed_resize_from_h,
            "denoising_strength": request.denoising_strength,
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime()),
            "clip_skip": request.clip_skip,
            "is_using_inpainting_conditioning": job.checkpoint.architecture.inpainting
            and request.mode is GenerationMode.IMG2IMG,
            "version": self.config.version,
        }
        interrupted = job.control.interrupted.is_set()
        log.info(
            "generated %d/%d image(s) model=%s size=%dx%d steps=%d sampler=%s in %.2fs%s",
            len(job.images),
            request.image_count,
            job.checkpoint.title,
            request.width,
            request.height,
            request.steps,
            job.sampler.infotext_sampler_name,
            duration,
            " (interrupted)" if interrupted else "",
        )
        return GenerationResult(
            images=tuple(job.images),
            infotexts=tuple(infotexts),
            seeds=tuple(job.image_seeds),
            subseeds=tuple(job.image_subseeds),
            info=info,
            interrupted=interrupted,
            duration_s=duration,
        )

    def _infotext(self, job: _Job, seed: int, subseed: int) -> str:
        request = job.request
        params: dict[str, object] = {
            "Steps": request.steps,
            "Sampler": job.sampler.infotext_sampler_name,
            "Schedule type": job.sampler.infotext_schedule_label,
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model hash": job.checkpoint.shorthash if request.add_model_hash_to_info else None,
            "Model": job.checkpoint.model_name if request.add_model_name_to_info else None,
            "VAE hash": job.vae.shorthash if job.vae else None,
            "VAE": job.vae.name if job.vae else None,
            "Variation seed": subseed if request.subseed_strength != 0 else None,
            "Variation seed strength": request.subseed_strength if request.subseed_strength != 0 else None,
            "Seed resize from": (
                f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
                if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
                else None
            ),
            "Denoising strength": request.denoising_strength
            if (request.mode is GenerationMode.IMG2IMG or request.enable_hr)
            else None,
            "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
            "ENSD": request.eta_noise_seed_delta if request.eta_noise_seed_delta else None,
            **self._extra_params(job),
            "Version": self.config.version if request.add_version_to_infotext else None,
        }
        return format_infotext(prompt=request.prompt, negative_prompt=request.negative_prompt, params=params)

    def _extra_params(self, job: _Job) -> dict[str, object]:
        request = job.request
        extra: dict[str, object] = {}
        if request.mode is GenerationMode.IMG2IMG and request.mask is not None:
            extra["Mask blur"] = request.mask_blur_x if request.mask_blur_x == request.mask_blur_y else None
            extra["Inpaint area"] = "Only masked" if request.inpaint_full_res else None
            extra["Masked area padding"] = request.inpaint_full_res_padding if request.inpaint_full_res else None
            extra["Masked content"] = INPAINT_FILL_NAMES.get(request.inpainting_fill)
            extra["Mask mode"] = "Inpaint not masked" if request.inpainting_mask_invert else None
        if request.enable_hr and request.mode is GenerationMode.TXT2IMG:
            width, height = hires_size(request)
            if request.hr_resize_x or request.hr_resize_y:
                extra["Hires resize"] = f"{width}x{height}"
            else:
                extra["Hires upscale"] = request.hr_scale
            extra["Hires steps"] = request.hr_second_pass_steps or None
            extra["Hires upscaler"] = request.hr_upscaler
        if job.loras:
            extra["Lora hashes"] = ", ".join(f"{lora.name}: {lora.hash}" for lora in job.loras)
        if request.emphasis != "Original" and any(c in request.prompt + request.negative_prompt for c in "()[]"):
            extra["Emphasis"] = request.emphasis
        return {key: value for key, value in extra.items() if value is not None}


# ------------------------------------------------------------------------------------------------------- helpers


class _StepReporter:
    """The per-step callback given to diffusers: reports progress (and previews) to every job in the call and
    stops the loop early when all of them want it stopped (interrupt or skip)."""

    def __init__(self, *, jobs: list[_Job], batch_index: int, batch_count: int, architecture: str) -> None:
        self.jobs = jobs
        self.batch_index = batch_index
        self.batch_count = batch_count
        self.architecture = architecture
        self.preview_every = max((job.request.preview_every_n_steps for job in jobs), default=0)

    def stopped(self) -> bool:
        return all(job.control.should_stop_batch() for job in self.jobs)

    def phase_started(self) -> None:
        """A second pass (hires fix) starts counting its steps from 0 again, like A1111."""

    def __call__(self, pipe: Any, step_index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if self.stopped():
            pipe._interrupt = True
        step = step_index + 1
        total = int(getattr(pipe, "num_timesteps", 0) or step)
        preview = None
        if self.preview_every and step % self.preview_every == 0 and "latents" in tensors:
            preview = image_ops.latent_preview_grid(
                tensors["latents"].detach().float().cpu(), architecture=self.architecture
            )
        progress = StepProgress(
            batch_index=self.batch_index,
            batch_count=self.batch_count,
            step=min(step, total),
            total_steps=total,
            preview=preview,
        )
        for job in self.jobs:
            if job.on_step is not None:
                job.on_step(progress)
        return tensors


def batch_key(request: GenerationRequest) -> tuple[object, ...] | None:
    """Requests with equal keys can run as one batched call; None means this request must run alone.

    Eligible: txt2img, one iteration, no hires fix, a batch-safe sampler; keys then cover model, VAE, size,
    sampler, schedule, steps, CFG, clip skip, emphasis and the LoRAs named in the prompt.
    """
    if request.mode is not GenerationMode.TXT2IMG or request.n_iter != 1 or request.enable_hr:
        return None
    try:
        resolved = resolve_sampler(request.sampler_name, request.scheduler)
    except InvalidInputError:
        return None
    if not resolved.sampler.batch_safe:
        return None
    _, networks = extract_extra_networks(request.prompt) if not request.disable_extra_networks else ("", ())
    return (
        request.checkpoint,
        request.vae,
        request.width,
        request.height,
        resolved.sampler.name,
        resolved.schedule.name,
        request.steps,
        request.cfg_scale,
        request.clip_skip,
        request.emphasis,
        request.eta,
        request.eta_noise_seed_delta,
        tuple(networks),
        request.subseed_strength != 0,
    )


def hires_size(request: GenerationRequest) -> tuple[int, int]:
    """A1111: hr_resize_x/y when given (one of them 0 keeps the aspect ratio), else width/height * hr_scale."""
    if request.hr_resize_x or request.hr_resize_y:
        width = request.hr_resize_x or int(request.hr_resize_y * request.width / request.height)
        height = request.hr_resize_y or int(request.hr_resize_x * request.height / request.width)
    else:
        width, height = int(request.width * request.hr_scale), int(request.height * request.hr_scale)
    return width // 8 * 8, height // 8 * 8


def _check_request(request: GenerationRequest) -> None:
    """The engine's own invariants; the web layer validates limits before this."""
    if request.width % 8 or request.height % 8 or request.width <= 0 or request.height <= 0:
        field = "width" if request.width % 8 or request.width <= 0 else "height"
        raise InvalidInputError(field, "width and height must be positive multiples of 8")
    if request.steps < 1:
        raise InvalidInputError("steps", "steps must be at least 1")
    if request.batch_size < 1 or request.n_iter < 1:
        raise InvalidInputError("batch_size" if request.batch_size < 1 else "n_iter", "must be at least 1")
    if (
        request.mode is GenerationMode.IMG2IMG
        and request.mask is None
        and len(request.init_images) > request.batch_size
    ):
        raise InvalidInputError("init_images", "more init images than batch_size")
    if (
        request.enable_hr
        and request.hr_upscaler not in LATENT_UPSCALE_MODES
        and request.hr_upscaler not in PIXEL_UPSCALERS
    ):
        raise InvalidInputError(
            "hr_upscaler",
            f"unknown upscaler '{request.hr_upscaler}'",
            valid_values=[*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS],
        )
    if request.inpainting_fill not in INPAINT_FILL_NAMES:
        raise InvalidInputError("inpainting_fill", "must be 0, 1, 2 or 3", valid_values=["0", "1", "2", "3"])


def _check_batchable(jobs: list[_Job]) -> None:
    keys = {batch_key(job.request) for job in jobs}
    if None in keys or len(keys) != 1:
        raise InvalidInputError("batch", "these requests cannot run as one batch (see generate.batch_key)")


def _pipeline_kind(request: GenerationRequest, model: LoadedModel) -> PipelineKind:
    if request.mode is GenerationMode.TXT2IMG:
        return PipelineKind.TXT2IMG
    return PipelineKind.INPAINT if request.mask is not None else PipelineKind.IMG2IMG


def _plan_iterations(jobs: list[_Job]) -> list[list[_Row]]:
    """One request: n_iter iterations of batch_size rows. Several requests: one iteration with all rows."""

    def rows_of(index: int, job: _Job, images: range) -> list[_Row]:
        return [
            _Row(
                request_index=index,
                image_index=i,
                prompt=job.clean_prompt,
                negative_prompt=job.clean_negative_prompt,
                seed=job.seeds.seeds[i],
                subseed=job.seeds.subseeds[i],
            )
            for i in images
        ]

    if len(jobs) == 1:
        job = jobs[0]
        size = job.request.batch_size
        return [rows_of(0, job, range(n * size, (n + 1) * size)) for n in range(job.request.n_iter)]
    return [[row for index, job in enumerate(jobs) for row in rows_of(index, job, range(job.request.batch_size))]]


def _zip_callbacks(
    requests: Sequence[GenerationRequest],
    controls: Sequence[GenerationControl] | None,
    on_steps: Sequence[StepCallback | None] | None,
) -> list[tuple[GenerationRequest, GenerationControl, StepCallback | None]]:
    if not requests:
        raise InvalidInputError("requests", "nothing to generate")
    controls = list(controls) if controls is not None else [GenerationControl() for _ in requests]
    callbacks = list(on_steps) if on_steps is not None else [None] * len(requests)
    return list(zip(requests, controls, callbacks, strict=True))


def _as_images(pipe: Any, output: Any, output_type: str) -> list[Image.Image]:
    if output_type == "latent":
        return _decode_latents(pipe, output.images)
    return list(output.images)


def _decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return list(pipe.image_processor.postprocess(decoded, output_type="pil"))


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
