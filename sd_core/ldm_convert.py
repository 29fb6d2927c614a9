"""Diffusers components -> original LDM key layout, as AUTOMATIC1111 single-file checkpoints use it.

The inverse of diffusers' `from_single_file` conversion, so our own tiny models can be written as real A1111 files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch

# Concrete modules, not the package root: mypy resolves `diffusers.X` to the torch-less dummy classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

ARCHITECTURES = ("sd1", "sd2", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED_PARTS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    # SDXL's size/crop conditioning and class-conditioned UNets share LDM's `label_emb` slot.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER_PREFIX = "text_model.encoder.layers."
_HF_TEXT_PROJECTION = "text_projection.weight"

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)
_PEFT_DOWN, _PEFT_UP = ".lora_A.weight", ".lora_B.weight"


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's weights under `model.diffusion_model.` with LDM block numbering."""
    module_map = _unet_module_map(unet)
    return {
        UNET_PREFIX + _rename(key, module_map, component="UNet"): tensor.detach()
        for key, tensor in unet.state_dict().items()
    }


def vae_to_ldm(vae: AutoencoderKL, *, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """The VAE's weights in LDM layout; `prefix=""` gives a standalone A1111 VAE file."""
    module_map = _vae_module_map(vae)
    converted = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = _rename(key, module_map, component="VAE")
        value = tensor.detach()
        # LDM's VAE attention projections are 1x1 convolutions, diffusers' are linear layers.
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        converted[prefix + ldm_key] = value
    return converted


def clip_l_to_ldm(text_encoder: nn.Module, *, prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI-CLIP text encoder keeps its Hugging Face keys (under `text_model.`), prefixed."""
    return {prefix + key: tensor for key, tensor in _hf_text_state_dict(text_encoder).items()}


def open_clip_to_ldm(text_encoder: nn.Module, *, prefix: str) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text encoder in OpenCLIP layout: fused qkv, `resblocks`, `ln_final`, `text_projection`."""
    hf_state = _hf_text_state_dict(text_encoder)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if key in _OPEN_CLIP_FIXED:
            converted[prefix + _OPEN_CLIP_FIXED[key]] = tensor
        elif key == _HF_TEXT_PROJECTION:
            # OpenCLIP applies the projection as `x @ text_projection`, Hugging Face as a Linear layer.
            converted[prefix + "text_projection"] = tensor.T.contiguous()
        elif key.startswith(_HF_LAYER_PREFIX):
            layer, _, rest = key.removeprefix(_HF_LAYER_PREFIX).partition(".")
            block = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                kind = rest.rsplit(".", 1)[1]
                if rest.startswith("self_attn.q_proj."):
                    fused = [hf_state[f"{_HF_LAYER_PREFIX}{layer}.self_attn.{name}_proj.{kind}"] for name in "qkv"]
                    converted[f"{block}attn.in_proj_{kind}"] = torch.cat(fused, dim=0)
                continue
            converted[block + _rename(rest, _OPEN_CLIP_LAYER_PARTS, component="text encoder")] = tensor
        else:
            raise ValueError(f"text encoder weight {key!r} has no OpenCLIP equivalent")
    return converted


def pipeline_to_ldm_state_dict(pipe: object, *, architecture: str) -> dict[str, torch.Tensor]:
    """One A1111 checkpoint state dict (UNet, VAE, text encoders) from a diffusers SD1/SD2/SDXL pipeline.

    SD2's encoder is OpenCLIP-H in the original; diffusers keeps one layer less (SD2 uses the penultimate
    layer) and no projection, and its single-file loader skips exactly those, so the layers present are written.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    state = unet_to_ldm(_component(pipe, "unet", UNet2DConditionModel))
    state |= vae_to_ldm(_component(pipe, "vae", AutoencoderKL))
    text_encoder = _component(pipe, "text_encoder", nn.Module)
    if architecture == "sd1":
        state |= clip_l_to_ldm(text_encoder, prefix=SD1_CLIP_PREFIX)
    elif architecture == "sd2":
        state |= open_clip_to_ldm(text_encoder, prefix=SD2_OPEN_CLIP_PREFIX)
    else:
        state |= clip_l_to_ldm(text_encoder, prefix=SDXL_CLIP_PREFIX)
        state |= open_clip_to_ldm(_component(pipe, "text_encoder_2", nn.Module), prefix=SDXL_OPEN_CLIP_PREFIX)
    return state


def save_single_file(
    state_dict: Mapping[str, torch.Tensor], path: Path, *, metadata: dict[str, str] | None = None
) -> None:
    """Write `state_dict` as one safetensors file (A1111 reads `format: pt` like torch's own writers)."""
    header = {"format": "pt"} | (metadata or {})
    save_file({key: tensor.detach().contiguous() for key, tensor in state_dict.items()}, str(path), metadata=header)


def peft_lora_to_kohya(
    state_dict: Mapping[str, torch.Tensor], *, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """A diffusers/peft LoRA in kohya naming (`lora_unet_*`, `lora_te_*`/`lora_te1_*`, `lora_te2_*`).

    1. Keys are those of a diffusers LoRA file: `unet.`, `text_encoder.` or `text_encoder_2.`, the module's
       diffusers path, then `.lora_A.weight`/`.lora_B.weight` (`get_peft_model_state_dict` output, prefixed).
    2. Each module becomes `<kohya prefix><path with "_" for ".">` with `.lora_down.weight`, `.lora_up.weight`
       and `.alpha`. UNet paths keep diffusers block names, as kohya's SD1 LoRAs do.
    3. peft keeps its `lora_alpha` in the adapter config, not in the weights: pass it as `alpha` (the
       default, the rank of each module, means a scale of 1).
    """
    has_second_encoder = any(key.startswith("text_encoder_2.") for key in state_dict)
    prefixes = {
        "unet.": "lora_unet_",
        "text_encoder_2.": "lora_te2_",
        "text_encoder.": "lora_te1_" if has_second_encoder else "lora_te_",
    }
    converted: dict[str, torch.Tensor] = {}
    for key, down in state_dict.items():
        if key.endswith(_PEFT_UP):
            if key.removesuffix(_PEFT_UP) + _PEFT_DOWN not in state_dict:
                raise ValueError(f"LoRA weight {key!r} has no matching {_PEFT_DOWN.lstrip('.')}")
            continue
        if not key.endswith(_PEFT_DOWN):
            raise ValueError(f"LoRA weight {key!r} is not a plain lora_A/lora_B weight (kohya has no DoRA or bias)")
        module_path = key.removesuffix(_PEFT_DOWN)
        component = next((prefix for prefix in prefixes if module_path.startswith(prefix)), None)
        if component is None:
            components = ", ".join(prefix.rstrip(".") for prefix in prefixes)
            raise ValueError(f"LoRA weight {key!r} must start with a component name ({components}) and a dot")
        path = module_path.removeprefix(component)
        if component != "unet." and not path.startswith(("text_model.", "text_projection")):
            path = "text_model." + path
        name = prefixes[component] + path.replace(".", "_")
        up_key = module_path + _PEFT_UP
        if up_key not in state_dict:
            raise ValueError(f"LoRA weight {key!r} has no matching {_PEFT_UP.lstrip('.')}")
        converted[f"{name}.lora_down.weight"] = down.detach()
        converted[f"{name}.lora_up.weight"] = state_dict[up_key].detach()
        converted[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    return converted


def _component(pipe: object, name: str, kind: type[_ModuleT]) -> _ModuleT:
    module = getattr(pipe, name, None)
    if not isinstance(module, kind):
        raise ValueError(f"the pipeline's {name} is not a {kind.__name__}: pass a diffusers Stable Diffusion pipeline")
    return module


def _rename(key: str, module_map: Mapping[str, str], *, component: str) -> str:
    """Replace the longest dotted prefix of `key` found in `module_map`; the rest is kept as is."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in module_map:
            return ".".join([module_map[head], *parts[cut:]])
    raise ValueError(f"{component} weight {key!r} has no LDM equivalent")


def _unet_module_map(unet: UNet2DConditionModel) -> dict[str, str]:
    """diffusers module path -> LDM module path.

    1. LDM numbers `input_blocks` flat: slot 0 is conv_in, then per down block `layers_per_block` slots of
       (resnet, attention) and one downsampler slot (none after the last block).
    2. `middle_block` is resnet, attention, resnet.
    3. `output_blocks` likewise hold `layers_per_block + 1` slots per up block; the upsampler joins the last
       slot after the resnet and attention.
    """
    layers = unet.config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("LDM layout needs the same layers_per_block for every block (an int)")
    module_map = dict(_UNET_FIXED_PARTS)
    for block_index, block in enumerate(unet.down_blocks):
        down, first = f"down_blocks.{block_index}", 1 + block_index * (layers + 1)
        for layer in range(_count(block, "resnets")):
            _map_unet_resnet(module_map, f"{down}.resnets.{layer}", f"input_blocks.{first + layer}.0")
            module_map[f"{down}.attentions.{layer}"] = f"input_blocks.{first + layer}.1"
        module_map[f"{down}.downsamplers.0.conv"] = f"input_blocks.{first + layers}.0.op"
    _map_unet_resnet(module_map, "mid_block.resnets.0", "middle_block.0")
    module_map["mid_block.attentions.0"] = "middle_block.1"
    _map_unet_resnet(module_map, "mid_block.resnets.1", "middle_block.2")
    for block_index, block in enumerate(unet.up_blocks):
        up, first = f"up_blocks.{block_index}", block_index * (layers + 1)
        for layer in range(_count(block, "resnets")):
            _map_unet_resnet(module_map, f"{up}.resnets.{layer}", f"output_blocks.{first + layer}.0")
            module_map[f"{up}.attentions.{layer}"] = f"output_blocks.{first + layer}.1"
        upsampler_slot = 2 if _count(block, "attentions") else 1
        module_map[f"{up}.upsamplers.0.conv"] = f"output_blocks.{first + layers}.{upsampler_slot}.conv"
    return module_map


def _count(block: nn.Module, name: str) -> int:
    children = getattr(block, name, None)
    return len(children) if isinstance(children, nn.ModuleList) else 0


def _map_unet_resnet(module_map: dict[str, str], diffusers_path: str, ldm_path: str) -> None:
    for diffusers_part, ldm_part in _UNET_RESNET_PARTS.items():
        module_map[f"{diffusers_path}.{diffusers_part}"] = f"{ldm_path}.{ldm_part}"


def _vae_module_map(vae: AutoencoderKL) -> dict[str, str]:
    """diffusers module path -> LDM module path; LDM numbers the decoder's `up` blocks from the bottom."""
    module_map = {
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }
    for coder in ("encoder", "decoder"):
        module_map |= {
            f"{coder}.conv_in": f"{coder}.conv_in",
            f"{coder}.conv_out": f"{coder}.conv_out",
            f"{coder}.conv_norm_out": f"{coder}.norm_out",
        }
        for index in range(2):
            _map_vae_resnet(module_map, f"{coder}.mid_block.resnets.{index}", f"{coder}.mid.block_{index + 1}")
        for diffusers_part, ldm_part in _VAE_ATTENTION_PARTS.items():
            module_map[f"{coder}.mid_block.attentions.0.{diffusers_part}"] = f"{coder}.mid.attn_1.{ldm_part}"
    for block_index, block in enumerate(vae.encoder.down_blocks):
        down, ldm_down = f"encoder.down_blocks.{block_index}", f"encoder.down.{block_index}"
        for layer in range(_count(block, "resnets")):
            _map_vae_resnet(module_map, f"{down}.resnets.{layer}", f"{ldm_down}.block.{layer}")
        module_map[f"{down}.downsamplers.0.conv"] = f"{ldm_down}.downsample.conv"
    up_blocks = vae.decoder.up_blocks
    for block_index, block in enumerate(up_blocks):
        up, ldm_up = f"decoder.up_blocks.{block_index}", f"decoder.up.{len(up_blocks) - 1 - block_index}"
        for layer in range(_count(block, "resnets")):
            _map_vae_resnet(module_map, f"{up}.resnets.{layer}", f"{ldm_up}.block.{layer}")
        module_map[f"{up}.upsamplers.0.conv"] = f"{ldm_up}.upsample.conv"
    return module_map


def _map_vae_resnet(module_map: dict[str, str], diffusers_path: str, ldm_path: str) -> None:
    for diffusers_part, ldm_part in _VAE_RESNET_PARTS.items():
        module_map[f"{diffusers_path}.{diffusers_part}"] = f"{ldm_path}.{ldm_part}"


def _hf_text_state_dict(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights keyed as `text_model.*` (plus `text_projection.weight`) whatever the class nesting.

    transformers 5.6+ flattened `CLIPTextModel` (no `text_model.` level) but not `CLIPTextModelWithProjection`;
    LDM files always carry the level.
    """
    state = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if key == _HF_TEXT_PROJECTION or key.startswith("text_model."):
            state[key] = tensor.detach()
        else:
            state["text_model." + key] = tensor.detach()
    return state
