"""The node API's request validation: A1111's txt2img/img2img/png-info fields with A1111's names, defaults and pydantic
v1 coercion, the node's limits, and the mapping of a validated request plus a user's options onto sd_core's
GenerationRequest. Unknown fields are ignored, like A1111."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, cast

from django.conf import settings
from django.http import QueryDict
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from PIL import Image
from rest_framework import serializers
from rest_framework.request import Request

from gpu_node.errors import InitImageNotFoundError, RequestValidationError, ScriptNotFoundError
from sd_core.checkpoints import CheckpointRegistry
from sd_core.errors import InvalidInputError
from sd_core.generate import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS, hires_size
from sd_core.images import decode_base64_image
from sd_core.infotext import parse_infotext
from sd_core.samplers import ResolvedSampler, resolve_sampler
from sd_core.types import GenerationRequest

MAX_PROMPT_LENGTH = 10_000
MAX_N_ITER = 100
MIN_SIZE = 64
MAX_CFG_SCALE = 30.0
MAX_SEED = 2**63 - 1
MAX_MASK_BLUR = 64
MAX_INPAINT_PADDING = 256
DEFAULT_HR_UPSCALER = "Latent"
IMG2IMG_DENOISING_STRENGTH = 0.75

_DATA_URL_PREFIX = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


def _registry() -> CheckpointRegistry:
    # Imported here: gpu_node.runtime imports the worker, which imports this module.
    from gpu_node.runtime import get_engine

    return get_engine().registry


# ---------------------------------------------------------------------------------------- pydantic v1 fields


class A1111Field(serializers.Field):
    """A field of A1111's generated request models: optional, null accepted, coerced the way pydantic v1 does, and
    failing with pydantic's messages and error types (the codes are FastAPI's `type` values)."""

    default_error_messages = {
        "required": "field required",
        "null": "none is not an allowed value",
        "value_error.number.not_ge": "ensure this value is greater than or equal to {limit_value}",
        "value_error.number.not_le": "ensure this value is less than or equal to {limit_value}",
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_null", True)
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)

    def to_representation(self, value: Any) -> Any:
        return value


class _NumberField(A1111Field):
    def __init__(self, *, min_value: float | None = None, max_value: float | None = None, **kwargs: Any) -> None:
        self.min_value, self.max_value = min_value, max_value
        super().__init__(**kwargs)

    def bounded(self, value: Any) -> Any:
        if self.min_value is not None and value < self.min_value:
            self.fail("value_error.number.not_ge", limit_value=self.min_value)
        if self.max_value is not None and value > self.max_value:
            self.fail("value_error.number.not_le", limit_value=self.max_value)
        return value


@extend_schema_field(OpenApiTypes.INT)
class A1111IntegerField(_NumberField):
    """pydantic v1 `int`: 2.7 -> 2 (truncated), "64" -> 64, true -> 1."""

    default_error_messages = {"type_error.integer": "value is not a valid integer"}

    def to_internal_value(self, data: Any) -> int:
        try:
            value = int(data)
        except (TypeError, ValueError, OverflowError):
            self.fail("type_error.integer")
        return int(self.bounded(value))


@extend_schema_field(OpenApiTypes.FLOAT)
class A1111FloatField(_NumberField):
    """pydantic v1 `float`: "7.5" -> 7.5; NaN and infinities are refused (they are not JSON)."""

    default_error_messages = {
        "type_error.float": "value is not a valid float",
        "value_error.float.not_finite": "ensure this value is a finite number",
    }

    def to_internal_value(self, data: Any) -> float:
        try:
            value = float(data)
        except (TypeError, ValueError, OverflowError):
            self.fail("type_error.float")
        if not math.isfinite(value):
            self.fail("value_error.float.not_finite")
        return float(self.bounded(value))


@extend_schema_field(OpenApiTypes.BOOL)
class A1111BooleanField(A1111Field):
    """pydantic v1 `bool`: 1/0, "yes"/"no", "true"/"false", "on"/"off", "t"/"f", "y"/"n", "1"/"0"."""

    default_error_messages = {"type_error.bool": "value could not be parsed to a boolean"}
    TRUE: ClassVar[frozenset[object]] = frozenset({1, "1", "on", "t", "true", "y", "yes"})
    FALSE: ClassVar[frozenset[object]] = frozenset({0, "0", "off", "f", "false", "n", "no"})

    def to_internal_value(self, data: Any) -> bool:
        if data is True or data is False:
            return data
        value = data.lower() if isinstance(data, str) else data
        try:
            if value in self.TRUE:
                return True
            if value in self.FALSE:
                return False
        except TypeError:
            pass
        self.fail("type_error.bool")


@extend_schema_field(OpenApiTypes.STR)
class A1111StringField(A1111Field):
    """pydantic v1 `str`: numbers become their text, lists and objects are refused."""

    default_error_messages = {
        "type_error.str": "str type expected",
        "value_error.any_str.max_length": "ensure this value has at most {limit_value} characters",
    }

    def __init__(self, *, max_length: int | None = None, **kwargs: Any) -> None:
        self.max_length = max_length
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, str):
            value = data
        elif isinstance(data, int | float):
            value = str(data)
        else:
            self.fail("type_error.str")
        if self.max_length is not None and len(value) > self.max_length:
            self.fail("value_error.any_str.max_length", limit_value=self.max_length)
        return value


@extend_schema_field(OpenApiTypes.OBJECT)
class A1111DictField(A1111Field):
    default_error_messages = {"type_error.dict": "value is not a valid dict"}

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.fail("type_error.dict")
        return dict(data)


@extend_schema_field({"type": "array", "items": {}})
class A1111ListField(A1111Field):
    """pydantic v1 `list` (items as they come) or `list[<child>]` (each item validated, errors located by index)."""

    default_error_messages = {"type_error.list": "value is not a valid list"}

    def __init__(self, *, child: serializers.Field | None = None, **kwargs: Any) -> None:
        self.child = child
        super().__init__(**kwargs)
        if child is not None:
            child.bind(field_name="", parent=cast(Any, self))

    def to_internal_value(self, data: Any) -> list[Any]:
        if not isinstance(data, list):
            self.fail("type_error.list")
        if self.child is None:
            return list(data)
        values: list[Any] = []
        errors: dict[int, Any] = {}
        for index, item in enumerate(data):
            try:
                values.append(self.child.run_validation(item))
            except serializers.ValidationError as error:
                errors[index] = error.detail
        if errors:
            raise serializers.ValidationError(cast(Any, errors))
        return values


def _prompt_field() -> A1111StringField:
    return A1111StringField(default="", max_length=MAX_PROMPT_LENGTH)


def _invalid(field: str, message: str) -> serializers.ValidationError:
    return serializers.ValidationError({field: [message]})


# ----------------------------------------------------------------------------------------------- the body


def request_body(request: Request) -> dict[str, Any]:
    """The JSON object a POST must carry, or FastAPI's 422: no body -> "field required", a list/form -> not a dict."""
    data = request.data
    if not data and (request.stream is None or isinstance(data, QueryDict)):
        raise RequestValidationError.body_missing()
    if isinstance(data, QueryDict) or not isinstance(data, dict):
        raise RequestValidationError.not_a_dict()
    return data


