"""Round trips: tiny diffusers pipelines -> LDM single files -> diffusers' own `from_single_file`, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sd_core.clip_vocab import write_tokenizer_folder
from sd_core.ldm_convert import (
    clip_l_to_ldm,
    open_clip_to_ldm,
    peft_lora_to_kohya,
    pipeline_to_ldm_state_dict,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)

VOCAB_SIZE = 1000
SDXL_WIDTHS = (32, 40)
SDXL_PROJECTION_DIM = 24
TIME_EMBED_DIM = 8
LORA_ALPHA = 8
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
NO_SAFETY_CHECKER: dict[str, Any] = {
    "safety_checker": None,
    "feature_extractor": None,
    "requires_safety_checker": False,
}


def tiny_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_tokenizer_folder(folder, vocab_size=VOCAB_SIZE, pad_token=pad_token))


def tiny_text_config(
    width: int, *, projection_dim: int | None = None, hidden_act: str = "quick_gelu"
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=VOCAB_SIZE - 1,
        hidden_size=width,
        intermediate_size=width * 2 + 5,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim or width,
        hidden_act=hidden_act,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=32,
    )


def tiny_sd1(folder: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(32)),
        tokenizer=tiny_tokenizer(folder / "tok"),
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        **NO_SAFETY_CHECKER,
    )


def tiny_sd2(folder: Path) -> StableDiffusionPipeline:
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(32, hidden_act="gelu")),
        tokenizer=tiny_tokenizer(folder / "tok", pad_token="!"),
        unet=unet,
        scheduler=DDIMScheduler(
            prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        **NO_SAFETY_CHECKER,
    )


def tiny_sdxl(folder: Path) -> StableDiffusionXLPipeline:
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
        cross_attention_dim=sum(SDXL_WIDTHS),
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(SDXL_WIDTHS[0])),
        text_encoder_2=CLIPTextModelWithProjection(
            tiny_text_config(SDXL_WIDTHS[1], projection_dim=SDXL_PROJECTION_DIM, hidden_act="gelu")
        ),
        tokenizer=tiny_tokenizer(folder / "tok"),
        tokenizer_2=tiny_tokenizer(folder / "tok2", pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )


def saved(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, folder: Path) -> Path:
    """The diffusers folder that serves as `config=` when loading the single file."""
    pipe.save_pretrained(folder / "diffusers")
    return folder / "diffusers"


def generate(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, height=32, width=32, output_type="np", generator=generator).images


def add_peft_loras(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """Random (non-zero) peft LoRAs with alpha 8 on rank 4, returned as a diffusers LoRA file's state dict."""
    torch.manual_seed(5)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=LORA_ALPHA, init_lora_weights=False, target_modules=UNET_TARGETS))
    state = {f"unet.{key}": tensor for key, tensor in get_peft_model_state_dict(pipe.unet).items()}
    for name in ("text_encoder", "text_encoder_2"):
        if (encoder := getattr(pipe, name, None)) is not None:
            config = LoraConfig(r=4, lora_alpha=LORA_ALPHA, init_lora_weights=False, target_modules=CLIP_TARGETS)
            encoder.add_adapter(config)
            state |= {f"{name}.{key}": tensor for key, tensor in get_peft_model_state_dict(encoder).items()}
    return state


def assert_same_weights(loaded: nn.Module, original: nn.Module) -> None:
    loaded_state, original_state = loaded.state_dict(), original.state_dict()
    assert loaded_state.keys() == original_state.keys()
    different = [key for key, tensor in original_state.items() if not torch.equal(loaded_state[key], tensor)]
    assert different == []


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> tuple[StableDiffusionPipeline, Path]:
    folder = tmp_path_factory.mktemp("sd1")
    pipe = tiny_sd1(folder)
    return pipe, saved(pipe, folder)


def test_it_names_weights_like_an_a1111_sd1_checkpoint(sd1: tuple[StableDiffusionPipeline, Path]) -> None:
    pipe, _ = sd1

    state = pipeline_to_ldm_state_dict(pipe, architecture="sd1")

    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in state
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in state
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in state
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in state
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in state
    assert len(state) == sum(len(module.state_dict()) for module in (pipe.unet, pipe.vae, pipe.text_encoder))


def test_it_round_trips_sd1_through_from_single_file(sd1: tuple[StableDiffusionPipeline, Path], tmp_path: Path) -> None:
    pipe, config = sd1
    path = tmp_path / "tiny-sd1.safetensors"

    state = pipeline_to_ldm_state_dict(pipe, architecture="sd1")
    save_single_file(state, path)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True)

    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(state)
        assert handle.metadata() == {"format": "pt"}
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, name), getattr(pipe, name))


