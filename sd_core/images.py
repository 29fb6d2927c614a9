"""Pixel work around the pipelines: decoding request images safely, A1111's img2img resize modes, inpaint masks
(blur, "Only masked" crop, fill, paste back over the original) and the cheap latent preview.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from PIL import Image, ImageColor, ImageFilter, ImageOps
from scipy import ndimage

from sd_core.errors import InvalidInputError

LANCZOS = Image.Resampling.LANCZOS


class ResizeMode(IntEnum):
    """A1111's `resize_mode` for img2img init images and masks."""

    JUST_RESIZE = 0
    CROP_AND_RESIZE = 1
    RESIZE_AND_FILL = 2
    LATENT_UPSCALE = 3


class InpaintingFill(IntEnum):
    """A1111's `inpainting_fill`: what the masked area starts from before denoising."""

    FILL = 0
    ORIGINAL = 1
    LATENT_NOISE = 2
    LATENT_NOTHING = 3


RESIZE_MODE_VALUES = tuple(str(mode.value) for mode in ResizeMode)
INPAINTING_FILL_VALUES = tuple(str(fill.value) for fill in InpaintingFill)

# A1111 modules/sd_vae_approx.py cheap_approximation: one row per latent channel, columns R, G, B, giving
# an image in [-1, 1]. SD2 shares SD1's VAE.
_SD1_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_SDXL_LATENT_RGB = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)
LATENT_RGB_FACTORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sd1": _SD1_LATENT_RGB,
    "sd2": _SD1_LATENT_RGB,
    "sdxl": _SDXL_LATENT_RGB,
}

# A1111 masking.fill: (Gaussian radius, times composited), from the widest blur down to the untouched pixels.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))

_DATA_URL_PREFIX = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_URL_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


# --- decoding request images ---------------------------------------------------------------------------------------


