"""LoRA networks named in a prompt (`<lora:name:weight>`), applied to one generation only and removed after.

Adapters are never fused: unloading then restores the exact base weights (ENGINE_FACTS).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sd_core.checkpoints import AuxiliaryModel, CheckpointRegistry
from sd_core.prompts import ExtraNetworkCall

log = logging.getLogger(__name__)

_LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True, kw_only=True)
class AppliedLora:
    """A LoRA in use: its name as written in the prompt, its A1111 hash (12 hex) and multipliers."""

    name: str
    hash: str
    te_multiplier: float
    unet_multiplier: float


def find_loras(
    calls: Sequence[ExtraNetworkCall], registry: CheckpointRegistry
) -> list[tuple[ExtraNetworkCall, AuxiliaryModel]]:
    """The LoRA files for the prompt's calls. Unknown names are skipped with a warning, as A1111 does."""
    found: list[tuple[ExtraNetworkCall, AuxiliaryModel]] = []
    for call in calls:
        if call.kind not in _LORA_KINDS:
            log.warning("extra network <%s:%s> is not supported; ignored", call.kind, call.name)
            continue
        lora = registry.find_lora(call.name)
        if lora is None:
            log.warning("LoRA '%s' not found in the Lora folder; ignored", call.name)
            continue
        found.append((call, lora))
    return found


@contextmanager
def applied_loras(
    pipe: Any, loras: Sequence[tuple[ExtraNetworkCall, AuxiliaryModel]]
) -> Iterator[tuple[AppliedLora, ...]]:
    """Load the LoRAs as named adapters with their text-encoder/UNet multipliers; unload them afterwards."""
    if not loras:
        yield ()
        return
    names: list[str] = []
    weights: list[dict[str, float]] = []
    applied: list[AppliedLora] = []
    text_encoders = [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]
    try:
        for index, (call, lora) in enumerate(loras):
            adapter = f"lora{index}"
            try:
                pipe.load_lora_weights(str(lora.filename.parent), weight_name=lora.filename.name, adapter_name=adapter)
            except (ValueError, KeyError, RuntimeError, OSError) as error:
                # A1111 logs an incompatible network (e.g. an SD1 LoRA on SDXL) and generates without it.
                log.warning("LoRA %s does not fit this model; ignored: %s", lora.name, str(error).splitlines()[0])
                _delete_adapter(pipe, adapter)
                continue
            names.append(adapter)
            weights.append({"unet": call.unet_multiplier, **{te: call.te_multiplier for te in text_encoders}})
            applied.append(
                AppliedLora(
                    name=call.name,
                    hash=lora.sha256[:12],
                    te_multiplier=call.te_multiplier,
                    unet_multiplier=call.unet_multiplier,
                )
            )
        if names:
            pipe.set_adapters(names, adapter_weights=weights)
        yield tuple(applied)
    finally:
        pipe.unload_lora_weights()


def _delete_adapter(pipe: Any, adapter: str) -> None:
    try:
        pipe.delete_adapters(adapter)
    except (ValueError, KeyError, AttributeError):
        log.debug("adapter %s was not registered", adapter)