def test_it_round_trips_sd2_with_open_clip_and_v_prediction(tmp_path: Path) -> None:
    pipe = tiny_sd2(tmp_path)
    config = saved(pipe, tmp_path)
    path = tmp_path / "tiny-sd2.safetensors"

    state = pipeline_to_ldm_state_dict(pipe, architecture="sd2")
    save_single_file(state, path, metadata={"modelspec.architecture": "stable-diffusion-v2"})
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True)

    assert state["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert "cond_stage_model.model.text_projection" not in state
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, name), getattr(pipe, name))


def test_it_round_trips_sdxl_with_both_text_encoders(tmp_path: Path) -> None:
    pipe = tiny_sdxl(tmp_path)
    config = saved(pipe, tmp_path)
    path = tmp_path / "tiny-sdxl.safetensors"

    state = pipeline_to_ldm_state_dict(pipe, architecture="sdxl")
    save_single_file(state, path)
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True)

    open_clip = "conditioner.embedders.1.model."
    assert state[open_clip + "transformer.resblocks.0.attn.in_proj_weight"].shape == (120, 40)
    assert state[open_clip + "text_projection"].shape == (40, SDXL_PROJECTION_DIM)
    assert state[open_clip + "positional_embedding"].shape == (77, 40)
    assert {open_clip + "ln_final.weight", open_clip + "token_embedding.weight"} <= state.keys()
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(loaded, name), getattr(pipe, name))


def test_it_writes_a_standalone_vae_file_layout(sd1: tuple[StableDiffusionPipeline, Path], tmp_path: Path) -> None:
    pipe, config = sd1
    path = tmp_path / "tiny.vae.safetensors"

    state = vae_to_ldm(pipe.vae, prefix="")
    save_single_file(state, path)
    loaded = AutoencoderKL.from_single_file(str(path), config=str(config / "vae"), local_files_only=True)

    assert {key.split(".")[0] for key in state} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert_same_weights(loaded, pipe.vae)


def test_it_converts_components_on_their_own(sd1: tuple[StableDiffusionPipeline, Path]) -> None:
    pipe, _ = sd1

    unet = unet_to_ldm(pipe.unet)
    clip = clip_l_to_ldm(pipe.text_encoder, prefix="te.")
    open_clip = open_clip_to_ldm(pipe.text_encoder, prefix="oc.")

    assert all(key.startswith("model.diffusion_model.") for key in unet)
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(clip["te.text_model.embeddings.token_embedding.weight"], embeddings)
    layer = pipe.text_encoder.state_dict()
    fused = open_clip["oc.transformer.resblocks.0.attn.in_proj_bias"]
    assert torch.equal(fused[32:64], layer["encoder.layers.0.self_attn.k_proj.bias"])
    assert "oc.text_projection" not in open_clip


def test_it_refuses_an_unknown_architecture(sd1: tuple[StableDiffusionPipeline, Path]) -> None:
    pipe, _ = sd1

    with pytest.raises(ValueError, match="sd1, sd2, sdxl"):
        pipeline_to_ldm_state_dict(pipe, architecture="sd3")


@pytest.mark.parametrize("build", [tiny_sd1, tiny_sdxl], ids=["sd1", "sdxl"])
def test_it_converts_a_peft_lora_that_diffusers_loads_as_kohya(build: Any, tmp_path: Path) -> None:
    original = build(tmp_path / "original")
    base_image = generate(original)
    peft_state = add_peft_loras(original)
    peft_image = generate(original)
    path = tmp_path / "kohya" / "tiny-lora.safetensors"
    path.parent.mkdir()

    kohya = peft_lora_to_kohya(peft_state, alpha=LORA_ALPHA)
    save_single_file(kohya, path)
    fresh = build(tmp_path / "fresh")
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)

    assert np.abs(peft_image - base_image).max() > 1e-3
    np.testing.assert_allclose(generate(fresh), peft_image, atol=1e-5)
    assert len(kohya) == len(peft_state) // 2 * 3
    assert all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in kohya)


def test_it_names_lora_modules_the_kohya_way() -> None:
    down, up = torch.ones(4, 32), torch.ones(32, 4)
    state = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": down,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": up,
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": up,
    }

    kohya = peft_lora_to_kohya(state)

    assert kohya["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"].item() == 4.0
    assert torch.equal(kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"], up)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya


def test_it_refuses_lora_weights_without_a_component_prefix() -> None:
    state = {"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32)}

    with pytest.raises(ValueError, match="must start with a component name"):
        peft_lora_to_kohya(state)
