"""Tests of sd_core.infotext: A1111's infotext layout, its parser, and images carrying it."""

from __future__ import annotations

import io
import json

import pytest
from PIL import ExifTags, Image, PngImagePlugin

from sd_core.errors import InvalidInputError
from sd_core.infotext import (
    INFOTEXT_KEY_ORDER,
    ImageMetadata,
    encode_image,
    format_infotext,
    parse_infotext,
    quote,
    read_image_metadata,
    read_infotext,
)

A1111_PARAMS_LINE = (
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 1234, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)
A1111_PARAMS: dict[str, object] = {
    "Steps": 20,
    "Sampler": "Euler a",
    "Schedule type": "Automatic",
    "CFG scale": 7.0,
    "Seed": 1234,
    "Size": "512x512",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Version": "v1.10.1",
}
INFOTEXT = f"a cat on a mat\nNegative prompt: blurry, lowres\n{A1111_PARAMS_LINE}"


def _image(mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (32, 24), (200, 40, 90, 255)[: len(mode)] if mode != "L" else 128)


def _png_chunk_types(data: bytes) -> list[bytes]:
    types, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        types.append(data[position + 4 : position + 8])
        position += 12 + length
    return types


def test_it_formats_the_a1111_example_exactly() -> None:
    text = format_infotext(prompt="a cat on a mat", negative_prompt="blurry, lowres", params=A1111_PARAMS)

    assert text == INFOTEXT


def test_it_orders_keys_as_a1111_whatever_the_input_order() -> None:
    shuffled = {key: A1111_PARAMS[key] for key in reversed(list(A1111_PARAMS))}
    shuffled = {"Lora hashes": "x: 0123456789", **shuffled, "Hires upscaler": "Latent", "User": "alice"}

    text = format_infotext(prompt="p", negative_prompt="", params=shuffled)

    params_line = text.split("\n")[-1]
    keys = [pair.split(":")[0] for pair in params_line.replace('"x: 0123456789"', "x").split(", ")]
    assert keys == [
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Model hash",
        "Model",
        "Lora hashes",
        "Hires upscaler",
        "Version",
        "User",
    ]
    assert INFOTEXT_KEY_ORDER.index("Denoising strength") < INFOTEXT_KEY_ORDER.index("Clip skip")


def test_it_drops_none_values_and_writes_a_value_equal_to_its_key_bare() -> None:
    params = {"Steps": 20, "Sampler": "Euler", "Seed": 1, "Denoising strength": None, "Tiling": None, "Flag": "Flag"}

    text = format_infotext(prompt="p", negative_prompt="", params=params)

    assert text == "p\nSteps: 20, Sampler: Euler, Seed: 1, Flag"


def test_it_quotes_values_with_commas_colons_or_newlines_as_json() -> None:
    assert quote(7.0) == "7.0"
    assert quote(True) == "True"
    assert quote(20) == "20"
    assert quote("Euler a") == "Euler a"
    assert quote("a: 0123456789ab, b: abcdef012345") == '"a: 0123456789ab, b: abcdef012345"'
    assert quote("line one\nline two") == '"line one\\nline two"'
    assert quote("日本, café") == '"日本, café"'


def test_it_round_trips_quoted_values() -> None:
    params = {**A1111_PARAMS, "Lora hashes": "a: 0123456789ab, b: abcdef012345", "Hires prompt": 'say "hi", twice'}

    text = format_infotext(prompt="p", negative_prompt="", params=params)
    parsed = parse_infotext(text)

    assert 'Lora hashes: "a: 0123456789ab, b: abcdef012345"' in text
    assert parsed["Lora hashes"] == "a: 0123456789ab, b: abcdef012345"
    assert parsed["Hires prompt"] == 'say "hi", twice'


def test_it_parses_the_a1111_example_as_a1111_does() -> None:
    parsed = parse_infotext(INFOTEXT)

    assert parsed["Prompt"] == "a cat on a mat"
    assert parsed["Negative prompt"] == "blurry, lowres"
    assert parsed["Steps"] == "20"
    assert parsed["CFG scale"] == "7.0"
    assert parsed["Seed"] == "1234"
    assert parsed["Size-1"] == "512"
    assert parsed["Size-2"] == "512"
    assert "Size" not in parsed
    assert parsed["Model hash"] == "6ce0161689"
    assert parsed["Version"] == "v1.10.1"


