"""Tiny seeded random-weight models for tests and the demo: SD1.x and SDXL as A1111-style single .safetensors
files (original LDM key names, with a sibling `<stem>.config/` diffusers config folder) and as diffusers folders,
plus a tiny LoRA and a tiny standalone VAE. They load through exactly the same code as real checkpoints.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sd_core.architectures import SHIPPED_CONFIGS
from sd_core.checkpoints import CONFIG_FOLDER_SUFFIX
from sd_core.clip_vocab import EOS_TOKEN, write_tokenizer_folder
from sd_core.ldm_convert import peft_lora_to_kohya, pipeline_to_ldm_state_dict, save_single_file, vae_to_ldm

log = logging.getLogger(__name__)

TINY_VOCAB = 1000
TINY_SD1 = "tiny-sd1"
TINY_SDXL = "tiny-sdxl"
TINY_LORA = "tiny-lora"
TINY_VAE = "tiny-vae"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True, kw_only=True)
class TinyModelFiles:
    """What `write_tiny_models` wrote, as paths inside the models folder."""

    sd1_single_file: Path
    sd1_diffusers: Path
    sdxl_single_file: Path
    sdxl_diffusers: Path
    lora: Path
    vae: Path


def write_tiny_models(
    models_dir: Path, *, overwrite: bool = False, progress: Callable[[str], None] = log.info
) -> TinyModelFiles:
    """Write the tiny models into `models_dir` (Stable-diffusion/, Lora/, VAE/); existing files are kept."""
    checkpoints = models_dir / "Stable-diffusion"
    files = TinyModelFiles(
        sd1_single_file=checkpoints / f"{TINY_SD1}.safetensors",
        sd1_diffusers=checkpoints / f"{TINY_SD1}-diffusers",
        sdxl_single_file=checkpoints / f"{TINY_SDXL}.safetensors",
        sdxl_diffusers=checkpoints / f"{TINY_SDXL}-diffusers",
        lora=models_dir / "Lora" / f"{TINY_LORA}.safetensors",
        vae=models_dir / "VAE" / f"{TINY_VAE}.safetensors",
    )
    steps: list[tuple[Path, Callable[[], None]]] = [
        (files.sd1_single_file, lambda: _write_single_file(tiny_sd1_pipeline(seed=1), files.sd1_single_file, "sd1")),
        (files.sd1_diffusers, lambda: _write_diffusers(tiny_sd1_pipeline(seed=2), files.sd1_diffusers)),
        (
            files.sdxl_single_file,
            lambda: _write_single_file(tiny_sdxl_pipeline(seed=3), files.sdxl_single_file, "sdxl"),
        ),
        (files.sdxl_diffusers, lambda: _write_diffusers(tiny_sdxl_pipeline(seed=4), files.sdxl_diffusers)),
        (files.lora, lambda: _write_lora(tiny_sd1_pipeline(seed=1), files.lora, seed=5)),
        (files.vae, lambda: _write_vae(_tiny_vae(seed=6), files.vae)),
    ]
    for number, (path, write) in enumerate(steps, start=1):
        if path.exists() and not overwrite:
            progress(f"tiny models {number}/{len(steps)}: {path.name} exists, kept")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        progress(f"tiny models {number}/{len(steps)}: writing {path.name}")
        write()
    return files


# ------------------------------------------------------------------------------------------------- components


def _tiny_vae(*, seed: int) -> Any:
    """Four blocks like the real VAE, so one latent pixel is 8x8 image pixels, with 8-16 channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def _tiny_text_encoder(*, seed: int, width: int, with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act="gelu" if with_projection else "quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def _tokenizer(folder: Path, *, pad_token: str) -> CLIPTokenizer:
    write_tokenizer_folder(folder, vocab_size=TINY_VOCAB, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tiny_sd1_pipeline(*, seed: int) -> Any:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _tokenizer(Path(scratch) / "tokenizer", pad_token=EOS_TOKEN)
    scheduler = PNDMScheduler.from_pretrained(
        str(SHIPPED_CONFIGS / "sd1"), subfolder="scheduler", local_files_only=True
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(seed=seed + 100),
        text_encoder=_tiny_text_encoder(seed=seed + 200, width=32, with_projection=False),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(*, seed: int) -> Any:
    """The two text encoders have different widths (32 and 40): equal widths confuse single-file loading."""
    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_embed_dim * 6 + 40,
        cross_attention_dim=32 + 40,
        norm_num_groups=32,
    )
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _tokenizer(Path(scratch) / "tokenizer", pad_token=EOS_TOKEN)
        tokenizer_2 = _tokenizer(Path(scratch) / "tokenizer_2", pad_token="!")
    scheduler = EulerDiscreteScheduler.from_pretrained(
        str(SHIPPED_CONFIGS / "sdxl"), subfolder="scheduler", local_files_only=True
    )
    vae = _tiny_vae(seed=seed + 100)
    vae.register_to_config(scaling_factor=0.13025)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_tiny_text_encoder(seed=seed + 200, width=32, with_projection=False),
        text_encoder_2=_tiny_text_encoder(seed=seed + 300, width=40, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


# ------------------------------------------------------------------------------------------------------ writers


def _write_diffusers(pipe: Any, folder: Path) -> None:
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging), safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _write_single_file(pipe: Any, path: Path, architecture: str) -> None:
    """The weights in A1111's LDM layout, and beside them the configs only (no weights) as `<stem>.config/`."""
    save_single_file(pipeline_to_ldm_state_dict(pipe, architecture=architecture), path)
    config_folder = path.with_name(path.stem + CONFIG_FOLDER_SUFFIX)
    with tempfile.TemporaryDirectory() as scratch:
        pipe.save_pretrained(scratch, safe_serialization=True)
        shutil.rmtree(config_folder, ignore_errors=True)
        shutil.copytree(scratch, config_folder, ignore=shutil.ignore_patterns(*(f"*{s}" for s in _WEIGHT_SUFFIXES)))


def _write_lora(pipe: Any, path: Path, *, seed: int) -> None:
    """A rank-4 LoRA on the tiny SD1 UNet's attention and text encoder, with non-zero random up weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet_config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    text_config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False
    )
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    peft_state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder).items()})
    # Written in kohya naming (lora_unet_*, lora_te_*), the format A1111 users' LoRA files have.
    save_single_file(peft_lora_to_kohya(peft_state, alpha=4), path, metadata={"ss_output_name": TINY_LORA})


def _write_vae(vae: Any, path: Path) -> None:
    """A standalone VAE in A1111's layout (encoder.*, decoder.*, quant_conv.*), shaped like the tiny SD1 VAE."""
    save_single_file(vae_to_ldm(vae, prefix=""), path)