def decode_base64_image(data: str, *, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode one request image given as raw base64 or a `data:image/...;base64,` URL.

    1. Refuse URLs of any other kind (http, https, file, ...): the server never fetches images.
    2. Refuse payloads whose decoded size would exceed `max_bytes`, before decoding them.
    3. Decode strictly (base64 alphabet only; whitespace and missing padding are tolerated).
    4. Refuse images over `max_pixels` from their header, before decompressing them, then load and apply
       the EXIF orientation (as A1111's `images.read` does).
    """
    payload = _base64_payload(data, field=field)
    raw = _decode_base64(payload, field=field, max_bytes=max_bytes)
    return _open_image(raw, field=field, max_pixels=max_pixels)


def _base64_payload(data: str, *, field: str) -> str:
    if not isinstance(data, str):
        raise InvalidInputError(field, f"{field} must be a base64 string or a data:image/...;base64, URL")
    text = data.strip()
    prefix = _DATA_URL_PREFIX.match(text)
    if prefix is not None:
        text = text[prefix.end() :]
    elif text[:5].lower() == "data:":
        raise InvalidInputError(
            field, f"{field} is a data URL but not base64 image data; expected data:image/png;base64,..."
        )
    elif _URL_SCHEME.match(text):
        raise InvalidInputError(
            field,
            f"{field} is a URL; images are not fetched by the server: send the image itself as base64 "
            "or as a data:image/png;base64,... URL",
        )
    if not text:
        raise InvalidInputError(field, f"{field} is empty; send the image as base64")
    return text


def _decode_base64(payload: str, *, field: str, max_bytes: int) -> bytes:
    compact = _WHITESPACE.sub("", payload)
    unpadded = compact.rstrip("=")
    decoded_size = len(unpadded) * 3 // 4
    if decoded_size > max_bytes:
        raise InvalidInputError(
            field, f"{field} is about {decoded_size} bytes once decoded; the limit is {max_bytes} bytes"
        )
    padded = unpadded + "=" * (-len(unpadded) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(field, f"{field} is not valid base64 ({exc}); send the image as base64") from exc


def _open_image(raw: bytes, *, field: str, max_pixels: int) -> Image.Image:
    not_an_image = f"{field} is not a decodable image; send a PNG, JPEG or WebP file encoded as base64"
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        raise InvalidInputError(field, f"{field} has too many pixels ({exc}); the limit is {max_pixels}") from exc
    except Exception as exc:
        raise InvalidInputError(field, not_an_image) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(
            field, f"{field} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as exc:
        raise InvalidInputError(field, not_an_image) from exc


def flatten_alpha(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """An RGB image: transparent pixels (alpha channel or palette/colour-key transparency) are composited over
    `background` (A1111 option `img2img_background_color`); images without transparency are just converted."""
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image.convert("RGB")
    try:
        colour = ImageColor.getrgb(background)
    except ValueError as exc:
        raise InvalidInputError(
            "img2img_background_color", f"{background!r} is not a colour; use #rrggbb, e.g. #ffffff"
        ) from exc
    canvas = Image.new("RGBA", image.size, (*colour[:3], 255))
    canvas.alpha_composite(image.convert("RGBA"))
    return canvas.convert("RGB")


# --- resizing ------------------------------------------------------------------------------------------------------


def resize_image(image: Image.Image, width: int, height: int, resize_mode: int) -> Image.Image:
    """A1111's `images.resize_image` with LANCZOS (no upscaler model), keeping the image's mode.

    0 Just resize: stretch to width x height.
    1 Crop and resize: scale to cover width x height keeping the aspect ratio, then crop the centre.
    2 Resize and fill: scale to fit inside, centre it, and fill the two bands by stretching the image's edge
      row (or column) outwards.
    3 Just resize (latent upscale): A1111 stretches the latent instead of the pixels; at the pixel level it is
      a stretch like 0, which is what this returns.
    """
    mode = _resize_mode(resize_mode)
    if mode in (ResizeMode.JUST_RESIZE, ResizeMode.LATENT_UPSCALE):
        return image.resize((width, height), LANCZOS)
    target_ratio = width / height
    source_ratio = image.width / image.height
    # Covering (crop) takes the full width when the target is relatively wider; fitting (fill) when narrower.
    cover = mode is ResizeMode.CROP_AND_RESIZE
    full_width = target_ratio > source_ratio if cover else target_ratio < source_ratio
    scaled_width = width if full_width else max(1, image.width * height // image.height)
    scaled_height = max(1, image.height * width // image.width) if full_width else height
    scaled = image.resize((scaled_width, scaled_height), LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    left, top = width // 2 - scaled_width // 2, height // 2 - scaled_height // 2
    canvas.paste(scaled, (left, top))
    if mode is ResizeMode.RESIZE_AND_FILL:
        _stretch_edges_into_bands(canvas, scaled, left, top)
    return canvas


def _resize_mode(resize_mode: int) -> ResizeMode:
    try:
        return ResizeMode(resize_mode)
    except ValueError as exc:
        raise InvalidInputError(
            "resize_mode", f"resize_mode {resize_mode!r} is not a resize mode", valid_values=RESIZE_MODE_VALUES
        ) from exc


def _stretch_edges_into_bands(canvas: Image.Image, scaled: Image.Image, left: int, top: int) -> None:
    # Each band gets its full remaining size (A1111 gives both bands the top band's size, which can leave one
    # black row or column when the leftover is odd).
    bottom, right = top + scaled.height, left + scaled.width
    if top > 0 or bottom < canvas.height:
        first_row = scaled.crop((0, 0, scaled.width, 1))
        last_row = scaled.crop((0, scaled.height - 1, scaled.width, scaled.height))
        if top > 0:
            canvas.paste(first_row.resize((scaled.width, top), Image.Resampling.NEAREST), (left, 0))
        if bottom < canvas.height:
            band = last_row.resize((scaled.width, canvas.height - bottom), Image.Resampling.NEAREST)
            canvas.paste(band, (left, bottom))
    if left > 0 or right < canvas.width:
        first_column = scaled.crop((0, 0, 1, scaled.height))
        last_column = scaled.crop((scaled.width - 1, 0, scaled.width, scaled.height))
        if left > 0:
            canvas.paste(first_column.resize((left, scaled.height), Image.Resampling.NEAREST), (0, top))
        if right < canvas.width:
            band = last_column.resize((canvas.width - right, scaled.height), Image.Resampling.NEAREST)
            canvas.paste(band, (right, top))


# --- inpaint masks -------------------------------------------------------------------------------------------------


def binarize_mask(mask: Image.Image, *, invert: bool = False, round_mask: bool = True) -> Image.Image:
    """The mask as mode "L", white = repaint. A transparent RGBA/LA mask means its alpha channel (as A1111's
    `create_binary_mask`); with `round_mask` every pixel becomes 0 or 255 (threshold above 128)."""
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema() != (255, 255):
        grey = mask.getchannel("A")
    else:
        grey = mask.convert("L")
    if round_mask:
        grey = grey.point(lambda value: 255 if value > 128 else 0)
    return ImageOps.invert(grey) if invert else grey


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of sigma `blur` and width `2*int(2.5*blur+0.5)+1` pixels, run separately
    along x and y (cv2.GaussianBlur with its reflect-101 border, here done with scipy)."""
    if blur_x <= 0 and blur_y <= 0:
        return mask.copy()
    values = np.asarray(mask.convert("L"), dtype=np.float32)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma > 0:
            values = ndimage.convolve1d(values, _gaussian_kernel(sigma), axis=axis, mode="mirror")
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _gaussian_kernel(sigma: int) -> np.ndarray:
    radius = int(2.5 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2.0 * sigma * sigma))
    return (kernel / kernel.sum()).astype(np.float32)


def prepare_mask(
    mask: Image.Image,
    *,
    width: int,
    height: int,
    resize_mode: int,
    invert: bool,
    blur_x: int,
    blur_y: int,
    round_mask: bool = True,
) -> Image.Image:
    """The "Whole picture" inpaint mask at processing size, mode "L": binarised, inverted when asked, blurred,
    then resized like the init image (A1111 blurs at the mask's own resolution, before resizing)."""
    binary = binarize_mask(mask, invert=invert, round_mask=round_mask)
    return resize_image(blur_mask(binary, blur_x, blur_y), width, height, resize_mode)


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """A1111's `get_crop_region_v2`: the box (x1, y1, x2, y2) around the mask's non-zero pixels, grown by
    `padding` on every side and clamped to the image. A blank mask has none: check first, or use `inpaint_crop`."""
    box = mask.convert("L").getbbox()
    if box is None:
        raise ValueError("a blank mask has no crop region; A1111 runs plain img2img instead")
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(
    region: tuple[int, int, int, int],
    processing_width: int,
    processing_height: int,
    image_width: int,
    image_height: int,
) -> tuple[int, int, int, int]:
    """A1111's `expand_crop_region`: grow the region's short side to the processing aspect ratio, evenly on
    both sides, sliding it back inside the image at an edge and clipping it when the image is too small."""
    x1, y1, x2, y2 = region
    processing_ratio = processing_width / processing_height
    if (x2 - x1) / (y2 - y1) > processing_ratio:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / processing_ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * processing_ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_span(start: int, end: int, growth: int, limit: int) -> tuple[int, int]:
    start -= growth // 2
    end += growth - growth // 2
    if end > limit:
        start -= end - limit
        end = limit
    if start < 0:
        end -= start
        start = 0
    return start, min(end, limit)


@dataclass(frozen=True, kw_only=True)
class InpaintCrop:
    """The "Only masked" (inpaint_full_res) region (x1, y1, x2, y2) of the original image: processed at
    width x height, then scaled back into this box."""

    region: tuple[int, int, int, int]

    @property
    def left(self) -> int:
        return self.region[0]

    @property
    def top(self) -> int:
        return self.region[1]

    @property
    def width(self) -> int:
        return self.region[2] - self.region[0]

    @property
    def height(self) -> int:
        return self.region[3] - self.region[1]

    def cut(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """The region of `image` at processing size (A1111 resizes it with "Resize and fill")."""
        return resize_image(image.crop(self.region), width, height, ResizeMode.RESIZE_AND_FILL)


def inpaint_crop(mask: Image.Image, *, padding: int, width: int, height: int) -> InpaintCrop | None:
    """The "Only masked" crop around a (blurred) mask at the original's size; None for a blank mask, where
    A1111 falls back to plain img2img."""
    if mask.convert("L").getbbox() is None:
        return None
    region = crop_region(mask, padding)
    return InpaintCrop(region=expand_crop_region(region, width, height, mask.width, mask.height))


def paste_back(
    original: Image.Image, generated: Image.Image, mask: Image.Image, crop: InpaintCrop | None
) -> Image.Image:
    """A1111's inpaint overlay: `generated` composited over `original` with `mask` as its alpha, in RGB.

    Where the mask is 0 the result is exactly the original pixel, where it is 255 exactly the generated one.
    With a crop, `generated` is first scaled into the crop box ("Crop and resize", as A1111) and the result has
    the original's size; without one, `generated`, `original` and `mask` share the processing size.
    """
    base = original.convert("RGB")
    if crop is not None:
        placed = base.copy()
        scaled = resize_image(generated.convert("RGB"), crop.width, crop.height, ResizeMode.CROP_AND_RESIZE)
        placed.paste(scaled, (crop.left, crop.top))
        generated = placed
    if generated.size != base.size or mask.size != base.size:
        raise ValueError(
            f"paste_back needs equal sizes: original {base.size}, generated {generated.size}, mask {mask.size}"
        )
    alpha = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    blended = np.asarray(base, dtype=np.float32) * (1.0 - alpha) + np.asarray(generated.convert("RGB")) * alpha
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def fill_masked_area(image: Image.Image, mask: Image.Image, inpainting_fill: int) -> Image.Image:
    """The init image for inpainting with `inpainting_fill` (A1111 `masking.fill` for 0).

    0 fill: the masked area is replaced by ever less blurred colours of the unmasked surroundings; pixels where
      the mask is 0 stay exact.
    1 original: unchanged.
    2 latent noise, 3 latent nothing: they replace the masked area in latent space, which the caller does after
      encoding; the pixels are returned unchanged here.
    """
    try:
        fill = InpaintingFill(inpainting_fill)
    except ValueError as exc:
        raise InvalidInputError(
            "inpainting_fill",
            f"inpainting_fill {inpainting_fill!r} is not a fill mode",
            valid_values=INPAINTING_FILL_VALUES,
        ) from exc
    if fill is not InpaintingFill.FILL:
        return image.copy()
    kept = image.convert("RGBA")
    kept.putalpha(ImageOps.invert(mask.convert("L")))
    # Premultiplied, so the blur spreads only the kept pixels' colours into the hole.
    premultiplied = kept.convert("RGBa")
    result = Image.new("RGBA", image.size)
    for radius, repeats in _FILL_PASSES:
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA") if radius else kept
        for _ in range(repeats):
            result.alpha_composite(layer)
    return result.convert("RGB")


@dataclass(frozen=True, kw_only=True)
class InpaintInputs:
    """What an inpaint run needs, from one init image and the request's mask (A1111 img2img `init`).

    `image` and `mask` go to the pipeline at width x height; `paste_back(original, generated, overlay_mask,
    crop)` turns the pipeline's output into the returned image.
    """

    image: Image.Image
    mask: Image.Image
    original: Image.Image
    overlay_mask: Image.Image
    crop: InpaintCrop | None


def prepare_inpaint(
    image: Image.Image,
    mask: Image.Image,
    *,
    width: int,
    height: int,
    resize_mode: int,
    invert: bool,
    blur_x: int,
    blur_y: int,
    full_res: bool,
    padding: int,
    inpainting_fill: int,
    round_mask: bool = True,
    background: str = "#ffffff",
) -> InpaintInputs | None:
    """Prepare one init image and its mask for inpainting.

    1. Flatten the image's alpha onto `background`; binarise, invert and blur the mask.
    2. "Only masked" (`full_res`): crop around the blurred mask (stretched to the image's size if it differs;
       None for a blank mask: run plain img2img), cut image and mask to width x height; the result keeps the
       original's size.
       "Whole picture": resize image and mask with `resize_mode`; the overlay mask is the resized mask doubled
       (A1111), so the generated pixels cover the blur's inner half fully.
    3. Fill the masked area for `inpainting_fill`.
    """
    flat = flatten_alpha(image, background)
    blurred = blur_mask(binarize_mask(mask, invert=invert, round_mask=round_mask), blur_x, blur_y)
    if full_res:
        if blurred.size != flat.size:
            blurred = blurred.resize(flat.size, LANCZOS)
        crop = inpaint_crop(blurred, padding=padding, width=width, height=height)
        if crop is None:
            return None
        original, overlay_mask = flat, blurred
        processing_image, processing_mask = crop.cut(flat, width, height), crop.cut(blurred, width, height)
    else:
        crop = None
        original = processing_image = resize_image(flat, width, height, resize_mode)
        processing_mask = resize_image(blurred, width, height, resize_mode)
        overlay_mask = processing_mask.point(lambda value: min(255, value * 2))
    return InpaintInputs(
        image=fill_masked_area(processing_image, processing_mask, inpainting_fill),
        mask=processing_mask,
        original=original,
        overlay_mask=overlay_mask,
        crop=crop,
    )


# --- live preview --------------------------------------------------------------------------------------------------


def latent_preview(latents: torch.Tensor, *, architecture: str) -> Image.Image:
    """A1111's "Approx cheap" preview: a fixed linear map from the 4 latent channels to RGB, at latent size
    (1/8 of the image, as A1111; no upscale, it costs well under a millisecond). Takes (4, h, w) or
    (B, 4, h, w); of a batch only the first image is shown (A1111 without `show_progress_grid`)."""
    if latents.dim() == 4:
        latents = latents[:1]
    return Image.fromarray(_latents_to_rgb(latents, architecture)[0])


def latent_preview_grid(latents: torch.Tensor, *, architecture: str) -> Image.Image:
    """The cheap preview of every image of a (B, 4, h, w) batch, tiled as A1111's default grid: round(sqrt(B))
    rows, filled row by row, empty cells black."""
    pixels = _latents_to_rgb(latents, architecture)
    count, height, width, _ = pixels.shape
    rows = min(count, max(1, round(math.sqrt(count))))
    columns = math.ceil(count / rows)
    grid = np.zeros((rows * columns, height, width, 3), dtype=np.uint8)
    grid[:count] = pixels
    tiled = grid.reshape(rows, columns, height, width, 3).transpose(0, 2, 1, 3, 4).reshape(rows * height, -1, 3)
    return Image.fromarray(np.ascontiguousarray(tiled))


def _latents_to_rgb(latents: torch.Tensor, architecture: str) -> np.ndarray:
    factors = LATENT_RGB_FACTORS.get(str(architecture))
    if factors is None:
        raise ValueError(f"no latent preview for architecture {architecture!r}; known: {', '.join(LATENT_RGB_FACTORS)}")
    batch = latents.detach()
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if batch.dim() != 4 or batch.shape[1] != len(factors):
        raise ValueError(f"latent preview needs (4, h, w) or (B, 4, h, w) latents, got {tuple(latents.shape)}")
    matrix = torch.tensor(factors, dtype=torch.float32, device=batch.device)
    rgb = torch.einsum("bchw,cr->bhwr", batch.float(), matrix)
    # Convert on the latents' device so only the small uint8 image crosses to the CPU.
    pixels = ((rgb + 1.0) * 127.5).clamp(0.0, 255.0).round().to(torch.uint8)
    return pixels.cpu().numpy()
