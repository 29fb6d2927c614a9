"""The node's A1111 endpoints other than generation: options, model and sampler listings, refreshes, png-info, memory,
cmd-flags, and the listings of what the node does not have (scripts, embeddings, face restorers, ...)."""

from __future__ import annotations

import json
import os
from typing import Any

import psutil
import torch
from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from gpu_node.identity import NodeAPIView, StaffPermission, TokenModePermission, current_user
from gpu_node.options import get_options, set_options
from gpu_node.runtime import core_config, get_engine
from gpu_node.serializers import PngInfoRequestSerializer, request_body
from sd_core.checkpoints import AuxiliaryModel, CheckpointInfo
from sd_core.generate import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS
from sd_core.infotext import parse_infotext, read_image_metadata
from sd_core.samplers import samplers_listing, schedulers_listing

PIXEL_UPSCALER_SCALE = 4
"""What A1111 reports as the scale of its built-in None/Lanczos/Nearest upscalers."""


class AdminView(NodeAPIView):
    """Rescans and model unloading: staff only in token mode."""

    permission_classes = [TokenModePermission, StaffPermission]


# ---------------------------------------------------------------------------------------------------- options


class OptionsView(NodeAPIView):
    """GET: the caller's options (every A1111 key). POST: set some of them for the caller (`?global=1`: for
    everyone, staff only in token mode); answers `null` like A1111."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(get_options(current_user(request).name))

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses={200: None},
        parameters=[OpenApiParameter("global", bool, description="node-wide defaults (staff only in token mode)")],
    )
    def post(self, request: Request) -> Response:
        node_wide = request.query_params.get("global", "").lower() in ("1", "true", "yes")
        set_options(current_user(request), request_body(request), node_wide=node_wide)
        return Response(None)


# --------------------------------------------------------------------------------------------------- models


def checkpoint_item(info: CheckpointInfo) -> dict[str, Any]:
    return {
        "title": info.title,
        "model_name": info.model_name,
        "hash": info.shorthash,
        "sha256": info.sha256,
        "filename": str(info.filename),
        "config": None,
    }


def lora_item(lora: AuxiliaryModel) -> dict[str, Any]:
    """A1111's Lora extension item; metadata values holding JSON objects are decoded, as it does."""
    name = lora.name.rsplit(".", 1)[0]
    metadata: dict[str, Any] = {}
    for key, value in lora.metadata.items():
        try:
            metadata[key] = json.loads(value) if value.startswith("{") else value
        except json.JSONDecodeError:
            metadata[key] = value
    return {"name": name, "alias": lora.metadata.get("ss_output_name") or name, "path": str(lora.filename),
            "metadata": metadata}  # fmt: skip


class SdModelsView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response([checkpoint_item(info) for info in get_engine().registry.checkpoints()])


class SdVaeView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        vaes = get_engine().registry.vaes()
        return Response([{"model_name": vae.name, "filename": str(vae.filename)} for vae in vaes])


class LorasView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response([lora_item(lora) for lora in get_engine().registry.loras()])


class RefreshModelsView(AdminView):
    """refresh-checkpoints, refresh-vae, refresh-loras: one rescan of the models folder (hashes new files)."""

    @extend_schema(request=None, responses={200: None})
    def post(self, request: Request) -> Response:
        get_engine().registry.refresh()
        return Response(None)


class UnloadCheckpointView(AdminView):
    """Frees every model not in use; models load again on demand."""

    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request) -> Response:
        get_engine().pool.unload_all()
        return Response({})


class ReloadCheckpointView(AdminView):
    """A1111 loads its one model back; our models load on demand, per request, so there is nothing to do."""

    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request) -> Response:
        return Response({})


# ----------------------------------------------------------------------------------------- samplers, upscalers


class SamplersView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(samplers_listing())


class SchedulersView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(schedulers_listing())