def test_it_adds_a1111_defaults_for_missing_keys() -> None:
    parsed = parse_infotext(INFOTEXT)

    assert parsed["Clip skip"] == "1"
    assert parsed["Hires resize-1"] == 0
    assert parsed["Hires resize-2"] == 0
    assert parsed["Hires sampler"] == "Use same sampler"
    assert parsed["Hires schedule type"] == "Use same scheduler"
    assert parsed["Hires checkpoint"] == "Use same checkpoint"
    assert parsed["Hires prompt"] == ""
    assert parsed["Mask mode"] == "Inpaint masked"
    assert parsed["Masked content"] == "original"
    assert parsed["Inpaint area"] == "Whole picture"
    assert parsed["Masked area padding"] == 32
    assert parsed["RNG"] == "GPU"
    assert parsed["Schedule max sigma"] == 0
    assert parsed["VAE Encoder"] == "Full"
    assert parsed["VAE Decoder"] == "Full"
    assert parsed["FP8 weight"] == "Disable"
    assert parsed["Refiner switch by sampling steps"] is False
    assert "Emphasis" not in parsed
    assert "Cache FP16 weight for LoRA" not in parsed
    assert "Downcast alphas_cumprod" not in parsed


def test_it_keeps_values_the_infotext_gives_over_defaults() -> None:
    parsed = parse_infotext("p\nSteps: 20, Clip skip: 2, RNG: CPU, Hires resize: 1024x768, Schedule type: Karras")

    assert parsed["Clip skip"] == "2"
    assert parsed["RNG"] == "CPU"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["Hires resize-1"] == "1024"
    assert parsed["Hires resize-2"] == "768"


@pytest.mark.parametrize(
    ("prompt", "uses_emphasis"),
    [
        ("a (cat)", True),
        ("a [cat]", True),
        ("a (cat:1.3)", True),
        ("a (unbalanced", True),
        ("a cat", False),
        ("a (cat:1.0)", False),
        (r"a \(cat\)", False),
        ("a cat BREAK a dog", False),
    ],
)
def test_it_adds_emphasis_only_when_the_prompt_uses_it(prompt: str, uses_emphasis: bool) -> None:
    parsed = parse_infotext(f"{prompt}\n{A1111_PARAMS_LINE}")

    assert ("Emphasis" in parsed) is uses_emphasis
    assert parsed.get("Emphasis", "Original") == "Original"


def test_it_round_trips_multi_line_prompts() -> None:
    prompt = "first line, (detail:1.2)\n\nthird line: with colon"
    negative = "bad hands\nlowres"

    text = format_infotext(prompt=prompt, negative_prompt=negative, params=A1111_PARAMS)
    parsed = parse_infotext(text)

    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    assert parsed["Steps"] == "20"


def test_it_writes_no_negative_prompt_line_when_it_is_empty() -> None:
    text = format_infotext(prompt="a cat", negative_prompt="", params=A1111_PARAMS)

    assert text == f"a cat\n{A1111_PARAMS_LINE}"
    assert parse_infotext(text)["Negative prompt"] == ""


def test_it_reads_a_last_line_with_fewer_than_three_params_as_prompt() -> None:
    parsed = parse_infotext("a cat\nstyle: watercolor, mood: calm")

    assert parsed["Prompt"] == "a cat\nstyle: watercolor, mood: calm"
    assert "style" not in parsed


def test_it_drops_a_key_with_an_empty_value_as_a1111_does() -> None:
    parsed = parse_infotext("p\nSteps: 20, Style: , Seed: 5, Sampler: Euler")

    assert parsed["Seed"] == "5"
    assert parsed["Sampler"] == "Euler"
    assert "Style" not in parsed


def test_it_flags_old_versions_for_backward_compatibility() -> None:
    parsed = parse_infotext("a [cat]\nSteps: 20, Sampler: DDIM, Seed: 1, Version: v1.5.1")

    assert parsed["Old prompt editing timelines"] is True
    assert parsed["Pad conds v0"] is True
    assert parsed["Downcast alphas_cumprod"] is True


def test_it_converts_the_old_hires_first_pass_size() -> None:
    parsed = parse_infotext("p\nSteps: 20, Size: 1024x1024, First pass size: 0x0, Seed: 1")

    assert (parsed["Size-1"], parsed["Size-2"]) == (512, 512)
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == (1024, 1024)


