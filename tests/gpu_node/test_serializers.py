"""The txt2img/img2img request serializers: A1111's fields and defaults, pydantic v1 coercion, the node's limits (each
a 422 naming its field), and the mapping of a request plus a user's options onto sd_core's GenerationRequest."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rest_framework.exceptions import ValidationError

from gpu_node import runtime
from gpu_node.errors import InitImageNotFoundError, ScriptNotFoundError, validation_entries
from gpu_node.options import A1111_DEFAULTS
from gpu_node.serializers import build_generation_request, echo_parameters
from sd_core.errors import InvalidInputError, UnknownSamplerError
from sd_core.infotext import encode_image
from sd_core.types import GenerationRequest

TXT2IMG_FIELDS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": None,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None, "override_settings": None,
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "firstpass_image": None, "comments": None, "sampler_index": "Euler",
    "script_name": None, "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
    "force_task_id": None, "infotext": None, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "",
}  # fmt: skip
IMG2IMG_ONLY_FIELDS: dict[str, Any] = {
    "init_images": None, "resize_mode": 0, "denoising_strength": 0.75, "image_cfg_scale": None, "mask": None,
    "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0,
    "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None, "latent_mask": None, "include_init_images": False,
}  # fmt: skip

# What webuiapi 0.9.17's txt2img() sends (API.md §13), with its defaults.
WEBUIAPI_TXT2IMG_BODY: dict[str, Any] = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
    "prompt": "a lighthouse", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 20, "cfg_scale": 7.0,
    "width": 512, "height": 512, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True, "sampler_name": "Euler a",
    "sampler_index": "Euler a", "scheduler": "automatic", "script_name": None, "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {},
}  # fmt: skip


@pytest.fixture(autouse=True)
def tiny_node(settings: Any, tiny_models_dir: Path) -> Iterator[None]:
    settings.SD_MODELS_DIR = str(tiny_models_dir)
    settings.SD_MAX_PIXELS = 1024 * 1024
    settings.SD_MAX_STEPS = 150
    settings.SD_MAX_BATCH = 8
    settings.SD_MAX_IMAGE_BYTES = 1024 * 1024
    runtime.get_engine.cache_clear()
    yield
    runtime.get_engine.cache_clear()


@pytest.fixture
def options() -> dict[str, Any]:
    return {**A1111_DEFAULTS, "sd_model_checkpoint": "tiny-sd1.safetensors"}


def build(kind: str, options: dict[str, Any], **fields: Any) -> GenerationRequest:
    return build_generation_request(kind, fields, options)


def png(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 40, 40)) -> str:
    return base64.b64encode(encode_image(Image.new("RGB", size, color), infotext=None)).decode()


def entries(error: ValidationError) -> list[dict[str, Any]]:
    return list(validation_entries(error.detail))


def refused(kind: str, options: dict[str, Any], **fields: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as caught:
        build(kind, options, **fields)
    return entries(caught.value)


# ----------------------------------------------------------------------------------------- fields and defaults


def test_it_echoes_every_txt2img_field_with_a1111s_defaults():
    assert echo_parameters("txt2img", {}) == TXT2IMG_FIELDS


def test_it_echoes_every_img2img_field_without_the_images_unless_asked():
    expected = {key: value for key, value in TXT2IMG_FIELDS.items() if not key.startswith(("hr_", "firstphase"))}
    expected.pop("enable_hr")
    expected.update(IMG2IMG_ONLY_FIELDS)
    image = png()
    assert echo_parameters("img2img", {"init_images": [image], "mask": image}) == expected
    kept = echo_parameters("img2img", {"init_images": [image], "include_init_images": True})
    assert kept["init_images"] == [image]


def test_the_echo_keeps_what_the_client_sent_not_the_resolved_values():
    echoed = echo_parameters("txt2img", {"seed": -1, "sampler_index": "Euler a", "user_id": "alice", "extra": 1})
    assert echoed["seed"] == -1 and echoed["sampler_name"] is None and echoed["sampler_index"] == "Euler a"
    assert "user_id" not in echoed and "extra" not in echoed


def test_defaults_map_to_a1111s_api_defaults(options: dict[str, Any]):
    request = build("txt2img", options)
    assert request.sampler_name == "Euler", "the API's default sampler is Euler, not the UI's"
    assert request.scheduler == "Automatic"
    assert (request.steps, request.cfg_scale, request.width, request.height) == (50, 7.0, 512, 512)
    assert (request.seed, request.batch_size, request.n_iter, request.denoising_strength) == (-1, 1, 1, None)
    assert request.checkpoint.startswith("tiny-sd1.safetensors [")
    assert request.vae is None and request.clip_skip == 1 and request.emphasis == "Original"
    assert request.preview_every_n_steps == 10 and request.enable_hr is False and request.hr_upscaler == "Latent"


def test_nulls_mean_the_defaults(options: dict[str, Any]):
    request = build("txt2img", options, steps=None, width=None, prompt=None, sampler_index=None, cfg_scale=None)
    assert (request.steps, request.width, request.prompt, request.sampler_name, request.cfg_scale) == (
        50, 512, "", "Euler", 7.0
    )  # fmt: skip


@pytest.mark.parametrize(
    ("field", "sent", "expected"),
    [
        ("steps", "20", 20),
        ("steps", 2.7, 2),
        ("steps", True, 1),
        ("width", "64", 64),
        ("cfg_scale", "7.5", 7.5),
        ("cfg_scale", 5, 5.0),
        ("restore_faces", "yes", True),
        ("restore_faces", "Off", False),
        ("tiling", 1, True),
        ("do_not_save_grid", 0, False),
        ("prompt", 5, "5"),
        ("prompt", 2.5, "2.5"),
        ("styles", ["a", 1], ["a", "1"]),
    ],
)
def test_it_coerces_like_pydantic_v1(field: str, sent: Any, expected: Any):
    echoed = echo_parameters("txt2img", {field: sent})
    assert echoed[field] == expected
    assert type(echoed[field]) is type(expected)


@pytest.mark.parametrize(
    ("field", "sent", "error_type"),
    [
        ("steps", "many", "type_error.integer"),
        ("steps", "2.5", "type_error.integer"),
        ("steps", [1], "type_error.integer"),
        ("cfg_scale", "high", "type_error.float"),
        ("cfg_scale", "nan", "value_error.float.not_finite"),
        ("restore_faces", "maybe", "type_error.bool"),
        ("restore_faces", 2, "type_error.bool"),
        ("prompt", ["a", "list"], "type_error.str"),
        ("override_settings", [1], "type_error.dict"),
        ("alwayson_scripts", "x", "type_error.dict"),
        ("script_args", "x", "type_error.list"),
    ],
)
def test_wrong_types_are_422s_naming_the_field(options: dict[str, Any], field: str, sent: Any, error_type: str):
    (entry,) = refused("txt2img", options, **{field: sent})
    assert entry["loc"] == ["body", field]
    assert entry["type"] == error_type


def test_a_wrong_list_item_is_located_by_its_index(options: dict[str, Any]):
    (entry,) = refused("txt2img", options, styles=["ok", {"no": 1}])
    assert entry == {"loc": ["body", "styles", 1], "msg": "str type expected", "type": "type_error.str"}


def test_webuiapis_full_txt2img_body_validates(options: dict[str, Any]):
    request = build_generation_request("txt2img", WEBUIAPI_TXT2IMG_BODY, options)
    assert request.sampler_name == "Euler a" and request.scheduler == "Automatic"
    assert request.steps == 20 and request.prompt == "a lighthouse" and request.eta == 1.0
    assert request.enable_hr is False and request.denoising_strength == 0.7
    assert echo_parameters("txt2img", WEBUIAPI_TXT2IMG_BODY)["hr_scale"] == 2.0


def test_unknown_fields_are_ignored(options: dict[str, Any]):
    assert build("txt2img", options, some_future_field={"x": 1}, steps=3).steps == 3


# ------------------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"width": 65}, "width"),
        ({"height": 100}, "height"),
        ({"width": 0}, "width"),
        ({"width": 32}, "width"),
        ({"width": 99999, "height": 99999}, "width"),
        ({"width": 2048, "height": 1024}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 9}, "batch_size"),
        ({"n_iter": 0}, "n_iter"),
        ({"n_iter": 101}, "n_iter"),
        ({"prompt": "x" * 10_001}, "prompt"),
        ({"negative_prompt": "x" * 10_001}, "negative_prompt"),
        ({"cfg_scale": 31}, "cfg_scale"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"denoising_strength": 1.5}, "denoising_strength"),
        ({"subseed_strength": -0.1}, "subseed_strength"),
        ({"seed": 2**64}, "seed"),
        ({"seed_resize_from_w": 4096, "seed_resize_from_h": 4096}, "seed_resize_from_w"),
        ({"enable_hr": True, "hr_scale": 4.0}, "hr_scale"),
        ({"enable_hr": True, "hr_resize_x": 4096, "hr_resize_y": 4096}, "hr_resize_x"),
        ({"enable_hr": True, "hr_second_pass_steps": 151}, "hr_second_pass_steps"),
    ],
)
def test_every_limit_is_a_422_naming_the_field(options: dict[str, Any], fields: dict[str, Any], named: str):
    errors = refused("txt2img", options, **fields)
    assert [entry["loc"] for entry in errors] == [["body", named]]


def test_limits_follow_the_settings(options: dict[str, Any], settings: Any):
    settings.SD_MAX_STEPS = 500
    settings.SD_MAX_PIXELS = 2048 * 2048
    assert build("txt2img", options, steps=500, width=2048, height=2048).steps == 500


def test_the_hires_fix_within_limits_maps_onto_the_request(options: dict[str, Any]):
    request = build("txt2img", options, enable_hr=True, hr_scale=1.5, hr_upscaler=None, width=512, height=512)
    assert request.enable_hr and request.hr_scale == 1.5 and request.hr_upscaler == "Latent"


def test_an_unknown_hires_upscaler_is_a_422_only_when_the_hires_fix_is_on(options: dict[str, Any]):
    assert build("txt2img", options, hr_upscaler="ESRGAN_4x").enable_hr is False
    with pytest.raises(InvalidInputError) as caught:
        build("txt2img", options, enable_hr=True, hr_upscaler="ESRGAN_4x")
    assert caught.value.field == "hr_upscaler"
    assert "Lanczos" in caught.value.valid_values and "Latent (bicubic)" in caught.value.valid_values


# --------------------------------------------------------------------------------------- samplers and models


@pytest.mark.parametrize(
    ("fields", "sampler", "scheduler"),
    [
        ({"sampler_name": "DPM++ 2M", "scheduler": "karras"}, "DPM++ 2M", "Automatic"),
        ({"sampler_name": "DPM++ 2M Karras"}, "DPM++ 2M", "Automatic"),
        ({"sampler_name": "Euler", "scheduler": "Karras"}, "Euler", "Karras"),
        ({"sampler_index": "Euler a"}, "Euler a", "Automatic"),
        ({"sampler_name": "DDIM", "sampler_index": "Euler a"}, "DDIM", "Automatic"),
        ({"sampler_name": "k_euler_a"}, "Euler a", "Automatic"),
        ({"scheduler": "automatic"}, "Euler", "Automatic"),
    ],
)
def test_samplers_and_schedulers_resolve_by_a1111_names(
    options: dict[str, Any], fields: dict[str, Any], sampler: str, scheduler: str
):
    request = build("txt2img", options, **fields)
    assert (request.sampler_name, request.scheduler) == (sampler, scheduler)


@pytest.mark.parametrize(
    ("fields", "named", "valid"),
    [
        ({"sampler_name": "Nope"}, "sampler_name", "Euler a"),
        ({"sampler_index": "Nope"}, "sampler_index", "Euler a"),
        ({"scheduler": "nope"}, "scheduler", "karras"),
    ],
)
def test_unknown_samplers_and_schedulers_are_422s_listing_valid_values(
    options: dict[str, Any], fields: dict[str, Any], named: str, valid: str
):
    with pytest.raises(UnknownSamplerError) as caught:
        build("txt2img", options, **fields)
    assert caught.value.field == named
    assert valid in caught.value.valid_values


def test_an_unknown_checkpoint_in_override_settings_is_a_422_naming_it(options: dict[str, Any]):
    with pytest.raises(InvalidInputError) as caught:
        build("txt2img", options, override_settings={"sd_model_checkpoint": "missing.safetensors"})
    assert caught.value.field == "override_settings.sd_model_checkpoint"
    assert any(title.startswith("tiny-sdxl.safetensors [") for title in caught.value.valid_values)


def test_the_model_comes_from_the_options_by_any_alias(options: dict[str, Any]):
    request = build("txt2img", {**options, "sd_model_checkpoint": "tiny-sdxl"})
    assert request.checkpoint.startswith("tiny-sdxl.safetensors [")
    with pytest.raises(InvalidInputError) as caught:
        build("txt2img", {**options, "sd_model_checkpoint": "gone.safetensors"})
    assert caught.value.field == "sd_model_checkpoint"


def test_scripts_are_refused_as_a1111_does(options: dict[str, Any]):
    assert build("txt2img", options, script_name="", alwayson_scripts={}, script_args=[]).steps == 50
    with pytest.raises(ScriptNotFoundError, match="Script 'x/y plot' not found"):
        build("txt2img", options, script_name="x/y plot")
    with pytest.raises(ScriptNotFoundError, match="always on script ControlNet not found"):
        build("txt2img", options, alwayson_scripts={"ControlNet": {"args": []}})


# ---------------------------------------------------------------------------------------- options -> request


def test_the_users_options_shape_the_request(options: dict[str, Any]):
    request = build("txt2img", {
        **options, "CLIP_stop_at_last_layers": 2, "sd_vae": "tiny-vae.safetensors", "emphasis": "No norm",
        "eta_noise_seed_delta": 31337, "show_progress_every_n_steps": 3, "add_model_hash_to_info": False,
    })  # fmt: skip
    assert request.clip_skip == 2 and request.vae == "tiny-vae.safetensors" and request.emphasis == "No norm"
    assert request.eta_noise_seed_delta == 31337 and request.preview_every_n_steps == 3
    assert request.add_model_hash_to_info is False
    assert build("txt2img", {**options, "live_previews_enable": False}).preview_every_n_steps == 0
    assert build("txt2img", {**options, "sd_vae": "None"}).vae is None


def test_eta_comes_from_the_request_else_from_the_option_that_applies(options: dict[str, Any]):
    assert build("txt2img", options, sampler_name="DDIM", eta=0.3).eta == 0.3
    assert build("txt2img", {**options, "eta_ddim": 0.2}, sampler_name="DDIM").eta == 0.2
    assert build("txt2img", {**options, "eta_ancestral": 0.9}, sampler_name="Euler a").eta == 0.9
    assert build("txt2img", options, sampler_name="Euler").eta is None


def test_infotext_fills_the_fields_the_client_left_out(options: dict[str, Any]):
    infotext = "a castle\nNegative prompt: fog\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, " \
               "Seed: 7, Size: 128x64"  # fmt: skip
    request = build("txt2img", options, infotext=infotext, steps=3)
    assert (request.prompt, request.negative_prompt, request.steps) == ("a castle", "fog", 3)
    assert (request.sampler_name, request.cfg_scale, request.seed) == ("DPM++ 2M", 5.5, 7)
    assert (request.width, request.height) == (128, 64)


# --------------------------------------------------------------------------------------------------- img2img


def test_img2img_decodes_images_and_maps_its_fields(options: dict[str, Any]):
    image, mask = png(), "data:image/png;base64," + png(color=(255, 255, 255))
    request = build("img2img", options, init_images=[image], mask=mask, mask_blur=9, width=64, height=64,
                    inpainting_fill=1, resize_mode="2")  # fmt: skip
    assert request.init_images[0].size == (64, 64) and request.mask is not None
    assert (request.mask_blur_x, request.mask_blur_y) == (9, 9)
    assert request.denoising_strength == 0.75 and request.resize_mode == 2 and request.inpainting_fill == 1
    assert request.inpaint_full_res is True and request.initial_noise_multiplier == 1.0


def test_img2img_with_k_images_makes_a_batch_of_k(options: dict[str, Any]):
    request = build("img2img", options, init_images=[png(), png(), png()], batch_size=4)
    assert request.batch_size == 3
    assert build("img2img", options, init_images=[png()], batch_size=4).batch_size == 4


def test_img2img_without_init_images_is_a1111s_404(options: dict[str, Any]):
    with pytest.raises(InitImageNotFoundError):
        build("img2img", options)
    with pytest.raises(InitImageNotFoundError):
        build("img2img", options, init_images=None)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"init_images": []}, "init_images"),
        ({"init_images": ["x"] * 3, "batch_size": 2}, "init_images"),
        ({"init_images": ["x"], "mask_blur": 65}, "mask_blur"),
        ({"init_images": ["x"], "inpainting_fill": 4}, "inpainting_fill"),
        ({"init_images": ["x"], "resize_mode": 7}, "resize_mode"),
    ],
)
def test_img2img_limits_are_422s_naming_the_field(options: dict[str, Any], fields: dict[str, Any], named: str):
    assert [entry["loc"] for entry in refused("img2img", options, **fields)] == [["body", named]]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"init_images": ["not base64 !!"]}, "init_images[0]"),
        ({"init_images": [png(), base64.b64encode(b"not an image").decode()], "batch_size": 2}, "init_images[1]"),
        ({"init_images": ["http://example.com/a.png"]}, "init_images[0]"),
        ({"init_images": [png((2048, 2048))]}, "init_images[0]"),
        ({"init_images": [png()], "mask": "file:///etc/passwd"}, "mask"),
    ],
)
def test_bad_images_are_refused_naming_the_image(options: dict[str, Any], fields: dict[str, Any], named: str):
    with pytest.raises(InvalidInputError) as caught:
        build("img2img", options, **fields)
    assert caught.value.field == named
    assert named.split("[")[0] in caught.value.message


def test_it_refuses_a_body_that_is_not_an_object(options: dict[str, Any]):
    from gpu_node.errors import RequestValidationError

    with pytest.raises(RequestValidationError) as caught:
        build_generation_request("txt2img", [1, 2], options)  # type: ignore[arg-type]
    assert caught.value.errors == [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
