"""The models folder: scanning, A1111 titles and hashes, aliases, architecture detection, and what is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sd_core.architectures import Family, Prediction, detect_single_file
from sd_core.checkpoints import CheckpointFormat, CheckpointRegistry, read_safetensors_header, resolve_inside
from sd_core.config import CoreConfig
from sd_core.errors import CheckpointNotFoundError, CheckpointRefusedError
from sd_core.loader import load_model
from sd_core.tiny import TinyModelFiles


@pytest.fixture
def models_copy(tiny_models_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny models folder that a test may change."""
    target = tmp_path / "models"
    shutil.copytree(tiny_models_dir, target)
    return target


def _registry(models_dir: Path, **config: Any) -> CheckpointRegistry:
    return CheckpointRegistry(
        CoreConfig(models_dir=models_dir, device="cpu", cache_dir=models_dir / ".cache", **config)
    )


def test_it_lists_single_files_and_diffusers_folders_with_a1111_titles(
    tiny_models_dir: Path, tiny_files: TinyModelFiles
):
    registry = _registry(tiny_models_dir)
    by_name = {info.name: info for info in registry.checkpoints()}
    assert set(by_name) == {
        "tiny-sd1.safetensors",
        "tiny-sd1-diffusers",
        "tiny-sdxl.safetensors",
        "tiny-sdxl-diffusers",
    }
    sd1 = by_name["tiny-sd1.safetensors"]
    expected = hashlib.sha256(tiny_files.sd1_single_file.read_bytes()).hexdigest()
    assert sd1.sha256 == expected
    assert sd1.title == f"tiny-sd1.safetensors [{expected[:10]}]"
    assert sd1.model_name == "tiny-sd1"
    assert sd1.format is CheckpointFormat.SINGLE_FILE
    assert by_name["tiny-sdxl-diffusers"].format is CheckpointFormat.DIFFUSERS


def test_it_detects_the_architecture_of_the_tiny_models(tiny_models_dir: Path):
    families = {info.name: info.architecture.family for info in _registry(tiny_models_dir).checkpoints()}
    assert families["tiny-sd1.safetensors"] is Family.SD1
    assert families["tiny-sd1-diffusers"] is Family.SD1
    assert families["tiny-sdxl.safetensors"] is Family.SDXL
    assert families["tiny-sdxl-diffusers"] is Family.SDXL


def test_it_detects_sd2_and_inpainting_from_tensor_names_and_shapes():
    sd2 = {
        "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
        "cond_stage_model.model.ln_final.weight": [1024],
    }
    assert detect_single_file(sd2).family is Family.SD2
    assert detect_single_file(sd2).prediction is Prediction.V
    assert detect_single_file(sd2, v_prediction_hint=False).prediction is Prediction.EPSILON
    inpainting = {
        "model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3],
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
    }
    assert detect_single_file(inpainting).inpainting
    with pytest.raises(CheckpointRefusedError, match="refiner"):
        detect_single_file(
            {
                "model.diffusion_model.input_blocks.0.0.weight": [384, 4, 3, 3],
                "conditioner.embedders.0.model.ln_final.weight": [1280],
            }
        )


def test_it_caches_the_hash_in_a_sidecar_file(models_copy: Path):
    _registry(models_copy)
    sidecar = models_copy / "Stable-diffusion" / "tiny-sd1.safetensors.sha256.json"
    assert sidecar.is_file()
    cached = json.loads(sidecar.read_text())
    key = next(iter(cached))
    cached[key] = "f" * 64  # a changed cache value proves the second scan reads the sidecar instead of rehashing
    sidecar.write_text(json.dumps(cached))
    titles = [info.title for info in _registry(models_copy).checkpoints()]
    assert "tiny-sd1.safetensors [ffffffffff]" in titles


def test_it_resolves_every_a1111_alias(tiny_models_dir: Path):
    registry = _registry(tiny_models_dir)
    info = registry.resolve("tiny-sd1.safetensors")
    for alias in (
        info.title,
        "tiny-sd1",
        info.shorthash,
        info.sha256,
        f"tiny-sd1 [{info.shorthash}]",
        info.legacy_hash,
    ):
        assert registry.resolve(alias) == info


