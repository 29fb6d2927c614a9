"""Pixel-level img2img/inpaint pieces and the cheap preview, checked on small images with known pixel values."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sd_core.errors import InvalidInputError
from sd_core.images import (
    InpaintCrop,
    binarize_mask,
    blur_mask,
    crop_region,
    decode_base64_image,
    expand_crop_region,
    fill_masked_area,
    flatten_alpha,
    inpaint_crop,
    latent_preview,
    latent_preview_grid,
    paste_back,
    prepare_inpaint,
    prepare_mask,
    resize_image,
)

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 1_000_000}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def square_mask(width: int, height: int, box: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(value, box)
    return mask


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))


# --- decoding ------------------------------------------------------------------------------------------------------


def test_it_decodes_raw_base64_to_the_same_pixels() -> None:
    source = random_image(8, 6)

    decoded = decode_base64_image(b64(source), field="init_images", **LIMITS)

    assert decoded.size == (8, 6)
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(source))


def test_it_decodes_a_data_url_with_line_breaks_and_no_padding() -> None:
    source = random_image(5, 5, seed=1)
    encoded = b64(source).rstrip("=")
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))

    decoded = decode_base64_image(f"data:image/png;base64,{wrapped}\n", field="mask", **LIMITS)

    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(source))


@pytest.mark.parametrize(
    "url", ["http://example.com/a.png", "https://example.com/a.png", "file:///etc/passwd", "ftp://host/x.png"]
)
def test_it_refuses_urls_without_fetching_them(url: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        decode_base64_image(url, field="init_images", **LIMITS)

    assert error.value.field == "init_images"
    assert "not fetched" in error.value.message


def test_it_refuses_a_data_url_that_is_not_a_base64_image() -> None:
    with pytest.raises(InvalidInputError) as error:
        decode_base64_image("data:text/plain;base64,aGVsbG8=", field="mask", **LIMITS)

    assert error.value.field == "mask"


def test_it_refuses_an_oversized_payload_before_decoding_it() -> None:
    # Not valid base64 at all: only a size check made before decoding can produce the size message.
    payload = "!" * 4_000

    with pytest.raises(InvalidInputError) as error:
        decode_base64_image(payload, field="init_images", max_bytes=1_000, max_pixels=1_000_000)

    assert "limit is 1000 bytes" in error.value.message


def test_it_refuses_invalid_base64_naming_the_field() -> None:
    with pytest.raises(InvalidInputError) as error:
        decode_base64_image("not*base64!", field="init_images", **LIMITS)

    assert error.value.field == "init_images"
    assert "not valid base64" in error.value.message


def test_it_refuses_base64_that_is_not_an_image() -> None:
    garbage = base64.b64encode(b"this is plain text, not a picture").decode("ascii")

    with pytest.raises(InvalidInputError) as error:
        decode_base64_image(garbage, field="mask", **LIMITS)

    assert error.value.field == "mask"
    assert "not a decodable image" in error.value.message


def test_it_refuses_a_truncated_image() -> None:
    truncated = png_bytes(random_image(32, 32))[:-60]

    with pytest.raises(InvalidInputError) as error:
        decode_base64_image(base64.b64encode(truncated).decode("ascii"), field="init_images", **LIMITS)

    assert "not a decodable image" in error.value.message


def test_it_refuses_a_pixel_bomb_from_its_header() -> None:
    small_file_many_pixels = Image.new("RGB", (2_000, 2_000), (9, 9, 9))
    assert len(png_bytes(small_file_many_pixels)) < 100_000

    with pytest.raises(InvalidInputError) as error:
        decode_base64_image(b64(small_file_many_pixels), field="init_images", **LIMITS)

    assert "2000x2000 = 4000000 pixels" in error.value.message


def test_it_refuses_a_header_claiming_billions_of_pixels() -> None:
    claim = base64.b64encode(png_header_only(100_000, 100_000)).decode("ascii")

    with pytest.raises(InvalidInputError) as error:
        decode_base64_image(claim, field="init_images", **LIMITS)

    assert error.value.field == "init_images"


# --- alpha -----------------------------------------------------------------------------------------------------------


def test_it_flattens_transparency_onto_the_background_colour() -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 255, 128))

    flat = flatten_alpha(image, "#ff0000")

    assert flat.mode == "RGB"
    assert flat.getpixel((0, 0)) == (255, 0, 0)
    assert flat.getpixel((1, 0)) == (127, 0, 128)


def test_it_flattens_palette_transparency_onto_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 40, 50, 60])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0

    flat = flatten_alpha(image)

    assert flat.getpixel((0, 0)) == (255, 255, 255)
    assert flat.getpixel((1, 0)) == (40, 50, 60)


def test_it_converts_opaque_images_to_rgb_unchanged() -> None:
    grey = Image.new("L", (3, 3), 77)

    assert flatten_alpha(grey).getpixel((1, 1)) == (77, 77, 77)


# --- resize ----------------------------------------------------------------------------------------------------------


def three_stripes() -> Image.Image:
    """200x100: red x < 40, green 40 <= x < 160, blue x >= 160."""
    stripes = np.zeros((100, 200, 3), dtype=np.uint8)
    stripes[:, :40] = (255, 0, 0)
    stripes[:, 40:160] = (0, 255, 0)
    stripes[:, 160:] = (0, 0, 255)
    return Image.fromarray(stripes)


def test_it_just_resizes_by_stretching() -> None:
    resized = resize_image(three_stripes(), 64, 32, 0)

    assert resized.size == (64, 32)
    assert resized.getpixel((0, 16)) == (255, 0, 0)
    assert resized.getpixel((32, 16)) == (0, 255, 0)
    assert resized.getpixel((63, 16)) == (0, 0, 255)


def test_it_crops_and_resizes_keeping_the_centre() -> None:
    resized = resize_image(three_stripes(), 64, 64, 1)

    # Scaled to 128x64, the centre 64 columns are original columns 50..150: all green.
    assert resized.size == (64, 64)
    assert np.all(np.asarray(resized) == (0, 255, 0))


def test_it_resizes_and_fills_the_bands_with_the_edge_rows() -> None:
    source = np.full((50, 100, 3), (0, 255, 0), dtype=np.uint8)
    source[:5] = (255, 0, 0)
    source[-5:] = (0, 0, 255)

    resized = resize_image(Image.fromarray(source), 64, 63, 2)

    result = np.asarray(resized)
    assert resized.size == (64, 63)
    assert not np.any(np.all(result == 0, axis=2)), "no black band"
    # 64x32 content at rows 15..46; the 15 rows above repeat row 15, the 16 rows below repeat row 46.
    assert np.array_equal(result[:15], np.repeat(result[15:16], 15, axis=0))
    assert np.array_equal(result[47:], np.repeat(result[46:47], 16, axis=0))
    assert result[0, 0, 0] > 200 and result[-1, 0, 2] > 200


def test_it_fills_left_and_right_bands_for_a_tall_image() -> None:
    source = np.full((100, 50, 3), (0, 255, 0), dtype=np.uint8)
    source[:, :5] = (255, 0, 0)

    result = np.asarray(resize_image(Image.fromarray(source), 64, 64, 2))

    assert np.array_equal(result[:, :16], np.repeat(result[:, 16:17], 16, axis=1))
    assert result[32, 0, 0] > 200
    assert tuple(result[32, 63]) == (0, 255, 0)


def test_it_treats_latent_upscale_as_just_resize_on_pixels() -> None:
    image = random_image(40, 30)

    assert np.array_equal(np.asarray(resize_image(image, 64, 64, 3)), np.asarray(resize_image(image, 64, 64, 0)))


def test_it_keeps_a_mask_in_mode_l_when_resizing() -> None:
    assert resize_image(Image.new("L", (30, 10), 255), 16, 16, 2).mode == "L"


def test_it_refuses_an_unknown_resize_mode() -> None:
    with pytest.raises(InvalidInputError) as error:
        resize_image(random_image(4, 4), 8, 8, 7)

    assert error.value.field == "resize_mode"
    assert error.value.valid_values == ("0", "1", "2", "3")


# --- masks -----------------------------------------------------------------------------------------------------------


def test_it_binarises_and_inverts_a_grey_mask() -> None:
    mask = Image.fromarray(np.array([[0, 100, 128, 129, 255]], dtype=np.uint8))

    assert list(np.asarray(binarize_mask(mask))[0]) == [0, 0, 0, 255, 255]
    assert list(np.asarray(binarize_mask(mask, invert=True))[0]) == [255, 255, 255, 0, 0]
    assert list(np.asarray(binarize_mask(mask, round_mask=False))[0]) == [0, 100, 128, 129, 255]


def test_it_reads_a_transparent_mask_from_its_alpha_channel() -> None:
    mask = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    mask.putpixel((1, 0), (0, 0, 0, 255))

    assert list(np.asarray(binarize_mask(mask))[0]) == [0, 255]


def test_it_blurs_within_the_a1111_kernel_width_only() -> None:
    mask = square_mask(64, 64, (32, 0, 64, 64))

    row = np.asarray(blur_mask(mask, 4, 4))[32]

    # blur 4: kernel 2*int(2.5*4+0.5)+1 = 21, so it reaches 10 pixels either side of the edge at x=32.
    assert row[21] == 0 and row[22] > 0
    assert row[42] == 255 and row[41] < 255
    assert abs(int(row[31]) + int(row[32]) - 255) <= 1, "symmetric about the edge"


def test_it_blurs_x_and_y_separately() -> None:
    mask = square_mask(64, 64, (24, 24, 40, 40))

    blurred = np.asarray(blur_mask(mask, 6, 0))

    column = blurred[:, 32]
    assert column[23] == 0 and column[40] == 0, "no vertical blur"
    assert np.all(column[24:40] == column[32]) and column[32] > 0
    assert 0 < blurred[32, 20] < 255, "horizontal blur"


def test_it_prepares_a_mask_at_processing_size() -> None:
    mask = square_mask(32, 32, (8, 8, 24, 24), value=200)

    prepared = prepare_mask(mask, width=64, height=64, resize_mode=0, invert=True, blur_x=0, blur_y=0)

    values = np.asarray(prepared)
    assert prepared.mode == "L" and prepared.size == (64, 64)
    assert values[0, 0] == 255 and values[32, 32] == 0


def test_it_finds_the_crop_region_with_padding_clamped() -> None:
    mask = square_mask(100, 80, (10, 20, 30, 40))

    assert crop_region(mask, 0) == (10, 20, 30, 40)
    assert crop_region(mask, 5) == (5, 15, 35, 45)
    assert crop_region(mask, 50) == (0, 0, 80, 80)


def test_it_refuses_a_crop_region_for_a_blank_mask() -> None:
    with pytest.raises(ValueError, match="blank mask"):
        crop_region(Image.new("L", (10, 10)), 4)


def test_it_expands_a_crop_region_to_the_processing_ratio() -> None:
    # A1111's own example: a 128x32 mask region processed at 512x512 becomes 128x128.
    assert expand_crop_region((100, 200, 228, 232), 512, 512, 512, 512) == (100, 152, 228, 280)
    assert expand_crop_region((0, 0, 128, 32), 512, 512, 512, 512) == (0, 0, 128, 128)
    assert expand_crop_region((0, 0, 128, 32), 512, 512, 128, 64) == (0, 0, 128, 64)
    assert expand_crop_region((100, 100, 110, 200), 512, 256, 512, 512) == (5, 100, 205, 200)


def test_it_makes_no_inpaint_crop_for_a_blank_mask() -> None:
    assert inpaint_crop(Image.new("L", (64, 64)), padding=8, width=64, height=64) is None


# --- paste back and fill ---------------------------------------------------------------------------------------------


def test_it_pastes_back_original_pixels_outside_the_mask_exactly() -> None:
    original = random_image(64, 64, seed=2)
    generated = Image.new("RGB", (64, 64), (0, 0, 255))
    mask = square_mask(64, 64, (16, 16, 48, 48))

    result = np.asarray(paste_back(original, generated, mask, None))

    outside = np.asarray(mask) == 0
    assert np.array_equal(result[outside], np.asarray(original)[outside])
    assert np.all(result[~outside] == (0, 0, 255))


def test_it_blends_where_the_mask_is_partial() -> None:
    original = Image.new("RGB", (4, 4), (200, 0, 0))
    generated = Image.new("RGB", (4, 4), (0, 0, 100))

    result = paste_back(original, generated, Image.new("L", (4, 4), 51), None)

    assert result.getpixel((1, 1)) == (160, 0, 20)


def test_it_pastes_an_only_masked_result_back_into_the_crop_box() -> None:
    original = random_image(100, 80, seed=3)
    crop = InpaintCrop(region=(20, 10, 60, 50))
    generated = Image.new("RGB", (64, 64), (0, 0, 255))
    mask = square_mask(100, 80, (30, 20, 50, 40))

    result = paste_back(original, generated, mask, crop)

    values, untouched = np.asarray(result), np.asarray(mask) == 0
    assert result.size == (100, 80)
    assert np.array_equal(values[untouched], np.asarray(original)[untouched])
    assert np.all(values[20:40, 30:50] == (0, 0, 255))


def test_it_fills_only_the_masked_area_with_surrounding_colour() -> None:
    image = np.full((64, 64, 3), (30, 160, 90), dtype=np.uint8)
    image[16:48, 16:48] = (255, 255, 255)
    mask = square_mask(64, 64, (16, 16, 48, 48))

    filled = np.asarray(fill_masked_area(Image.fromarray(image), mask, 0)).astype(np.int16)

    outside = np.asarray(mask) == 0
    assert np.array_equal(filled[outside], image[outside])
    assert np.all(np.abs(filled[~outside] - (30, 160, 90)) <= 6), "the white hole takes the surrounding colour"


@pytest.mark.parametrize("inpainting_fill", [1, 2, 3])
def test_it_leaves_pixels_unchanged_for_the_other_fill_modes(inpainting_fill: int) -> None:
    image = random_image(16, 16, seed=4)

    result = fill_masked_area(image, square_mask(16, 16, (4, 4, 12, 12)), inpainting_fill)

    assert np.array_equal(np.asarray(result), np.asarray(image))


def test_it_refuses_an_unknown_fill_mode() -> None:
    with pytest.raises(InvalidInputError) as error:
        fill_masked_area(random_image(4, 4), Image.new("L", (4, 4)), 4)

    assert error.value.field == "inpainting_fill"


def test_it_prepares_whole_picture_inpainting_with_a_doubled_overlay_mask() -> None:
    image = random_image(32, 32, seed=5)
    mask = square_mask(32, 32, (8, 8, 24, 24))

    inputs = prepare_inpaint(
        image, mask, width=64, height=64, resize_mode=0, invert=False, blur_x=2, blur_y=2,
        full_res=False, padding=0, inpainting_fill=1,
    )  # fmt: skip

    assert inputs is not None and inputs.crop is None
    assert inputs.image.size == inputs.mask.size == inputs.original.size == (64, 64)
    processing, overlay = pixels(inputs.mask), pixels(inputs.overlay_mask)
    assert np.array_equal(overlay, np.minimum(processing * 2, 255))
    assert np.array_equal(np.asarray(inputs.image), np.asarray(resize_image(image, 64, 64, 0)))


def test_it_prepares_only_masked_inpainting_around_the_mask() -> None:
    image = random_image(200, 100, seed=6)
    mask = square_mask(200, 100, (150, 40, 170, 60))

    inputs = prepare_inpaint(
        image, mask, width=64, height=64, resize_mode=0, invert=False, blur_x=0, blur_y=0,
        full_res=True, padding=4, inpainting_fill=0,
    )  # fmt: skip

    assert inputs is not None and inputs.crop is not None
    assert inputs.crop.region == (146, 36, 174, 64)
    assert inputs.image.size == inputs.mask.size == (64, 64)
    assert inputs.original.size == (200, 100)
    result = paste_back(inputs.original, Image.new("RGB", (64, 64), (1, 2, 3)), inputs.overlay_mask, inputs.crop)
    assert np.array_equal(np.asarray(result)[:, :140], np.asarray(image)[:, :140])
    assert result.getpixel((160, 50)) == (1, 2, 3)


def test_it_falls_back_to_plain_img2img_for_a_blank_only_masked_mask() -> None:
    inputs = prepare_inpaint(
        random_image(32, 32), Image.new("L", (32, 32)), width=32, height=32, resize_mode=0, invert=False,
        blur_x=4, blur_y=4, full_res=True, padding=0, inpainting_fill=0,
    )  # fmt: skip

    assert inputs is None


# --- preview ---------------------------------------------------------------------------------------------------------


def test_it_previews_latents_at_latent_size() -> None:
    assert latent_preview(torch.zeros(4, 12, 8), architecture="sd1").size == (8, 12)
    assert latent_preview(torch.zeros(1, 4, 12, 8), architecture="sdxl").size == (8, 12)


def test_it_maps_a_known_latent_to_the_a1111_colour() -> None:
    latent = torch.zeros(1, 4, 2, 2)
    latent[0, 0] = 1.0

    # (1 + coefficients of channel 0) * 127.5: SD1 (0.298, 0.207, 0.208), SDXL (0.3448, 0.4168, 0.4395).
    assert latent_preview(latent, architecture="sd1").getpixel((0, 0)) == (165, 154, 154)
    assert latent_preview(latent, architecture="sd2").getpixel((1, 1)) == (165, 154, 154)
    assert latent_preview(latent, architecture="sdxl").getpixel((0, 0)) == (171, 181, 184)
    assert latent_preview(torch.zeros(4, 1, 1), architecture="sd1").getpixel((0, 0)) == (128, 128, 128)


def test_it_clamps_preview_colours() -> None:
    latent = torch.zeros(4, 1, 2)
    latent[3, 0, 0], latent[3, 0, 1] = 10.0, -10.0

    preview = latent_preview(latent, architecture="sd1")

    assert preview.getpixel((0, 0)) == (0, 0, 0)
    assert preview.getpixel((1, 0)) == (255, 255, 255)


def test_it_tiles_a_batch_preview_as_the_a1111_grid() -> None:
    batch = torch.zeros(3, 4, 2, 3)
    batch[1, 3] = -10.0

    grid = latent_preview_grid(batch, architecture="sd1")

    # 3 images: round(sqrt(3)) = 2 rows of 2 columns, the fourth cell empty (black).
    assert grid.size == (6, 4)
    assert grid.getpixel((0, 0)) == (128, 128, 128)
    assert grid.getpixel((3, 0)) == (255, 255, 255)
    assert grid.getpixel((0, 2)) == (128, 128, 128)
    assert grid.getpixel((5, 3)) == (0, 0, 0)
    assert latent_preview_grid(torch.zeros(2, 4, 2, 3), architecture="sd1").size == (6, 2)


def test_it_refuses_a_preview_for_an_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="sd3"):
        latent_preview(torch.zeros(4, 2, 2), architecture="sd3")