# ----------------------------------------------------------------------------------------- txt2img / img2img


class GenerationRequestSerializer(serializers.Serializer):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing and API extras), with A1111's API
    defaults. `validated_data` keeps A1111's values (null stays null); `build()` resolves them into a
    GenerationRequest."""

    prompt = _prompt_field()
    negative_prompt = _prompt_field()
    styles = A1111ListField(child=A1111StringField(allow_null=False), default=None)
    seed = A1111IntegerField(default=-1, max_value=MAX_SEED)
    subseed = A1111IntegerField(default=-1, max_value=MAX_SEED)
    subseed_strength = A1111FloatField(default=0.0, min_value=0.0, max_value=1.0)
    seed_resize_from_h = A1111IntegerField(default=-1)
    seed_resize_from_w = A1111IntegerField(default=-1)
    sampler_name = A1111StringField(default=None)
    scheduler = A1111StringField(default=None)
    batch_size = A1111IntegerField(default=1)
    n_iter = A1111IntegerField(default=1, min_value=1, max_value=MAX_N_ITER)
    steps = A1111IntegerField(default=50)
    cfg_scale = A1111FloatField(default=7.0, min_value=0.0, max_value=MAX_CFG_SCALE)
    width = A1111IntegerField(default=512)
    height = A1111IntegerField(default=512)
    restore_faces = A1111BooleanField(default=None)
    tiling = A1111BooleanField(default=None)
    do_not_save_samples = A1111BooleanField(default=False)
    do_not_save_grid = A1111BooleanField(default=False)
    eta = A1111FloatField(default=None, min_value=0.0, max_value=1.0)
    denoising_strength = A1111FloatField(default=None, min_value=0.0, max_value=1.0)
    s_min_uncond = A1111FloatField(default=None)
    s_churn = A1111FloatField(default=None)
    s_tmax = A1111FloatField(default=None)
    s_tmin = A1111FloatField(default=None)
    s_noise = A1111FloatField(default=None)
    override_settings = A1111DictField(default=None)
    override_settings_restore_afterwards = A1111BooleanField(default=True)
    refiner_checkpoint = A1111StringField(default=None)
    refiner_switch_at = A1111FloatField(default=None, min_value=0.0, max_value=1.0)
    disable_extra_networks = A1111BooleanField(default=False)
    firstpass_image = A1111StringField(default=None)
    comments = A1111DictField(default=None)
    sampler_index = A1111StringField(default="Euler")
    script_name = A1111StringField(default=None)
    script_args = A1111ListField(default=list)
    send_images = A1111BooleanField(default=True)
    save_images = A1111BooleanField(default=False)
    alwayson_scripts = A1111DictField(default=dict)
    force_task_id = A1111StringField(default=None)
    infotext = A1111StringField(default=None)
    user_id = A1111StringField(required=False, help_text="open mode: the user (X-User-Id wins); not echoed")

    NOT_ECHOED: ClassVar[frozenset[str]] = frozenset({"user_id"})

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(cls().fields)

    # -------------------------------------------------------------------------------------------- validation
    def value(self, attrs: Mapping[str, Any], name: str) -> Any:
        """The field's value, or A1111's default where the client sent null."""
        value = attrs.get(name)
        if value is None:
            default = self.fields[name].default
            return default() if callable(default) else default
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        self.check_scripts(attrs)
        width, height = self.value(attrs, "width"), self.value(attrs, "height")
        check_size(width, height, fields=("width", "height"))
        steps = self.value(attrs, "steps")
        if not 1 <= steps <= settings.SD_MAX_STEPS:
            raise _invalid("steps", f"steps must be between 1 and {settings.SD_MAX_STEPS} (SD_MAX_STEPS); got {steps}")
        batch_size = self.value(attrs, "batch_size")
        if not 1 <= batch_size <= settings.SD_MAX_BATCH:
            raise _invalid(
                "batch_size",
                f"batch_size must be between 1 and {settings.SD_MAX_BATCH} (SD_MAX_BATCH); got {batch_size}; "
                "use n_iter for more images",
            )
        seed_w, seed_h = self.value(attrs, "seed_resize_from_w"), self.value(attrs, "seed_resize_from_h")
        if seed_w > 0 and seed_h > 0 and seed_w * seed_h > settings.SD_MAX_PIXELS:
            raise _invalid("seed_resize_from_w", f"seed_resize_from {seed_w}x{seed_h} exceeds SD_MAX_PIXELS")
        self.sampler_of(attrs)
        checkpoint = (attrs.get("override_settings") or {}).get("sd_model_checkpoint")
        if checkpoint is not None:
            _registry().resolve(str(checkpoint), field="override_settings.sd_model_checkpoint")
        return attrs

    def check_scripts(self, attrs: Mapping[str, Any]) -> None:
        """The node has no scripts: a selectable script or an always-on one is A1111's 422 "not found"."""
        script_name = attrs.get("script_name")
        if script_name:
            raise ScriptNotFoundError(f"Script '{script_name}' not found")
        for name in attrs.get("alwayson_scripts") or {}:
            raise ScriptNotFoundError(f"always on script {name} not found")

    def sampler_of(self, attrs: Mapping[str, Any]) -> ResolvedSampler:
        """`sampler_name or sampler_index or "Euler"` with `scheduler` (name or label); unknown names are a 422."""
        return resolve_sampler(
            attrs.get("sampler_name"), attrs.get("scheduler"), sampler_index=attrs.get("sampler_index")
        )

    # ------------------------------------------------------------------------------------------------ mapping
    def echo(self) -> dict[str, Any]:
        """A1111's `parameters`: the request with every default filled in, not the resolved values."""
        data = self.to_internal_value(self.initial_data)
        return {name: value for name, value in data.items() if name not in self.NOT_ECHOED}

    def build(self, options: Mapping[str, Any]) -> GenerationRequest:
        """The validated request as sd_core runs it, under the user's effective options (`options.effective_options`:
        the model, VAE, clip skip, emphasis, ENSD, previews, infotext switches)."""
        attrs = self.validated_data
        resolved = self.sampler_of(attrs)
        eta = self.value(attrs, "eta")
        if eta is None and resolved.sampler.name == "DDIM":
            eta = float(options.get("eta_ddim") or 0.0)
        elif eta is None and resolved.sampler.options.get("uses_ensd"):
            eta = float(options.get("eta_ancestral", 1.0))
        previews = int(options.get("show_progress_every_n_steps") or 0) if options.get("live_previews_enable") else 0
        fields: dict[str, Any] = dict(
            checkpoint=_checkpoint_title(options),
            vae=_vae_name(options),
            prompt=self.value(attrs, "prompt"),
            negative_prompt=self.value(attrs, "negative_prompt"),
            sampler_name=resolved.sampler.name,
            scheduler=resolved.schedule.label,
            steps=self.value(attrs, "steps"),
            cfg_scale=self.value(attrs, "cfg_scale"),
            width=self.value(attrs, "width"),
            height=self.value(attrs, "height"),
            seed=self.value(attrs, "seed"),
            subseed=self.value(attrs, "subseed"),
            subseed_strength=self.value(attrs, "subseed_strength"),
            seed_resize_from_w=self.value(attrs, "seed_resize_from_w"),
            seed_resize_from_h=self.value(attrs, "seed_resize_from_h"),
            batch_size=self.value(attrs, "batch_size"),
            n_iter=self.value(attrs, "n_iter"),
            clip_skip=int(options.get("CLIP_stop_at_last_layers") or 1),
            eta=eta,
            disable_extra_networks=self.value(attrs, "disable_extra_networks"),
            emphasis=str(options.get("emphasis") or "Original"),
            eta_noise_seed_delta=int(options.get("eta_noise_seed_delta") or 0),
            preview_every_n_steps=max(previews, 0),
            img2img_fix_steps=bool(options.get("img2img_fix_steps")),
            add_model_hash_to_info=bool(options.get("add_model_hash_to_info", True)),
            add_model_name_to_info=bool(options.get("add_model_name_to_info", True)),
            add_version_to_infotext=bool(options.get("add_version_to_infotext", True)),
        )
        fields.update(self.mode_fields(attrs, options))
        return GenerationRequest(**fields)

    def mode_fields(self, attrs: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        """GenerationRequest fields only one kind of request has."""
        return {}


class Txt2ImgRequestSerializer(GenerationRequestSerializer):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI); hires fix fields included."""

    enable_hr = A1111BooleanField(default=False)
    firstphase_width = A1111IntegerField(default=0)
    firstphase_height = A1111IntegerField(default=0)
    hr_scale = A1111FloatField(default=2.0, min_value=0.0)
    hr_upscaler = A1111StringField(default=None)
    hr_second_pass_steps = A1111IntegerField(default=0, min_value=0)
    hr_resize_x = A1111IntegerField(default=0, min_value=0)
    hr_resize_y = A1111IntegerField(default=0, min_value=0)
    hr_checkpoint_name = A1111StringField(default=None)
    hr_sampler_name = A1111StringField(default=None)
    hr_scheduler = A1111StringField(default=None)
    hr_prompt = _prompt_field()
    hr_negative_prompt = _prompt_field()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if self.value(attrs, "enable_hr"):
            self.check_hires(attrs)
        return attrs

    def check_hires(self, attrs: Mapping[str, Any]) -> None:
        upscaler = attrs.get("hr_upscaler") or DEFAULT_HR_UPSCALER
        if upscaler not in LATENT_UPSCALE_MODES and upscaler not in PIXEL_UPSCALERS:
            raise InvalidInputError(
                "hr_upscaler",
                f"unknown upscaler '{upscaler}'",
                valid_values=[*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS],
            )
        second_pass_steps = self.value(attrs, "hr_second_pass_steps")
        if second_pass_steps > settings.SD_MAX_STEPS:
            raise _invalid("hr_second_pass_steps", f"hr_second_pass_steps must be at most {settings.SD_MAX_STEPS}")
        target = GenerationRequest(
            checkpoint="",
            width=self.value(attrs, "width"),
            height=self.value(attrs, "height"),
            hr_scale=self.value(attrs, "hr_scale"),
            hr_resize_x=self.value(attrs, "hr_resize_x"),
            hr_resize_y=self.value(attrs, "hr_resize_y"),
        )
        field = "hr_resize_x" if target.hr_resize_x or target.hr_resize_y else "hr_scale"
        width, height = hires_size(target)
        check_size(width, height, fields=(field, field), what="the hires fix size")

    def mode_fields(self, attrs: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "denoising_strength": attrs.get("denoising_strength"),
            "enable_hr": self.value(attrs, "enable_hr"),
            "hr_scale": self.value(attrs, "hr_scale"),
            "hr_upscaler": attrs.get("hr_upscaler") or DEFAULT_HR_UPSCALER,
            "hr_second_pass_steps": self.value(attrs, "hr_second_pass_steps"),
            "hr_resize_x": self.value(attrs, "hr_resize_x"),
            "hr_resize_y": self.value(attrs, "hr_resize_y"),
            "hr_prompt": self.value(attrs, "hr_prompt"),
            "hr_negative_prompt": self.value(attrs, "hr_negative_prompt"),
        }


class Img2ImgRequestSerializer(GenerationRequestSerializer):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionImg2ImgProcessingAPI). Images are base64 or data URLs; after
    validation `init_images` holds the decoded images and `mask` the decoded mask."""

    init_images = A1111ListField(default=None)
    resize_mode = A1111IntegerField(default=0, min_value=0, max_value=3)
    denoising_strength = A1111FloatField(default=IMG2IMG_DENOISING_STRENGTH, min_value=0.0, max_value=1.0)
    image_cfg_scale = A1111FloatField(default=None, min_value=0.0, max_value=MAX_CFG_SCALE)
    mask = A1111StringField(default=None)
    mask_blur_x = A1111IntegerField(default=4, min_value=0, max_value=MAX_MASK_BLUR)
    mask_blur_y = A1111IntegerField(default=4, min_value=0, max_value=MAX_MASK_BLUR)
    mask_blur = A1111IntegerField(default=None, min_value=0, max_value=MAX_MASK_BLUR)
    mask_round = A1111BooleanField(default=True)
    inpainting_fill = A1111IntegerField(default=0, min_value=0, max_value=3)
    inpaint_full_res = A1111BooleanField(default=True)
    inpaint_full_res_padding = A1111IntegerField(default=0, min_value=0, max_value=MAX_INPAINT_PADDING)
    inpainting_mask_invert = A1111IntegerField(default=0, min_value=0, max_value=1)
    initial_noise_multiplier = A1111FloatField(default=None, min_value=0.0, max_value=2.0)
    latent_mask = A1111StringField(default=None)
    include_init_images = A1111BooleanField(default=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("init_images") is None:
            raise InitImageNotFoundError()
        attrs = super().validate(attrs)
        count, batch_size = len(attrs["init_images"]), self.value(attrs, "batch_size")
        if count == 0:
            raise _invalid("init_images", "init_images holds no image; send at least one base64 image")
        if count > batch_size:
            raise _invalid("init_images", f"{count} init images but batch_size is {batch_size}; send at most that many")
        attrs["init_images"] = tuple(
            decode_image(data, field=f"init_images[{index}]") for index, data in enumerate(attrs["init_images"])
        )
        if attrs.get("mask"):
            attrs["mask"] = decode_image(attrs["mask"], field="mask")
        return attrs

    def echo(self) -> dict[str, Any]:
        echoed = super().echo()
        if not echoed.get("include_init_images"):
            echoed["init_images"], echoed["mask"] = None, None
        return echoed

    def mode_fields(self, attrs: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        images: tuple[Image.Image, ...] = attrs["init_images"]
        blur = attrs.get("mask_blur")
        noise = attrs.get("initial_noise_multiplier")
        batch_size = self.value(attrs, "batch_size")
        return {
            "init_images": images,
            "mask": attrs.get("mask") or None,
            # A1111: k init images (1 < k <= batch_size) make a batch of k, one image each.
            "batch_size": len(images) if 1 < len(images) < batch_size else batch_size,
            "denoising_strength": self.value(attrs, "denoising_strength"),
            "resize_mode": self.value(attrs, "resize_mode"),
            "mask_blur_x": blur if blur is not None else self.value(attrs, "mask_blur_x"),
            "mask_blur_y": blur if blur is not None else self.value(attrs, "mask_blur_y"),
            "inpainting_fill": self.value(attrs, "inpainting_fill"),
            "inpaint_full_res": self.value(attrs, "inpaint_full_res"),
            "inpaint_full_res_padding": self.value(attrs, "inpaint_full_res_padding"),
            "inpainting_mask_invert": self.value(attrs, "inpainting_mask_invert"),
            "initial_noise_multiplier": float(
                noise if noise is not None else options.get("initial_noise_multiplier", 1.0)
            ),
        }


GENERATION_SERIALIZERS: dict[str, type[GenerationRequestSerializer]] = {
    "txt2img": Txt2ImgRequestSerializer,
    "img2img": Img2ImgRequestSerializer,
}


def check_size(width: int, height: int, *, fields: tuple[str, str], what: str = "the image size") -> None:
    """Width and height: multiples of 8, at least MIN_SIZE, and at most SD_MAX_PIXELS together."""
    for field, value in zip(fields, (width, height), strict=True):
        if value % 8 or value < MIN_SIZE:
            raise _invalid(
                field, f"{field} must be a multiple of 8 and at least {MIN_SIZE}; {what} is {width}x{height}"
            )
    if width * height > settings.SD_MAX_PIXELS:
        raise _invalid(
            fields[0],
            f"{what} {width}x{height} is {width * height} pixels; this node allows at most "
            f"{settings.SD_MAX_PIXELS} (SD_MAX_PIXELS)",
        )


def decode_image(data: Any, *, field: str) -> Image.Image:
    """A request image (raw base64 or a data URL; never a URL to fetch) within the node's byte and pixel limits."""
    return decode_base64_image(
        data, field=field, max_bytes=settings.SD_MAX_IMAGE_BYTES, max_pixels=settings.SD_MAX_PIXELS
    )


def _checkpoint_title(options: Mapping[str, Any]) -> str:
    name = options.get("sd_model_checkpoint")
    if not name:
        titles = [info.title for info in _registry().checkpoints()]
        raise InvalidInputError(
            "sd_model_checkpoint", "no checkpoint chosen and none in the models folder", valid_values=titles
        )
    return _registry().resolve(str(name), field="sd_model_checkpoint").title


def _vae_name(options: Mapping[str, Any]) -> str | None:
    vae = _registry().resolve_vae(str(options.get("sd_vae") or "Automatic"), field="sd_vae")
    return vae.name if vae is not None else None


# ---------------------------------------------------------------------------------------------- infotext


# A1111's paste fields that its API fills from `infotext` (request field <- parsed infotext key).
_INFOTEXT_FIELDS: dict[str, str] = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "steps": "Steps",
    "sampler_name": "Sampler",
    "scheduler": "Schedule type",
    "cfg_scale": "CFG scale",
    "seed": "Seed",
    "width": "Size-1",
    "height": "Size-2",
    "batch_size": "Batch size",
    "subseed": "Variation seed",
    "subseed_strength": "Variation seed strength",
    "seed_resize_from_w": "Seed resize from-1",
    "seed_resize_from_h": "Seed resize from-2",
    "denoising_strength": "Denoising strength",
    "hr_scale": "Hires upscale",
    "hr_upscaler": "Hires upscaler",
    "hr_second_pass_steps": "Hires steps",
    "hr_resize_x": "Hires resize-1",
    "hr_resize_y": "Hires resize-2",
    "hr_prompt": "Hires prompt",
    "hr_negative_prompt": "Hires negative prompt",
    "mask_blur": "Mask blur",
}


def apply_infotext(payload: Mapping[str, Any], field_names: Callable[[], frozenset[str]]) -> dict[str, Any]:
    """A1111's `infotext` request field: every field the client did not set is taken from the infotext."""
    body = dict(payload)
    infotext = body.get("infotext")
    if not isinstance(infotext, str) or not infotext.strip():
        return body
    params = parse_infotext(infotext)
    fields = field_names()
    for name, key in _INFOTEXT_FIELDS.items():
        if name in fields and name not in body and params.get(key) is not None:
            body[name] = params[key]
    if "enable_hr" in fields and "enable_hr" not in body:
        body["enable_hr"] = "Denoising strength" in params and ("Hires upscale" in params or "Hires upscaler" in params)
    return body


# ----------------------------------------------------------------------------------------------- entry points


def _generation_serializer(kind: str, payload: Any) -> GenerationRequestSerializer:
    serializer_class = GENERATION_SERIALIZERS.get(str(kind))
    if serializer_class is None:
        raise ValueError(f"unknown generation kind {kind!r}; expected one of {', '.join(GENERATION_SERIALIZERS)}")
    if not isinstance(payload, Mapping):
        raise RequestValidationError.not_a_dict()
    return serializer_class(data=apply_infotext(payload, serializer_class.field_names))


def build_generation_request(kind: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> GenerationRequest:
    """Validate an A1111 txt2img/img2img body (DRF ValidationError, sd_core InvalidInputError or an A1111 error when
    it is not valid) and resolve it, under the user's effective options, into the request sd_core runs."""
    serializer = _generation_serializer(kind, payload)
    serializer.is_valid(raise_exception=True)
    return serializer.build(options)


def echo_parameters(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's `parameters` of a response: the request with A1111's defaults filled in (img2img: the images only
    with include_init_images). Call it on a payload that validated."""
    return _generation_serializer(kind, payload).echo()


# ---------------------------------------------------------------------------------------------------- png-info


class PngInfoRequestSerializer(serializers.Serializer):
    """POST /sdapi/v1/png-info `{"image": <base64 or data URL>}`; validated `image` is the file's bytes (None for
    an empty string, which A1111 answers with an empty info)."""

    image = A1111StringField(required=True, allow_null=False)

    def validate_image(self, value: str) -> bytes | None:
        if not value.strip():
            return None
        decode_image(value, field="image")
        return _base64_bytes(value)


def _base64_bytes(data: str) -> bytes:
    """The bytes of a base64 image that decode_image accepted."""
    payload = _WHITESPACE.sub("", _DATA_URL_PREFIX.sub("", data.strip(), count=1)).rstrip("=")
    return base64.b64decode(payload + "=" * (-len(payload) % 4))
