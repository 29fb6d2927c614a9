"""A1111's infotext: the "parameters" text that describes a generated image, its parser (png-info, `infotext=`),
and image encoding with the infotext embedded (PNG text chunk, or EXIF UserComment for JPEG and WEBP).
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import ExifTags, Image, PngImagePlugin

from sd_core.errors import InvalidInputError

INFOTEXT_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
"""The keys that open the params line, in A1111's order; any other key follows in insertion order."""

INFOTEXT_TRAILING_KEYS: tuple[str, ...] = ("Version", "User")
"""The keys that close the params line, after every other key."""

IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")

PARAMETERS_KEY = "parameters"

IGNORED_INFO_KEYS = frozenset(
    {
        "jfif",
        "jfif_version",
        "jfif_unit",
        "jfif_density",
        "dpi",
        "exif",
        "loop",
        "background",
        "timestamp",
        "duration",
        "progressive",
        "progression",
        "icc_profile",
        "chromaticity",
        "photoshop",
        PARAMETERS_KEY,
    }
)
"""Pillow `image.info` entries that png-info leaves out of `items` (A1111's IGNORED_INFO_KEYS)."""

_PARAM_RE = re.compile(r"\s*(\w[\w \-/]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)")
_IMAGE_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_MIN_PARAMS_ON_LAST_LINE = 3
_NEGATIVE_PROMPT_PREFIX = "Negative prompt:"

_ATTENTION_RE = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND_BRACKET_MULTIPLIER = 1.1
_SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

_HIRES_AND_INPAINT_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_SAMPLING_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)
_OLD_HIRES_FIX_PIXELS = 512 * 512

_VERSION_RE = re.compile(
    r"v?(\d+(?:\.\d+)*)"
    r"(?:[-_.]?(a|alpha|b|beta|c|rc|pre|preview)[-_.]?(\d*))?"
    r"(?:-(\d+)|[-_.]?(?:post|rev|r)[-_.]?(\d*))?",
    re.IGNORECASE,
)
_PRE_RELEASE_RANKS = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}
_FINAL_RELEASE_RANK = 3
_GIT_DESCRIBE_RE = re.compile(r"([^-]+-[^-]+)-.*")

_EXIF_USER_COMMENT_PREFIXES = {
    b"ASCII\x00\x00\x00": "ascii",
    b"JIS\x00\x00\x00\x00\x00": "shift_jis",
    b"UNICODE\x00": "utf_16_be",
}
_EXIF_UNICODE_PREFIX = b"UNICODE\x00"
_EXIF_PREFIX_SIZE = 8
_TIFF_LONG = 4
_TIFF_UNDEFINED = 7

_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_I16_TO_8BIT = 255 / 65535

# Aliases of A1111 v1.10 samplers (its `samplers_map`), for the sampler names NovelAI writes in its metadata.
_SAMPLER_ALIASES: dict[str, str] = {
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "k_dpmpp_2s_a": "DPM++ 2S a",
    "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
    "k_dpm_fast": "DPM fast",
    "k_dpm_ad": "DPM adaptive",
    "ddim": "DDIM",
    "plms": "PLMS",
    "unipc": "UniPC",
}
_NOVELAI_SAMPLERS = {**{name.lower(): name for name in _SAMPLER_ALIASES.values()}, **_SAMPLER_ALIASES}
_NOVELAI_DEFAULT_SAMPLER = "Euler a"


@dataclass(frozen=True, kw_only=True)
class ImageMetadata:
    """What png-info reports about an image: its infotext ("" when none) and its other text entries."""

    infotext: str
    items: dict[str, str]


