"""A1111 prompt syntax, chunking and weighted encoding, checked on tiny seeded SD1 and SDXL pipelines, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sd_core.clip_vocab import write_tokenizer_folder
from sd_core.errors import InvalidInputError
from sd_core.prompts import (
    ExtraNetworkCall,
    PromptEncoder,
    extract_extra_networks,
    parse_prompt_attention,
    tokenize_chunks,
)

VOCAB_SIZE = 1000
BOS_ID = VOCAB_SIZE - 2
EOS_ID = VOCAB_SIZE - 1
WIDTH = 32
SDXL_WIDTH_2 = 40
PROJECTION_DIM = 24
TIME_EMBED_DIM = 8
LAYERS = 3
NO_SAFETY_CHECKER: dict[str, Any] = {
    "safety_checker": None,
    "feature_extractor": None,
    "requires_safety_checker": False,
}
ONLY_SECOND_TEXT_ENCODER: dict[str, Any] = {"text_encoder": None, "tokenizer": None}
CPU = torch.device("cpu")

EncoderT = TypeVar("EncoderT", CLIPTextModel, CLIPTextModelWithProjection)


def assert_fragments(actual: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [text for text, _ in actual] == [text for text, _ in expected]
    assert [weight for _, weight in actual] == pytest.approx([weight for _, weight in expected])


def words(count: int, word: str = "a") -> str:
    """A prompt of exactly `count` tokens: every short word of the tiny vocabulary is one token."""
    return " ".join([word] * count)


def tiny_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    written = write_tokenizer_folder(folder, vocab_size=VOCAB_SIZE, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(written, local_files_only=True)


def tiny_text_config(width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=PROJECTION_DIM,
    )


def tiny_text_encoder(model_class: type[EncoderT], width: int) -> EncoderT:
    """A seeded tiny encoder whose layer norms have real CLIP's non-zero biases.

    A fresh final layer norm (bias 0) makes every chunk's mean almost exactly zero, which leaves the
    Original emphasis' mean ratio meaningless.
    """
    encoder = model_class(tiny_text_config(width)).eval()
    for module in encoder.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.bias, mean=0.2, std=0.5)
    return encoder


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
    )


def tiny_unet(*, cross_attention_dim: int, pooled_dim: int | None = None) -> UNet2DConditionModel:
    sdxl_args: dict[str, object] = {}
    if pooled_dim is not None:
        sdxl_args = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + pooled_dim,
        }
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
        **sdxl_args,
    )


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(CLIPTextModel, WIDTH),
        tokenizer=tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")),
        unet=tiny_unet(cross_attention_dim=WIDTH),
        scheduler=EulerDiscreteScheduler(),
        **NO_SAFETY_CHECKER,
    )


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionXLPipeline:
    torch.manual_seed(1)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(CLIPTextModel, WIDTH),
        text_encoder_2=tiny_text_encoder(CLIPTextModelWithProjection, SDXL_WIDTH_2),
        tokenizer=tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")),
        tokenizer_2=tiny_tokenizer(tmp_path_factory.mktemp("tokenizer_2"), pad_token="!"),
        unet=tiny_unet(cross_attention_dim=WIDTH + SDXL_WIDTH_2, pooled_dim=PROJECTION_DIM),
        scheduler=EulerDiscreteScheduler(),
    )


@pytest.fixture(scope="module")
def sd_encoder(sd_pipe: StableDiffusionPipeline) -> PromptEncoder:
    return PromptEncoder.from_pipeline(sd_pipe)


@pytest.fixture(scope="module")
def sdxl_encoder(sdxl_pipe: StableDiffusionXLPipeline) -> PromptEncoder:
    return PromptEncoder.from_pipeline(sdxl_pipe)


# --- parse_prompt_attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
    ],
)
def test_it_parses_the_documented_a1111_examples(text: str, expected: list[tuple[str, float]]) -> None:
    assert_fragments(parse_prompt_attention(text), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[quiet] words", [("quiet", 1 / 1.1), (" words", 1.0)]),
        ("((twice))", [("twice", 1.21)]),
        ("[[twice]]", [("twice", 1 / 1.21)]),
        ("(spaced : 1.3 )", [("spaced ", 1.3)]),
        ("(negative:-0.5) x", [("negative", -0.5), (" x", 1.0)]),
        ("stray) and ] closers", [("stray) and ] closers", 1.0)]),
        ("time: noon", [("time: noon", 1.0)]),
        ("[open square", [("open square", 1 / 1.1)]),
        ("", [("", 1.0)]),
    ],
)
def test_it_weights_brackets_like_a1111(text: str, expected: list[tuple[str, float]]) -> None:
    assert_fragments(parse_prompt_attention(text), expected)


def test_it_reads_escaped_characters_literally() -> None:
    assert parse_prompt_attention(r"a \\ b \[c\] \(d\)") == [(r"a \ b [c] (d)", 1.0)]
    assert_fragments(parse_prompt_attention(r"(\(x\))"), [("(x)", 1.1)])


def test_it_turns_uppercase_break_into_a_break_fragment() -> None:
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_prompt_attention("break BREAKFAST") == [("break BREAKFAST", 1.0)]
    assert_fragments(
        parse_prompt_attention("(red) BREAK blue"), [("red", 1.1), ("", 1.0), ("BREAK", -1.0), ("blue", 1.0)]
    )


def test_it_leaves_scheduling_and_and_syntax_as_plain_text() -> None:
    assert_fragments(parse_prompt_attention("[from:to:0.5] AND x"), [("from:to:0.5", 1 / 1.1), (" AND x", 1.0)])


def test_it_refuses_a_weight_that_is_not_a_number() -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_prompt_attention("(word:1.2.3)")
    assert caught.value.field == "prompt"


# --- extract_extra_networks ------------------------------------------------------------------------------------


def test_it_extracts_lora_tags_and_removes_them_from_the_prompt() -> None:
    text, calls = extract_extra_networks("a cat <lora:style:0.8>, <lora:detail> in a hat")
    assert text == "a cat ,  in a hat"
    assert calls == (
        ExtraNetworkCall(kind="lora", name="style", te_multiplier=0.8, unet_multiplier=0.8),
        ExtraNetworkCall(kind="lora", name="detail", te_multiplier=1.0, unet_multiplier=1.0),
    )


@pytest.mark.parametrize(
    ("tag", "te", "unet"),
    [
        ("<lora:x:0.5:0.9>", 0.5, 0.9),
        ("<lora:x:te=0.3>", 0.3, 0.3),
        ("<lora:x:0.5:unet=0.2>", 0.5, 0.2),
        ("<lora:x:1:te=0.4:unet=0.7>", 0.4, 0.7),
        ("<lora:x:0.6:0.6:lbw=OUTD>", 0.6, 0.6),
        ("<lora:x:-1>", -1.0, -1.0),
    ],
)
def test_it_reads_positional_and_named_lora_multipliers(tag: str, te: float, unet: float) -> None:
    _, calls = extract_extra_networks(tag)
    assert calls == (ExtraNetworkCall(kind="lora", name="x", te_multiplier=te, unet_multiplier=unet),)


def test_it_treats_lyco_as_lora_and_returns_other_kinds() -> None:
    text, calls = extract_extra_networks("<lyco:old:0.7>photo<hypernet:anime:1.1>")
    assert text == "photo"
    assert [(call.kind, call.name, call.te_multiplier) for call in calls] == [
        ("lora", "old", 0.7),
        ("hypernet", "anime", 1.1),
    ]


def test_it_leaves_a_prompt_without_tags_alone() -> None:
    assert extract_extra_networks("a <cat> (x:1.2)") == ("a <cat> (x:1.2)", ())


@pytest.mark.parametrize("tag", ["<lora:x:strong>", "<lora:x:0.5:te=high>", "<lora::0.5>"])
def test_it_refuses_a_malformed_extra_network_tag(tag: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        extract_extra_networks(f"a cat {tag}")
    assert caught.value.field == "prompt"


# --- tokenize_chunks -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("chunk_tokenizer"))


@pytest.fixture(scope="module")
def open_clip_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("open_clip_tokenizer"), pad_token="!")


def token_id(tokenizer: CLIPTokenizer, word: str) -> int:
    (only,) = tokenizer(word, add_special_tokens=False)["input_ids"]
    return int(only)


def test_it_gives_an_empty_prompt_one_padded_chunk(tokenizer: CLIPTokenizer) -> None:
    (chunk,) = tokenize_chunks(tokenizer, "")
    assert chunk.token_ids == (BOS_ID, *[EOS_ID] * 76)
    assert chunk.weights == (1.0,) * 77


def test_it_splits_a_200_token_prompt_into_three_chunks(tokenizer: CLIPTokenizer) -> None:
    a = token_id(tokenizer, "a")
    chunks = tokenize_chunks(tokenizer, words(200))
    assert len(chunks) == 3
    assert all(len(chunk.token_ids) == 77 and len(chunk.weights) == 77 for chunk in chunks)
    assert chunks[0].token_ids == (BOS_ID, *[a] * 75, EOS_ID)
    assert chunks[2].token_ids == (BOS_ID, *[a] * 50, *[EOS_ID] * 26)


def test_it_fits_75_tokens_in_one_chunk_and_76_in_two(tokenizer: CLIPTokenizer) -> None:
    assert len(tokenize_chunks(tokenizer, words(75))) == 1
    assert len(tokenize_chunks(tokenizer, words(76))) == 2


def test_it_pads_after_the_first_eos_with_the_open_clip_pad_token(open_clip_tokenizer: CLIPTokenizer) -> None:
    a = token_id(open_clip_tokenizer, "a")
    assert open_clip_tokenizer.pad_token_id == 0
    (chunk,) = tokenize_chunks(open_clip_tokenizer, "a a")
    assert chunk.token_ids == (BOS_ID, a, a, EOS_ID, *[0] * 73)


def test_it_carries_each_tokens_weight(tokenizer: CLIPTokenizer) -> None:
    (chunk,) = tokenize_chunks(tokenizer, "a (b:1.5) [c]")
    b, c = token_id(tokenizer, "b"), token_id(tokenizer, "c")
    assert chunk.token_ids[2:4] == (b, c)
    assert chunk.weights[:5] == pytest.approx((1.0, 1.0, 1.5, 1 / 1.1, 1.0))
    assert set(chunk.weights[5:]) == {1.0}


def test_it_starts_a_new_chunk_at_break(tokenizer: CLIPTokenizer) -> None:
    a, b = token_id(tokenizer, "a"), token_id(tokenizer, "b")
    first, second = tokenize_chunks(tokenizer, "a a BREAK b")
    assert first.token_ids == (BOS_ID, a, a, *[EOS_ID] * 74)
    assert second.token_ids == (BOS_ID, b, *[EOS_ID] * 75)


def test_it_moves_the_words_after_a_nearby_comma_to_the_next_chunk(tokenizer: CLIPTokenizer) -> None:
    a, b, comma = token_id(tokenizer, "a"), token_id(tokenizer, "b"), token_id(tokenizer, ",")
    first, second = tokenize_chunks(tokenizer, words(70) + ", " + words(10, "b"))
    assert first.token_ids == (BOS_ID, *[a] * 70, comma, *[EOS_ID] * 5)
    assert second.token_ids == (BOS_ID, *[b] * 10, *[EOS_ID] * 66)


def test_it_does_not_backtrack_to_a_far_comma_or_when_disabled(tokenizer: CLIPTokenizer) -> None:
    b = token_id(tokenizer, "b")
    far_first, _ = tokenize_chunks(tokenizer, words(50) + ", " + words(30, "b"))
    assert far_first.token_ids[-2] == b
    near_text = words(70) + ", " + words(10, "b")
    disabled_first, _ = tokenize_chunks(tokenizer, near_text, comma_padding_backtrack=0)
    assert disabled_first.token_ids[-5:] == (b, b, b, b, EOS_ID)


def test_it_reads_brackets_as_words_when_attention_parsing_is_off(tokenizer: CLIPTokenizer) -> None:
    parsed = tokenize_chunks(tokenizer, "(a) BREAK b")
    (literal,) = tokenize_chunks(tokenizer, "(a) BREAK b", parse_attention=False)
    assert len(parsed) == 2
    assert token_id(tokenizer, "(") in literal.token_ids
    assert set(literal.weights) == {1.0}


# --- PromptEncoder: SD1 ----------------------------------------------------------------------------------------


def test_it_matches_diffusers_encoding_for_a_plain_prompt(
    sd_pipe: StableDiffusionPipeline, sd_encoder: PromptEncoder
) -> None:
    encoded = sd_encoder.encode(["a cat in a hat"], ["blurry"])
    expected, expected_negative = sd_pipe.encode_prompt("a cat in a hat", CPU, 1, True, "blurry")
    assert encoded.prompt_embeds.shape == (1, 77, WIDTH)
    torch.testing.assert_close(encoded.prompt_embeds, expected)
    torch.testing.assert_close(encoded.negative_prompt_embeds, expected_negative)
    assert encoded.pooled_prompt_embeds is None
    assert encoded.negative_pooled_prompt_embeds is None


def test_it_pads_the_shorter_side_with_empty_prompt_chunks(sd_encoder: PromptEncoder) -> None:
    encoded = sd_encoder.encode([words(200)], ["blurry"])
    assert encoded.prompt_embeds.shape == (1, 3 * 77, WIDTH)
    assert encoded.negative_prompt_embeds.shape == (1, 3 * 77, WIDTH)
    empty = sd_encoder.encode([""], [""]).prompt_embeds[0]
    blurry = sd_encoder.encode(["blurry"], [""]).prompt_embeds[0]
    negative = encoded.negative_prompt_embeds[0]
    torch.testing.assert_close(negative[:77], blurry)
    torch.testing.assert_close(negative[77:154], empty)
    torch.testing.assert_close(negative[154:], empty)


def test_it_scales_only_the_weighted_token_without_normalisation(sd_encoder: PromptEncoder) -> None:
    plain = sd_encoder.encode(["a b c"], [""], emphasis="No norm").prompt_embeds[0]
    weighted = sd_encoder.encode(["a (b:1.5) c"], [""], emphasis="No norm").prompt_embeds[0]
    others = [index for index in range(77) if index != 2]
    torch.testing.assert_close(weighted[2], plain[2] * 1.5)
    torch.testing.assert_close(weighted[others], plain[others])


def test_it_restores_the_chunk_mean_with_original_emphasis(sd_encoder: PromptEncoder) -> None:
    plain = sd_encoder.encode(["a b c"], [""]).prompt_embeds[0]
    weighted = sd_encoder.encode(["a (b:1.5) c"], [""]).prompt_embeds[0]
    scale = plain.mean() / (plain * torch.tensor([1.5 if index == 2 else 1.0 for index in range(77)])[:, None]).mean()
    others = [index for index in range(77) if index != 2]
    assert not torch.allclose(weighted, plain)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    torch.testing.assert_close(weighted[others], plain[others] * scale)
    torch.testing.assert_close(weighted[2], plain[2] * 1.5 * scale)


def test_it_ignores_weights_with_ignore_emphasis(sd_encoder: PromptEncoder) -> None:
    plain = sd_encoder.encode(["a b c"], [""]).prompt_embeds
    ignored = sd_encoder.encode(["a (b:1.5) c"], [""], emphasis="Ignore").prompt_embeds
    torch.testing.assert_close(ignored, plain)


def test_it_encodes_brackets_as_text_with_none_emphasis(sd_encoder: PromptEncoder) -> None:
    literal = sd_encoder.encode(["a (b:1.5) c"], [""], emphasis="None").prompt_embeds
    escaped = sd_encoder.encode([r"a \(b:1.5\) c"], [""]).prompt_embeds
    unweighted = sd_encoder.encode(["a b c"], [""]).prompt_embeds
    torch.testing.assert_close(literal, escaped)
    assert not torch.allclose(literal, unweighted)


def test_it_takes_an_earlier_layer_through_the_final_norm_with_clip_skip(
    sd_pipe: StableDiffusionPipeline, sd_encoder: PromptEncoder
) -> None:
    skipped = sd_encoder.encode(["a cat"], [""], clip_skip=2).prompt_embeds[0]
    (chunk,) = tokenize_chunks(sd_pipe.tokenizer, "a cat")
    with torch.no_grad():
        hidden = sd_pipe.text_encoder(torch.tensor([chunk.token_ids]), output_hidden_states=True).hidden_states[-2]
        expected = sd_pipe.text_encoder.final_layer_norm(hidden)[0]
    torch.testing.assert_close(skipped, expected)
    assert not torch.allclose(skipped, sd_encoder.encode(["a cat"], [""]).prompt_embeds[0])


def test_it_encodes_identical_prompts_of_a_batch_identically(sd_encoder: PromptEncoder) -> None:
    encoded = sd_encoder.encode(["a cat", words(90, "b"), "a cat"], ["", "blurry", ""])
    assert encoded.prompt_embeds.shape == (3, 2 * 77, WIDTH)
    assert torch.equal(encoded.prompt_embeds[0], encoded.prompt_embeds[2])
    assert torch.equal(encoded.negative_prompt_embeds[0], encoded.negative_prompt_embeds[2])
    alone = sd_encoder.encode(["a cat"], [""]).prompt_embeds[0]
    torch.testing.assert_close(encoded.prompt_embeds[0, :77], alone)


def test_it_refuses_an_unknown_emphasis(sd_encoder: PromptEncoder) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sd_encoder.encode(["a"], [""], emphasis="Loud")
    assert caught.value.field == "emphasis"
    assert set(caught.value.valid_values) == {"Original", "No norm", "Ignore", "None"}


@pytest.mark.parametrize("clip_skip", [0, LAYERS + 2])
def test_it_refuses_a_clip_skip_beyond_the_encoder(sd_encoder: PromptEncoder, clip_skip: int) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sd_encoder.encode(["a"], [""], clip_skip=clip_skip)
    assert caught.value.field == "clip_skip"


def test_it_refuses_unequal_prompt_and_negative_counts(sd_encoder: PromptEncoder) -> None:
    with pytest.raises(InvalidInputError):
        sd_encoder.encode(["a", "b"], [""])


def test_it_feeds_long_prompt_embeds_to_the_sd_pipeline(
    sd_pipe: StableDiffusionPipeline, sd_encoder: PromptEncoder
) -> None:
    encoded = sd_encoder.encode([words(100), "(a cat:1.2)"], ["blurry", ""])
    result = sd_pipe(
        prompt_embeds=encoded.prompt_embeds,
        negative_prompt_embeds=encoded.negative_prompt_embeds,
        num_inference_steps=1,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert result.images.shape == (2, 32, 32, 3)
    assert np.isfinite(result.images).all()


# --- PromptEncoder: SDXL ---------------------------------------------------------------------------------------


def test_it_matches_diffusers_sdxl_encoding_for_a_plain_prompt(
    sdxl_pipe: StableDiffusionXLPipeline, sdxl_encoder: PromptEncoder
) -> None:
    encoded = sdxl_encoder.encode(["a cat in a hat"], ["blurry"])
    expected, expected_negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(
        "a cat in a hat", device=CPU, negative_prompt="blurry"
    )
    assert encoded.prompt_embeds.shape == (1, 77, WIDTH + SDXL_WIDTH_2)
    assert encoded.pooled_prompt_embeds is not None
    assert encoded.pooled_prompt_embeds.shape == (1, PROJECTION_DIM)
    torch.testing.assert_close(encoded.prompt_embeds, expected)
    torch.testing.assert_close(encoded.negative_prompt_embeds, expected_negative)
    torch.testing.assert_close(encoded.pooled_prompt_embeds, pooled)
    torch.testing.assert_close(encoded.negative_pooled_prompt_embeds, negative_pooled)


def test_it_pools_the_first_chunk_of_a_long_sdxl_prompt(
    sdxl_pipe: StableDiffusionXLPipeline, sdxl_encoder: PromptEncoder
) -> None:
    prompt = words(80) + " " + words(80, "b")
    encoded = sdxl_encoder.encode([prompt], ["blurry"])
    first_chunk = tokenize_chunks(sdxl_pipe.tokenizer_2, prompt)[0]
    with torch.no_grad():
        expected = sdxl_pipe.text_encoder_2(torch.tensor([first_chunk.token_ids])).text_embeds
    assert encoded.prompt_embeds.shape == (1, 3 * 77, WIDTH + SDXL_WIDTH_2)
    assert encoded.pooled_prompt_embeds is not None
    torch.testing.assert_close(encoded.pooled_prompt_embeds, expected)


def test_it_moves_both_sdxl_layers_back_with_clip_skip(
    sdxl_pipe: StableDiffusionXLPipeline, sdxl_encoder: PromptEncoder
) -> None:
    skipped = sdxl_encoder.encode(["a cat"], [""], clip_skip=2).prompt_embeds[0]
    expected = sdxl_pipe.encode_prompt("a cat", device=CPU, do_classifier_free_guidance=False, clip_skip=1)[0][0]
    torch.testing.assert_close(skipped, expected)


def test_it_zeroes_the_sdxl_negative_when_every_negative_prompt_is_empty(sdxl_encoder: PromptEncoder) -> None:
    empty = sdxl_encoder.encode(["a cat", "a dog"], ["", ""])
    assert empty.negative_pooled_prompt_embeds is not None
    assert not empty.negative_prompt_embeds.any()
    assert not empty.negative_pooled_prompt_embeds.any()
    mixed = sdxl_encoder.encode(["a cat", "a dog"], ["", "blurry"])
    assert mixed.negative_prompt_embeds[0].any()


def test_it_encodes_with_the_second_sdxl_encoder_alone(sdxl_pipe: StableDiffusionXLPipeline) -> None:
    refiner_like = StableDiffusionXLPipeline(
        vae=sdxl_pipe.vae,
        text_encoder_2=sdxl_pipe.text_encoder_2,
        tokenizer_2=sdxl_pipe.tokenizer_2,
        unet=sdxl_pipe.unet,
        scheduler=sdxl_pipe.scheduler,
        **ONLY_SECOND_TEXT_ENCODER,
    )
    encoded = PromptEncoder.from_pipeline(refiner_like).encode(["a cat"], ["blurry"])
    assert encoded.prompt_embeds.shape == (1, 77, SDXL_WIDTH_2)
    assert encoded.pooled_prompt_embeds is not None
    assert encoded.pooled_prompt_embeds.shape == (1, PROJECTION_DIM)


def test_it_feeds_prompt_embeds_to_the_sdxl_pipeline(
    sdxl_pipe: StableDiffusionXLPipeline, sdxl_encoder: PromptEncoder
) -> None:
    encoded = sdxl_encoder.encode(["a (cat:1.3) BREAK in a hat"], [""])
    result = sdxl_pipe(
        prompt_embeds=encoded.prompt_embeds,
        negative_prompt_embeds=encoded.negative_prompt_embeds,
        pooled_prompt_embeds=encoded.pooled_prompt_embeds,
        negative_pooled_prompt_embeds=encoded.negative_pooled_prompt_embeds,
        num_inference_steps=1,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert encoded.prompt_embeds.shape[1] == 2 * 77
    assert result.images.shape == (1, 32, 32, 3)
    assert np.isfinite(result.images).all()