def test_it_round_trips_png_with_a_parameters_text_chunk() -> None:
    image = _image()
    image.info["Software"] = "sd-multi"

    data = encode_image(image, infotext=INFOTEXT)
    metadata = read_image_metadata(data)

    assert data.startswith(b"\x89PNG")
    assert b"tEXt" in _png_chunk_types(data)
    assert metadata == ImageMetadata(infotext=INFOTEXT, items={"Software": "sd-multi"})
    assert read_infotext(data) == INFOTEXT
    assert Image.open(io.BytesIO(data)).size == (32, 24)


def test_it_writes_itxt_for_text_that_is_not_latin1() -> None:
    infotext = f"日本 café\n{A1111_PARAMS_LINE}"

    data = encode_image(_image("RGBA"), infotext=infotext)

    assert b"iTXt" in _png_chunk_types(data)
    assert read_infotext(data) == infotext
    assert parse_infotext(read_infotext(data))["Prompt"] == "日本 café"


def test_it_reads_an_empty_infotext_from_an_image_without_one() -> None:
    data = encode_image(_image(), infotext=None)

    assert read_image_metadata(data) == ImageMetadata(infotext="", items={})


@pytest.mark.parametrize(("image_format", "magic"), [("jpg", b"\xff\xd8"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_it_round_trips_jpeg_and_webp_through_the_exif_user_comment(image_format: str, magic: bytes) -> None:
    infotext = f"日本 café, (cat:1.2)\nNegative prompt: blurry\n{A1111_PARAMS_LINE}"

    data = encode_image(_image("RGBA"), infotext=infotext, image_format=image_format, jpeg_quality=90)

    assert data.startswith(magic)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == "RGB"
        user_comment = decoded.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert user_comment == b"UNICODE\x00" + infotext.encode("utf_16_be")
    assert read_image_metadata(data) == ImageMetadata(infotext=infotext, items={})


def test_it_stores_the_user_comment_as_exif_undefined_like_piexif() -> None:
    data = encode_image(_image(), infotext="hello", image_format="jpg")

    exif_block = data[data.index(b"Exif\x00\x00") + 6 :]
    user_comment_entry = exif_block.index(b"\x92\x86")
    assert exif_block[:4] == b"MM\x00\x2a"
    assert exif_block[user_comment_entry + 2 : user_comment_entry + 4] == b"\x00\x07"


def test_it_encodes_16_bit_and_palette_images_as_jpeg() -> None:
    for image in (Image.new("I;16", (8, 8), 65535), _image().convert("P")):
        data = encode_image(image, infotext="p", image_format="jpeg")

        assert read_infotext(data) == "p"


def test_it_refuses_an_unknown_image_format() -> None:
    with pytest.raises(InvalidInputError) as caught:
        encode_image(_image(), infotext="p", image_format="bmp")

    assert caught.value.field == "samples_format"
    assert caught.value.valid_values == ("png", "jpg", "jpeg", "webp")


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_it_refuses_bytes_that_are_not_an_image(payload: bytes) -> None:
    with pytest.raises(InvalidInputError) as caught:
        read_image_metadata(payload)

    assert caught.value.field == "image"
    assert "not a decodable image" in caught.value.message


def test_it_refuses_a_truncated_image() -> None:
    data = encode_image(Image.effect_noise((64, 64), 50).convert("RGB"), infotext="p")

    with pytest.raises(InvalidInputError) as caught:
        read_infotext(data[: len(data) // 2])

    assert caught.value.field == "image"


def test_it_converts_novelai_metadata_to_an_infotext() -> None:
    png_info = PngImagePlugin.PngInfo()
    png_info.add_text("Software", "NovelAI")
    png_info.add_text("Description", "1girl, solo")
    png_info.add_text(
        "Comment", json.dumps({"uc": "lowres", "steps": 28, "sampler": "k_euler_ancestral", "scale": 11, "seed": 7})
    )
    output = io.BytesIO()
    _image().save(output, format="PNG", pnginfo=png_info)

    metadata = read_image_metadata(output.getvalue())

    assert metadata.infotext == (
        "1girl, solo\nNegative prompt: lowres\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 11, Seed: 7, Size: 32x24, Clip skip: 2, ENSD: 31337"
    )
    assert metadata.items["Software"] == "NovelAI"


def test_it_reads_the_infotext_of_a_gif_from_its_comment() -> None:
    output = io.BytesIO()
    _image().save(output, format="GIF", comment="a cat\nSteps: 20, Sampler: Euler, Seed: 3")

    assert read_infotext(output.getvalue()) == "a cat\nSteps: 20, Sampler: Euler, Seed: 3"