class UpscalersView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(
            [
                {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": PIXEL_UPSCALER_SCALE}
                for name in PIXEL_UPSCALERS
            ]
        )


class LatentUpscaleModesView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response([{"name": name} for name in LATENT_UPSCALE_MODES])


# --------------------------------------------------------------------------------------- what the node lacks


class StaticView(NodeAPIView):
    """An endpoint whose answer never changes: a listing of something the node does not have, or a no-op."""

    body: Any = None

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(self.body)


class NoOpView(NodeAPIView):
    """A POST A1111 answers with `null` that has nothing to do here (refresh-embeddings: no embeddings yet)."""

    @extend_schema(request=None, responses={200: None})
    def post(self, request: Request) -> Response:
        return Response(None)


class UnknownEndpointView(NodeAPIView):
    """Mounted last for `sdapi/` paths: FastAPI's JSON 404 `{"detail": "Not Found"}` instead of Django's page. Like
    FastAPI, an unknown path is a 404 before any login is checked."""

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []
    schema = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        raise NotFound()


# ---------------------------------------------------------------------------------------------- png-info


class PngInfoView(NodeAPIView):
    """The infotext of an image (PNG text chunk, EXIF UserComment, GIF comment, NovelAI), raw and parsed."""

    @extend_schema(request=PngInfoRequestSerializer, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request) -> Response:
        serializer = PngInfoRequestSerializer(data=request_body(request))
        serializer.is_valid(raise_exception=True)
        image: bytes | None = serializer.validated_data["image"]
        if image is None:
            return Response({"info": "", "items": {}, "parameters": {}})
        metadata = read_image_metadata(image)
        return Response({"info": metadata.infotext, "items": metadata.items,
                         "parameters": parse_infotext(metadata.infotext)})  # fmt: skip


# ------------------------------------------------------------------------------------------- memory, flags


class MemoryView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response({"ram": ram_usage(), "cuda": cuda_usage()})


def ram_usage() -> dict[str, Any]:
    """A1111's figures: `used` is this process's resident memory, `total` the machine's, `free` the difference."""
    try:
        used = psutil.Process(os.getpid()).memory_info().rss
        total = psutil.virtual_memory().total
    except psutil.Error as error:
        return {"error": str(error)}
    return {"free": total - used, "used": used, "total": total}


def cuda_usage() -> dict[str, Any]:
    """A1111's CUDA figures for the node's device, or `{"error": "unavailable"}` without CUDA."""
    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    try:
        device = core_config().torch_device()
        if device.type != "cuda":
            return {"error": "unavailable"}
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
    except RuntimeError as error:
        return {"error": str(error)}

    def pair(name: str) -> dict[str, int]:
        return {"current": int(stats.get(f"{name}.all.current", 0)), "peak": int(stats.get(f"{name}.all.peak", 0))}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": int(stats.get("num_alloc_retries", 0)), "oom": int(stats.get("num_ooms", 0))},
    }


class CmdFlagsView(NodeAPIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(cmd_flags())


def cmd_flags() -> dict[str, Any]:
    """A1111's command-line flags as this node would have them, plus the node's limits (`sd_*`). Built from a fixed
    list of settings: secrets (SD_NODE_SECRET, SD_WEBHOOK_SECRET, DJANGO_SECRET_KEY, DATABASE_URL, credentials)
    never appear, and `api_auth` is never the credentials A1111 would show."""
    config = core_config()
    cpu = config.torch_device().type == "cpu"
    return {
        "api": True,
        "nowebui": True,
        "api_auth": None,
        "api_log": True,
        "api_server_stop": False,
        "listen": False,
        "port": None,
        "share": False,
        "data_dir": str(settings.BASE_DIR),
        "models_dir": str(config.models_dir),
        "ckpt_dir": str(config.checkpoints_dir),
        "ckpt": None,
        "vae_dir": str(config.vae_dir),
        "lora_dir": str(config.lora_dir),
        "embeddings_dir": str(config.embeddings_dir),
        "hypernetwork_dir": None,
        "disable_safe_unpickle": config.allow_pickle,
        "no_hashing": False,
        "no_half": config.torch_dtype() == torch.float32,
        "precision": "full" if config.torch_dtype() == torch.float32 else "autocast",
        "use_cpu": ["all"] if cpu else [],
        "skip_torch_cuda_test": cpu,
        "device_id": str(config.torch_device().index) if config.torch_device().index is not None else None,
        "lowvram": False,
        "medvram": False,
        "xformers": False,
        "freeze_settings": False,
        "hide_ui_dir_config": True,
        "enable_insecure_extension_access": False,
        "cors_allow_origins": ",".join(settings.CORS_ALLOWED_ORIGINS) or None,
        "sd_role": settings.SD_ROLE,
        "sd_auth": settings.SD_AUTH,
        "sd_node_id": settings.SD_NODE_ID,
        "sd_device": settings.SD_DEVICE,
        "sd_dtype": settings.SD_DTYPE,
        "sd_max_pixels": settings.SD_MAX_PIXELS,
        "sd_max_steps": settings.SD_MAX_STEPS,
        "sd_max_batch": settings.SD_MAX_BATCH,
        "sd_max_queue": settings.SD_MAX_QUEUE,
        "sd_max_queued_per_user": settings.SD_MAX_QUEUED_PER_USER,
        "sd_max_image_bytes": settings.SD_MAX_IMAGE_BYTES,
        "sd_version": settings.SD_VERSION,
    }