def quote(value: object) -> str:
    """A1111's `infotext_utils.quote`: a value holding `,`, `:` or a newline is written as a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_infotext(*, prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """A1111's `create_infotext` layout: the prompt, a `Negative prompt:` line when there is one, the params line.

    The params line lists INFOTEXT_KEY_ORDER keys first, then the other keys in `params` order, then
    INFOTEXT_TRAILING_KEYS; None values are dropped, and a value equal to its key is written as the bare key.
    """
    ordered = {key: params[key] for key in INFOTEXT_KEY_ORDER if key in params}
    ordered.update((key, value) for key, value in params.items() if key not in ordered)
    for key in INFOTEXT_TRAILING_KEYS:
        if key in ordered:
            ordered[key] = ordered.pop(key)
    params_line = ", ".join(
        key if key == value else f"{key}: {quote(value)}" for key, value in ordered.items() if value is not None
    )
    negative_line = f"\n{_NEGATIVE_PROMPT_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_line}\n{params_line}".strip()


def parse_infotext(text: str) -> dict[str, object]:
    """A1111's `parse_generation_parameters`, as png-info returns it under `parameters`.

    1. The last line is the params line only when it holds at least 3 `key: value` pairs.
    2. Lines before `Negative prompt:` are the prompt, the rest the negative prompt (both may span lines).
    3. Params keep their text; quoted values are unquoted; `WxH` values become `<key>-1` and `<key>-2`.
    4. A1111's defaults fill what the infotext leaves out, and old Versions get their backward-compatibility flags.
    """
    prompt, negative_prompt, params_line = _split_infotext(text)
    parsed = _parse_params_line(params_line)
    parsed["Prompt"] = prompt
    parsed["Negative prompt"] = negative_prompt
    _add_defaults(parsed, prompt=prompt, negative_prompt=negative_prompt)
    _add_version_backcompat_flags(parsed)
    return parsed


def encode_image(
    image: Image.Image, *, infotext: str | None, image_format: str = "png", jpeg_quality: int = 80
) -> bytes:
    """Encode `image` as A1111's API does (`encode_pil_to_base64`, before base64).

    PNG carries every str entry of `image.info` as a text chunk, with `parameters` set to `infotext` when given
    (Pillow writes iTXt for text that is not latin-1). JPEG and WEBP carry the infotext as an EXIF UserComment.
    """
    normalized_format = image_format.lower()
    if normalized_format == "png":
        return _encode_png(image, infotext)
    if normalized_format in ("jpg", "jpeg", "webp"):
        pillow_format = "WEBP" if normalized_format == "webp" else "JPEG"
        return _encode_with_exif_comment(image, infotext, pillow_format, jpeg_quality)
    message = f"Unknown image format {image_format!r}; choose another samples_format"
    raise InvalidInputError("samples_format", message, valid_values=IMAGE_FORMATS)


def read_image_metadata(data: bytes) -> ImageMetadata:
    """A1111's `read_info_from_image` on encoded image bytes: the `parameters` text chunk, or the EXIF
    UserComment (JPEG, WEBP), or the GIF comment; NovelAI metadata is converted to an infotext. `items` keeps
    only the str entries of `image.info` (A1111 also passes numbers and bytes through)."""
    with _open_image(data) as image:
        info = dict(image.info)
        user_comment = _read_exif_user_comment(image) if "exif" in info else None
        size = image.size
    infotext = info.get(PARAMETERS_KEY)
    if "exif" in info:
        infotext = user_comment or infotext
    elif "comment" in info:
        comment = info["comment"]
        infotext = comment.decode("utf8", errors="ignore") if isinstance(comment, bytes) else comment
    items = {
        key: value
        for key, value in info.items()
        if isinstance(key, str) and isinstance(value, str) and key not in IGNORED_INFO_KEYS
    }
    if items.get("Software") == "NovelAI":
        infotext = _novelai_infotext(items, size) or infotext
    return ImageMetadata(infotext=infotext if isinstance(infotext, str) else "", items=items)


def read_infotext(data: bytes) -> str:
    """The infotext embedded in encoded image bytes, "" when there is none."""
    return read_image_metadata(data).infotext


def _split_infotext(text: str) -> tuple[str, str, str]:
    *lines, last_line = text.strip().split("\n")
    if len(_PARAM_RE.findall(last_line)) < _MIN_PARAMS_ON_LAST_LINE:
        lines.append(last_line)
        last_line = ""
    prompt = negative_prompt = ""
    done_with_prompt = False
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith(_NEGATIVE_PROMPT_PREFIX):
            done_with_prompt = True
            line = line[len(_NEGATIVE_PROMPT_PREFIX) :].strip()
        if done_with_prompt:
            negative_prompt = _append_line(negative_prompt, line)
        else:
            prompt = _append_line(prompt, line)
    return prompt, negative_prompt, last_line


def _append_line(text: str, line: str) -> str:
    # As A1111: empty lines before the first non-empty one are dropped, later ones are kept.
    return f"{text}\n{line}" if text else line


def _parse_params_line(params_line: str) -> dict[str, object]:
    parsed: dict[str, object] = {}
    for key, raw_value in _PARAM_RE.findall(params_line):
        # A1111 fails on an empty value (`raw_value[0]`), logs it and drops the key.
        if not raw_value:
            continue
        value = _unquote(raw_value)
        size = _IMAGE_SIZE_RE.match(value)
        if size is not None:
            parsed[f"{key}-1"] = size.group(1)
            parsed[f"{key}-2"] = size.group(2)
        else:
            parsed[key] = value
    return parsed


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _add_defaults(parsed: dict[str, object], *, prompt: str, negative_prompt: str) -> None:
    """The values A1111 assumes when an infotext does not mention them, added in A1111's order."""
    parsed.setdefault("Clip skip", "1")
    hypernet = parsed.get("Hypernet")
    if hypernet is not None:
        parsed["Prompt"] = f"{parsed['Prompt']}<hypernet:{hypernet}:{parsed.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in parsed:
        parsed["Hires resize-1"] = 0
        parsed["Hires resize-2"] = 0
    for key, value in _HIRES_AND_INPAINT_DEFAULTS:
        parsed.setdefault(key, value)
    _restore_old_hires_fix_size(parsed)
    for key, value in _SAMPLING_DEFAULTS:
        parsed.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in parsed and parsed["FP8 weight"] != "Disable":
        parsed["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in parsed and (_uses_emphasis(prompt) or _uses_emphasis(negative_prompt)):
        parsed["Emphasis"] = "Original"
    parsed.setdefault("Refiner switch by sampling steps", False)


def _restore_old_hires_fix_size(parsed: dict[str, object]) -> None:
    """Infotexts from before A1111 1.0 give the hires first pass size; turn it into Size and Hires resize."""
    if "First pass size-1" not in parsed or "First pass size-2" not in parsed:
        return
    try:
        first_width = int(str(parsed["First pass size-1"]))
        first_height = int(str(parsed["First pass size-2"]))
        width = int(str(parsed.get("Size-1", 512)))
        height = int(str(parsed.get("Size-2", 512)))
    except ValueError:
        # A1111 fails the whole parse here; keeping the text as it is serves png-info better.
        return
    if first_width == 0 or first_height == 0:
        scale = (_OLD_HIRES_FIX_PIXELS / (width * height)) ** 0.5 if width and height else 1.0
        first_width = math.ceil(scale * width / 64) * 64
        first_height = math.ceil(scale * height / 64) * 64
    parsed["Size-1"] = first_width
    parsed["Size-2"] = first_height
    parsed["Hires resize-1"] = width
    parsed["Hires resize-2"] = height


def _uses_emphasis(prompt: str) -> bool:
    """A1111's test: some chunk of the prompt's attention parse is weighted other than 1.0.

    1. Walk A1111's attention tokens, keeping one weight per text chunk (BREAK markers carry none).
    2. `(` and `[` remember where they opened; `)`, `:w)` and `]` multiply the chunks since then.
    3. Brackets still open at the end multiply everything after them.
    """
    weights: list[float] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for index in range(start, len(weights)):
            weights[index] *= multiplier

    for match in _ATTENTION_RE.finditer(prompt):
        token = match.group(0)
        weight = _parse_weight(match.group(1))
        if token.startswith("\\"):
            weights.append(1.0)
        elif token == "(":
            round_brackets.append(len(weights))
        elif token == "[":
            square_brackets.append(len(weights))
        elif weight is not None and round_brackets:
            multiply_from(round_brackets.pop(), weight)
        elif token == ")" and round_brackets:
            multiply_from(round_brackets.pop(), _ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_from(square_brackets.pop(), _SQUARE_BRACKET_MULTIPLIER)
        else:
            weights.extend(1.0 for _ in _BREAK_RE.split(token))
    for start in round_brackets:
        multiply_from(start, _ROUND_BRACKET_MULTIPLIER)
    for start in square_brackets:
        multiply_from(start, _SQUARE_BRACKET_MULTIPLIER)
    return any(weight != 1.0 for weight in weights)


def _parse_weight(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        # A1111 raises on weights like "1.2.3"; treating the token as text keeps png-info answering.
        return None


def _add_version_backcompat_flags(parsed: dict[str, object]) -> None:
    """A1111's `infotext_versions.backcompat`: images made by old versions are reproduced with old behaviour."""
    version = _version_key(parsed.get("Version"))
    if version is None:
        return
    if version < _V1_6_0 and "[" in str(parsed.get("Prompt", "")):
        parsed["Old prompt editing timelines"] = True
    if version < _V1_6_0 and parsed.get("Sampler", "") in ("DDIM", "PLMS"):
        parsed["Pad conds v0"] = True
    if version < _V1_7_0_TSNR:
        parsed["Downcast alphas_cumprod"] = True
    if version < _V1_8_0 and parsed.get("Refiner"):
        parsed["Refiner switch by sampling steps"] = True


_VersionKey = tuple[tuple[int, ...], tuple[int, int], int]


def _version_key(version: object) -> _VersionKey | None:
    """Orders A1111 version strings as `packaging.version` does for the forms A1111 writes:
    `v1.10.1`, `v1.6.0-RC` (pre-release), `v1.7.0-225` (git describe: 225 commits after the tag)."""
    if not isinstance(version, str):
        return None
    described = _GIT_DESCRIBE_RE.match(version)
    text = (described.group(1) if described else version).strip()
    match = _VERSION_RE.fullmatch(text)
    if match is None:
        return None
    release_text, pre_label, pre_number, implicit_post, explicit_post = match.groups()
    release = tuple(int(part) for part in release_text.split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    pre = (_PRE_RELEASE_RANKS[pre_label.lower()], int(pre_number or 0)) if pre_label else (_FINAL_RELEASE_RANK, 0)
    post_text = implicit_post if implicit_post is not None else explicit_post
    post = -1 if post_text is None else int(post_text or 0)
    return release, pre, post


def _required_version_key(version: str) -> _VersionKey:
    key = _version_key(version)
    if key is None:
        raise ValueError(f"not a version: {version}")
    return key


_V1_6_0 = _required_version_key("1.6.0")
_V1_7_0_TSNR = _required_version_key("v1.7.0-225")
_V1_8_0 = _required_version_key("1.8.0")


def _open_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as error:
        raise InvalidInputError(
            "image", f"The image has too many pixels to decode ({error}); send a smaller one"
        ) from error
    except Exception as error:
        # Pillow's decoders raise many exception types on corrupt or foreign data; all mean the same to the client.
        raise InvalidInputError(
            "image", "The payload is not a decodable image: send PNG, JPEG, WEBP or GIF bytes, base64-encoded"
        ) from error
    return image


def _read_exif_user_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment decoded as piexif's `UserComment.load` does, with A1111's UTF-8 fallback;
    None when the EXIF block cannot be read."""
    try:
        raw = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment, b"")
    except Exception:
        # A damaged EXIF block is common in the wild and must not hide the rest of the metadata.
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return ""
    codec = _EXIF_USER_COMMENT_PREFIXES.get(raw[:_EXIF_PREFIX_SIZE])
    if codec is not None:
        try:
            return raw[_EXIF_PREFIX_SIZE:].decode(codec)
        except UnicodeDecodeError:
            pass
    return raw.decode("utf8", errors="ignore")


def _novelai_infotext(items: Mapping[str, str], size: tuple[int, int]) -> str | None:
    """A1111's conversion of NovelAI's PNG metadata (Description + JSON Comment) into an infotext."""
    try:
        details = json.loads(items["Comment"])
        sampler = _NOVELAI_SAMPLERS.get(details["sampler"], _NOVELAI_DEFAULT_SAMPLER)
        return (
            f"{items['Description']}\n"
            f"{_NEGATIVE_PROMPT_PREFIX} {details['uc']}\n"
            f"Steps: {details['steps']}, Sampler: {sampler}, CFG scale: {details['scale']}, Seed: {details['seed']}, "
            f"Size: {size[0]}x{size[1]}, Clip skip: 2, ENSD: 31337"
        )
    except (KeyError, TypeError, ValueError):
        return None


def _encode_png(image: Image.Image, infotext: str | None) -> bytes:
    texts = {key: value for key, value in image.info.items() if isinstance(key, str) and isinstance(value, str)}
    if infotext is not None:
        texts[PARAMETERS_KEY] = infotext
    png_info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        png_info.add_text(key, value)
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    output = io.BytesIO()
    image.save(output, format="PNG", pnginfo=png_info if texts else None)
    return output.getvalue()


def _encode_with_exif_comment(image: Image.Image, infotext: str | None, pillow_format: str, quality: int) -> bytes:
    text = infotext if infotext is not None else image.info.get(PARAMETERS_KEY)
    comment = _EXIF_UNICODE_PREFIX + (text if isinstance(text, str) else "").encode("utf_16_be", errors="replace")
    output = io.BytesIO()
    _to_lossy_mode(image, pillow_format).save(
        output, format=pillow_format, exif=_exif_with_user_comment(comment), quality=quality
    )
    return output.getvalue()


def _to_lossy_mode(image: Image.Image, pillow_format: str) -> Image.Image:
    """A1111 drops alpha and scales 16-bit images to 8 bits; other modes JPEG/WEBP cannot store become RGB."""
    if image.mode == "I;16":
        return image.point(lambda value: value * _I16_TO_8BIT).convert("RGB" if pillow_format == "WEBP" else "L")
    kept_modes = ("RGB", "L") if pillow_format == "JPEG" else ("RGB",)
    return image if image.mode in kept_modes else image.convert("RGB")


def _exif_with_user_comment(comment: bytes) -> bytes:
    """A big-endian EXIF block holding only Exif IFD > UserComment (type UNDEFINED), laid out as piexif does.

    Pillow would store the comment as BYTE, which piexif (A1111) cannot read back as a UserComment.
    """
    exif_ifd_offset = 8 + 2 + 12 + 4
    comment_offset = exif_ifd_offset + 2 + 12 + 4
    tiff = b"".join(
        (
            b"MM\x00\x2a",
            struct.pack(">I", 8),
            struct.pack(">HHHII", 1, ExifTags.IFD.Exif, _TIFF_LONG, 1, exif_ifd_offset),
            struct.pack(">I", 0),
            struct.pack(">HHHII", 1, ExifTags.Base.UserComment, _TIFF_UNDEFINED, len(comment), comment_offset),
            struct.pack(">I", 0),
            comment,
        )
    )
    return b"Exif\x00\x00" + tiff