def test_it_names_the_field_and_lists_titles_for_an_unknown_model(tiny_models_dir: Path):
    registry = _registry(tiny_models_dir)
    with pytest.raises(CheckpointNotFoundError) as caught:
        registry.resolve("nope.safetensors")
    assert caught.value.field == "sd_model_checkpoint"
    assert any(title.startswith("tiny-sd1.safetensors [") for title in caught.value.valid_values)


def test_it_refuses_paths_outside_the_models_folder(tiny_models_dir: Path):
    registry = _registry(tiny_models_dir)
    for name in ("../../etc/passwd", "/etc/passwd", "Stable-diffusion/../../x.safetensors"):
        with pytest.raises(CheckpointNotFoundError):
            registry.resolve(name)
    with pytest.raises(CheckpointRefusedError, match="outside"):
        resolve_inside(tiny_models_dir / "Lora", "../../../etc/passwd")
    assert registry.find_lora("../Stable-diffusion/tiny-sd1") is None


def test_it_refuses_pickle_checkpoints_unless_allowed(models_copy: Path, tiny_files: TinyModelFiles):
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(3, 2),
    }
    torch.save({"state_dict": state}, models_copy / "Stable-diffusion" / "pickled.ckpt")
    names = [info.name for info in _registry(models_copy).checkpoints()]
    assert "pickled.ckpt" not in names
    allowed = _registry(models_copy, allow_pickle=True)
    assert allowed.resolve("pickled.ckpt").architecture.family is Family.SD1


def test_it_refuses_an_oversized_safetensors_header_before_reading_it(tmp_path: Path):
    bogus = tmp_path / "huge-header.safetensors"
    bogus.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointRefusedError, match="exceeds the cap"):
        read_safetensors_header(bogus, max_header_bytes=100 * 1024 * 1024)


def test_it_skips_corrupt_and_foreign_files_while_listing_the_rest(models_copy: Path):
    folder = models_copy / "Stable-diffusion"
    (folder / "huge-header.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    (folder / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"some.other.weight": torch.zeros(2)}, str(folder / "not-sd.safetensors"))
    names = [info.name for info in _registry(models_copy).checkpoints()]
    assert "tiny-sd1.safetensors" in names
    assert not {"huge-header.safetensors", "garbage.safetensors", "not-sd.safetensors"} & set(names)


def test_it_loads_the_single_file_offline_through_the_shipped_config_when_no_sibling_config_exists(models_copy: Path):
    """A real A1111 file has no `<stem>.config/`: the shipped SD1 folder and full CLIP vocab are used.
    The tiny weights do not fit the full-size config, so the load must fail cleanly, naming the file."""
    shutil.rmtree(models_copy / "Stable-diffusion" / "tiny-sd1.config")
    registry = _registry(models_copy)
    info = registry.resolve("tiny-sd1.safetensors")
    assert info.config_folder is None
    with pytest.raises(CheckpointRefusedError, match=r"tiny-sd1\.safetensors"):
        load_model(info, None, registry.config)
    shipped = registry.config.work_dir / "configs" / "sd1"
    assert (shipped / "tokenizer" / "vocab.json").is_file()
    assert (shipped / "unet" / "config.json").is_file()


def test_it_lists_vaes_and_loras_with_a1111_hashes(tiny_models_dir: Path, tiny_files: TinyModelFiles):
    registry = _registry(tiny_models_dir)
    [vae] = registry.vaes()
    assert vae.name == "tiny-vae.safetensors"
    assert vae.sha256 == hashlib.sha256(tiny_files.vae.read_bytes()).hexdigest()
    lora = registry.find_lora("tiny-lora")
    assert lora is not None
    raw = tiny_files.lora.read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    assert lora.sha256 == hashlib.sha256(raw[header_end:]).hexdigest()
    assert registry.resolve_vae("Automatic") is None
    with pytest.raises(CheckpointNotFoundError) as caught:
        registry.resolve_vae("missing-vae")
    assert caught.value.field == "sd_vae"
