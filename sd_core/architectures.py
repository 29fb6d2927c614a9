"""Which Stable Diffusion architecture a checkpoint is, told from its tensor names and shapes, and the offline
diffusers config folder each one loads with (shipped in sd_core/model_configs, tokenizer files derived at first use).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sd_core.clip_vocab import EOS_TOKEN, write_tokenizer_folder
from sd_core.errors import CheckpointRefusedError

SHIPPED_CONFIGS = Path(__file__).with_name("model_configs")


class Family(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


class Prediction(StrEnum):
    EPSILON = "epsilon"
    V = "v_prediction"


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """A checkpoint's family, what its UNet predicts, and whether it is an inpainting (9-channel) model."""

    family: Family
    prediction: Prediction = Prediction.EPSILON
    inpainting: bool = False

    @property
    def shipped_config(self) -> str:
        if self.family is Family.SD2 and self.prediction is Prediction.V:
            return "sd2-v"
        return self.family.value

    @property
    def label(self) -> str:
        text = {Family.SD1: "SD1.x", Family.SD2: "SD2.x", Family.SDXL: "SDXL"}[self.family]
        if self.prediction is Prediction.V:
            text += " v-prediction"
        return text + (" inpainting" if self.inpainting else "")


# Tensor names that only one family has (A1111/LDM single-file layout).
_SDXL_KEY = "conditioner.embedders.1.model.ln_final.weight"
_SDXL_REFINER_KEY = "conditioner.embedders.0.model.ln_final.weight"
_SD2_KEY = "cond_stage_model.model.ln_final.weight"
_SD1_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.embeddings.token_embedding.weight",
)
_UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def detect_single_file(shapes: Mapping[str, Sequence[int]], *, v_prediction_hint: bool | None = None) -> Architecture:
    """Tell the architecture from a single-file checkpoint's tensor names and shapes (no weights needed).

    1. SDXL base has two text encoders under `conditioner.embedders`; a refiner (encoder 1 only) is refused.
    2. SD2.x has an OpenCLIP encoder under `cond_stage_model.model`;
       SD1.x a CLIP-L under `cond_stage_model.transformer`.
    3. A 9-channel first UNet convolution means an inpainting model.
    4. SD2 epsilon vs v-prediction cannot be told from shapes: `v_prediction_hint` (from a sibling .yaml or
       config folder) decides, and without one SD2 is taken as v-prediction, like the 768-v and 2.1 releases.
    """
    input_shape = shapes.get(_UNET_INPUT_KEY)
    if input_shape is None:
        raise CheckpointRefusedError(f"not a Stable Diffusion checkpoint: no UNet tensor '{_UNET_INPUT_KEY}'")
    inpainting = len(input_shape) > 1 and input_shape[1] == 9
    if _SDXL_KEY in shapes:
        return Architecture(family=Family.SDXL, inpainting=inpainting)
    if _SDXL_REFINER_KEY in shapes:
        raise CheckpointRefusedError("SDXL refiner checkpoints are not supported (use an SDXL base model)")
    if _SD2_KEY in shapes:
        prediction = Prediction.EPSILON if v_prediction_hint is False else Prediction.V
        return Architecture(family=Family.SD2, prediction=prediction, inpainting=inpainting)
    if any(key in shapes for key in _SD1_KEYS):
        return Architecture(family=Family.SD1, inpainting=inpainting)
    raise CheckpointRefusedError("unknown checkpoint architecture: no SD1.x, SD2.x or SDXL text encoder tensors found")


def detect_config_folder(folder: Path) -> Architecture:
    """Tell the architecture of a diffusers-format folder from its model_index.json and component configs."""
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    class_name = str(index.get("_class_name", ""))
    inpainting = unet.get("in_channels") == 9
    prediction = Prediction.V if scheduler.get("prediction_type") == "v_prediction" else Prediction.EPSILON
    if "XL" in class_name or "text_encoder_2" in index:
        if index.get("text_encoder") in (None, [None, None]):
            raise CheckpointRefusedError(f"{folder.name}: SDXL refiner models are not supported")
        return Architecture(family=Family.SDXL, prediction=prediction, inpainting=inpainting)
    text_encoder = _read_json(folder / "text_encoder" / "config.json")
    family = Family.SD2 if text_encoder.get("hidden_size") == 1024 else Family.SD1
    return Architecture(family=family, prediction=prediction, inpainting=inpainting)


def yaml_v_prediction_hint(yaml_path: Path) -> bool | None:
    """A1111 accepts a sibling .yaml: `parameterization: "v"` there means v-prediction."""
    if not yaml_path.is_file():
        return None
    text = yaml_path.read_text(encoding="utf-8", errors="replace")
    return "parameterization" in text and ('"v"' in text or "'v'" in text or ": v\n" in text)


_materialize_lock = threading.Lock()


def shipped_config_folder(architecture: Architecture, work_dir: Path) -> Path:
    """The offline diffusers config folder for `architecture`, materialized once under `work_dir`.

    It is the shipped JSON configs plus full CLIP tokenizer files derived from the bundled BPE vocabulary;
    inpainting variants get a 9-channel UNet config.
    """
    name = architecture.shipped_config + ("-inpainting" if architecture.inpainting else "")
    target = work_dir / "configs" / name
    with _materialize_lock:
        if (target / ".complete").is_file():
            return target
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(SHIPPED_CONFIGS / architecture.shipped_config, staging)
        # OpenCLIP encoders (SD2's, SDXL's second) pad with "!"; CLIP-L pads with its end token.
        first_pad = "!" if architecture.family is Family.SD2 else EOS_TOKEN
        write_tokenizer_folder(staging / "tokenizer", pad_token=first_pad)
        if architecture.family is Family.SDXL:
            write_tokenizer_folder(staging / "tokenizer_2", pad_token="!")
        if architecture.inpainting:
            _patch_json(staging / "unet" / "config.json", in_channels=9)
            pipeline = "StableDiffusionXLInpaintPipeline" if architecture.family is Family.SDXL else None
            _patch_json(staging / "model_index.json", _class_name=pipeline or "StableDiffusionInpaintPipeline")
        (staging / ".complete").write_text("ok\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointRefusedError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointRefusedError(f"{path} is not a JSON object")
    return data


def _patch_json(path: Path, **values: object) -> None:
    data = _read_json(path)
    data.update(values)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
