"""Generation on the tiny models with the real loading and diffusers code: txt2img, img2img, inpaint, hires fix,
seeds, batching, LoRA, VAE, interrupt/skip, progress and previews."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from sd_core.engine import Engine
from sd_core.errors import InvalidInputError, UnknownSamplerError
from sd_core.generate import batch_key
from sd_core.infotext import encode_image, parse_infotext, read_infotext
from sd_core.samplers import SAMPLERS
from sd_core.types import GenerationControl, GenerationRequest, StepProgress

SD1 = "tiny-sd1.safetensors"
SDXL = "tiny-sdxl.safetensors"


def request(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "checkpoint": SD1,
        "prompt": "a red house",
        "steps": 3,
        "width": 64,
        "height": 64,
        "seed": 1234,
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def max_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).max())


@pytest.mark.parametrize("checkpoint", [SD1, "tiny-sd1-diffusers", SDXL, "tiny-sdxl-diffusers"])
def test_it_generates_64px_images_with_every_tiny_model(engine: Engine, checkpoint: str):
    result = engine.generate(request(checkpoint=checkpoint, batch_size=2))
    assert len(result.images) == 2
    for image in result.images:
        assert image.size == (64, 64)
        assert pixels(image).std() > 1.0, "a real decoded image, not a flat colour"
    assert result.seeds == (1234, 1235)
    assert f"Model: {checkpoint.removesuffix('.safetensors')}" in result.infotexts[0]


def test_it_gives_the_same_image_for_the_same_seed_and_another_for_another_seed(engine: Engine):
    first = engine.generate(request()).images[0]
    again = engine.generate(request()).images[0]
    other = engine.generate(request(seed=99)).images[0]
    assert max_difference(first, again) == 0
    assert max_difference(first, other) > 10


def test_it_draws_a_random_seed_for_minus_one_and_reports_it(engine: Engine):
    result = engine.generate(request(seed=-1))
    seed = result.seeds[0]
    assert 0 <= seed < 4294967294
    assert result.info["seed"] == seed
    assert max_difference(result.images[0], engine.generate(request(seed=seed)).images[0]) == 0


def test_it_uses_consecutive_seeds_over_batch_size_and_n_iter(engine: Engine):
    result = engine.generate(request(batch_size=2, n_iter=2, seed=10))
    assert result.seeds == (10, 11, 12, 13)
    assert result.info["all_seeds"] == [10, 11, 12, 13]
    single = engine.generate(request(seed=12)).images[0]
    assert max_difference(result.images[2], single) <= 2


def test_it_keeps_the_seed_and_varies_the_subseed_with_a_variation_strength(engine: Engine):
    result = engine.generate(request(batch_size=2, seed=5, subseed=50, subseed_strength=0.5))
    assert result.seeds == (5, 5)
    assert result.subseeds == (50, 51)
    assert "Variation seed: 50, Variation seed strength: 0.5" in result.infotexts[0]
    plain = engine.generate(request(seed=5)).images[0]
    assert max_difference(result.images[0], plain) > 5
    assert max_difference(result.images[0], result.images[1]) > 5


def test_batch_of_compatible_requests_equals_each_request_alone(engine: Engine):
    requests = [request(prompt=f"prompt number {i}", seed=100 + i) for i in range(4)]
    assert len({batch_key(r) for r in requests}) == 1
    batched = engine.generate_batch(requests)
    for one, result in zip(requests, batched, strict=True):
        alone = engine.generate(one)
        assert result.seeds == alone.seeds
        assert max_difference(result.images[0], alone.images[0]) <= 2, "equal up to float noise of batch position"
        assert result.infotexts == alone.infotexts


def test_it_refuses_to_batch_requests_that_differ_in_steps(engine: Engine):
    with pytest.raises(InvalidInputError) as caught:
        engine.generate_batch([request(), request(steps=4)])
    assert caught.value.field == "batch"


@pytest.mark.parametrize("sampler", [spec.name for spec in SAMPLERS])
def test_every_advertised_sampler_runs_three_steps(engine: Engine, sampler: str):
    result = engine.generate(request(sampler_name=sampler))
    assert pixels(result.images[0]).std() > 1.0
    assert f"Sampler: {sampler}," in result.infotexts[0]


def test_it_names_the_field_for_an_unknown_sampler(engine: Engine):
    with pytest.raises(UnknownSamplerError) as caught:
        engine.generate(request(sampler_name="Bogus Sampler"))
    assert caught.value.field == "sampler_name"
    assert "Euler a" in caught.value.valid_values


def test_it_writes_the_infotext_into_the_png_and_reads_it_back(engine: Engine):
    result = engine.generate(request(negative_prompt="blurry", cfg_scale=5.5, sampler_name="DPM++ 2M"))
    text = result.infotexts[0]
    assert text.splitlines()[0] == "a red house"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 1234, Size: 64x64" in text
    assert result.images[0].info["parameters"] == text
    png = encode_image(result.images[0], infotext=text)
    assert read_infotext(png) == text
    parsed = parse_infotext(read_infotext(png))
    assert parsed["Seed"] == "1234"
    assert parsed["Model hash"] == result.info["sd_model_hash"]
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_the_info_dict_has_the_a1111_keys(engine: Engine):
    info = engine.generate(request(batch_size=2)).info
    for key in (
        "prompt",
        "all_prompts",
        "negative_prompt",
        "all_negative_prompts",
        "seed",
        "all_seeds",
        "subseed",
        "all_subseeds",
        "subseed_strength",
        "width",
        "height",
        "sampler_name",
        "cfg_scale",
        "steps",
        "batch_size",
        "restore_faces",
        "face_restoration_model",
        "sd_model_name",
        "sd_model_hash",
        "sd_vae_name",
        "sd_vae_hash",
        "seed_resize_from_w",
        "seed_resize_from_h",
        "denoising_strength",
        "extra_generation_params",
        "index_of_first_image",
        "infotexts",
        "styles",
        "job_timestamp",
        "clip_skip",
        "is_using_inpainting_conditioning",
        "version",
    ):
        assert key in info, key
    assert len(info["infotexts"]) == 2  # type: ignore[arg-type]


def test_clip_skip_changes_the_image_and_is_written_in_the_infotext(engine: Engine):
    base = engine.generate(request())
    skipped = engine.generate(request(clip_skip=2))
    assert max_difference(base.images[0], skipped.images[0]) > 1
    assert "Clip skip: 2" in skipped.infotexts[0]
    assert "Clip skip" not in base.infotexts[0]


def test_attention_weights_and_long_prompts_change_the_image(engine: Engine):
    plain = engine.generate(request(prompt="a red house")).images[0]
    weighted = engine.generate(request(prompt="a (red:1.6) house")).images[0]
    long_prompt = engine.generate(request(prompt="a red house, " * 40)).images[0]
    assert max_difference(plain, weighted) > 1
    assert pixels(long_prompt).std() > 1.0


def test_a_lora_changes_the_image_for_that_generation_only(engine: Engine):
    before = engine.generate(request()).images[0]
    with_lora = engine.generate(request(prompt="a red house <lora:tiny-lora:1>"))
    after = engine.generate(request()).images[0]
    assert max_difference(before, with_lora.images[0]) > 5
    assert max_difference(before, after) == 0, "the LoRA is gone afterwards"
    assert 'Lora hashes: "tiny-lora: ' in with_lora.infotexts[0]
    ignored = engine.generate(request(prompt="a red house <lora:tiny-lora:1>", disable_extra_networks=True))
    assert "Lora hashes" not in ignored.infotexts[0]


def test_an_unknown_lora_is_ignored_like_a1111(engine: Engine):
    result = engine.generate(request(prompt="a red house <lora:no-such-lora:1>"))
    assert max_difference(result.images[0], engine.generate(request()).images[0]) == 0


def test_a_separate_vae_changes_the_decoding_and_is_named_in_the_infotext(engine: Engine):
    own = engine.generate(request()).images[0]
    other = engine.generate(request(vae="tiny-vae.safetensors"))
    assert max_difference(own, other.images[0]) > 5
    assert "VAE: tiny-vae.safetensors" in other.infotexts[0]
    assert other.info["sd_vae_name"] == "tiny-vae"


def test_img2img_runs_steps_times_denoising_strength_steps(engine: Engine):
    init = engine.generate(request()).images[0]
    seen: list[StepProgress] = []
    result = engine.generate(request(init_images=(init,), denoising_strength=0.5, steps=8), on_step=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert seen[-1].total_steps == 4
    assert result.images[0].size == (64, 64)
    assert "Denoising strength: 0.5" in result.infotexts[0]


@pytest.mark.parametrize("resize_mode", [0, 1, 2])
def test_img2img_resizes_the_init_image_to_the_requested_size(engine: Engine, resize_mode: int):
    init = Image.new("RGBA", (100, 40), (200, 30, 30, 255))
    result = engine.generate(
        request(init_images=(init,), width=64, height=96, denoising_strength=0.3, resize_mode=resize_mode)
    )
    assert result.images[0].size == (64, 96)


def test_inpaint_keeps_every_unmasked_pixel(engine: Engine):
    original = engine.generate(request(seed=7)).images[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for full_res in (False, True):
        result = engine.generate(
            request(
                init_images=(original,),
                mask=mask,
                mask_blur_x=0,
                mask_blur_y=0,
                denoising_strength=0.9,
                inpaint_full_res=full_res,
                inpainting_fill=1,
            )
        )
        out = pixels(result.images[0])
        source = pixels(original)
        outside = np.asarray(mask) == 0
        assert np.array_equal(out[outside], source[outside]), f"unmasked pixels kept (full_res={full_res})"
        assert np.abs(out[~outside] - source[~outside]).max() > 5, "the masked area was repainted"
        assert "Masked content: original" in result.infotexts[0]


def test_inpaint_only_masked_keeps_the_original_size_and_a_blank_mask_falls_back_to_img2img(engine: Engine):
    original = engine.generate(request(seed=8, width=96, height=64)).images[0]
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (60, 20, 80, 40))
    result = engine.generate(
        request(
            init_images=(original,),
            mask=mask,
            denoising_strength=0.8,
            inpaint_full_res=True,
            inpaint_full_res_padding=8,
        )
    )
    assert result.images[0].size == (96, 64)
    assert np.array_equal(pixels(result.images[0])[:, :40], pixels(original)[:, :40])
    blank = engine.generate(request(init_images=(original,), mask=Image.new("L", (96, 64), 0), denoising_strength=0.5))
    assert blank.images[0].size == (64, 64)


def test_hires_fix_makes_a_larger_image_in_a_second_pass(engine: Engine):
    seen: list[StepProgress] = []
    result = engine.generate(
        request(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=4), on_step=seen.append
    )
    assert result.images[0].size == (96, 96)
    assert "Hires upscale: 1.5, Hires steps: 4, Hires upscaler: Latent" in result.infotexts[0]
    assert result.info["width"] == 64, "info keeps the first-pass size, like A1111"
    assert len(seen) == 3 + 2  # 3 first-pass steps, then int(4 * 0.5) second-pass steps
    pixel = engine.generate(
        request(enable_hr=True, hr_resize_x=128, hr_resize_y=64, hr_upscaler="Lanczos", denoising_strength=0.5)
    )
    assert pixel.images[0].size == (128, 64)
    with pytest.raises(InvalidInputError) as caught:
        engine.generate(request(enable_hr=True, hr_upscaler="ESRGAN_4x"))
    assert caught.value.field == "hr_upscaler"


def test_progress_reports_every_step_and_previews_every_n_steps(engine: Engine):
    seen: list[StepProgress] = []
    engine.generate(request(steps=4, n_iter=2, preview_every_n_steps=2), on_step=seen.append)
    assert [(p.batch_index, p.step) for p in seen] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (1, 4)]
    previews = [p.preview for p in seen if p.preview is not None]
    assert len(previews) == 4
    assert previews[0].size[0] >= 8
    assert seen[-1].fraction == 1.0


def test_interrupt_stops_at_the_next_step_and_returns_the_partial_image(engine: Engine):
    control = GenerationControl()
    seen: list[StepProgress] = []

    def on_step(progress: StepProgress) -> None:
        seen.append(progress)
        if progress.step == 2:
            control.interrupt()

    result = engine.generate(request(steps=10, n_iter=3), cancel=control, on_step=on_step)
    assert result.interrupted
    assert len(result.images) == 1, "later batches do not run"
    assert max(p.step for p in seen) <= 3
    full = engine.generate(request(steps=10)).images[0]
    assert max_difference(result.images[0], full) > 1, "a partially denoised image, not the finished one"


def test_skip_stops_the_current_batch_only(engine: Engine):
    control = GenerationControl()
    seen: list[StepProgress] = []

    def on_step(progress: StepProgress) -> None:
        seen.append(progress)
        if progress.batch_index == 0 and progress.step == 1:
            control.skip()

    result = engine.generate(request(steps=4, n_iter=2), cancel=control, on_step=on_step)
    assert not result.interrupted
    assert len(result.images) == 2
    assert [p.step for p in seen if p.batch_index == 1] == [1, 2, 3, 4], "the next batch runs in full"


def test_concurrent_generations_on_two_models_keep_their_own_models(engine: Engine):
    results: dict[str, str] = {}

    def run(checkpoint: str) -> None:
        results[checkpoint] = engine.generate(request(checkpoint=checkpoint)).infotexts[0]

    threads = [threading.Thread(target=run, args=(name,)) for name in (SD1, SDXL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "Model: tiny-sd1," in results[SD1]
    assert "Model: tiny-sdxl," in results[SDXL]
