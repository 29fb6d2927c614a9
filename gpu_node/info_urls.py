"""URLs of the node's A1111 endpoints other than generation (gpu_node/urls.py includes them at the site root)."""

from __future__ import annotations

from django.urls import URLPattern, path

from gpu_node import info_views as views

urlpatterns: list[URLPattern] = [
    path("sdapi/v1/options", views.OptionsView.as_view(), name="options"),
    path("sdapi/v1/sd-models", views.SdModelsView.as_view(), name="sd-models"),
    path("sdapi/v1/sd-vae", views.SdVaeView.as_view(), name="sd-vae"),
    path("sdapi/v1/loras", views.LorasView.as_view(), name="loras"),
    path("sdapi/v1/refresh-checkpoints", views.RefreshModelsView.as_view(), name="refresh-checkpoints"),
    path("sdapi/v1/refresh-vae", views.RefreshModelsView.as_view(), name="refresh-vae"),
    path("sdapi/v1/refresh-loras", views.RefreshModelsView.as_view(), name="refresh-loras"),
    path("sdapi/v1/refresh-embeddings", views.NoOpView.as_view(), name="refresh-embeddings"),
    path("sdapi/v1/unload-checkpoint", views.UnloadCheckpointView.as_view(), name="unload-checkpoint"),
    path("sdapi/v1/reload-checkpoint", views.ReloadCheckpointView.as_view(), name="reload-checkpoint"),
    path("sdapi/v1/samplers", views.SamplersView.as_view(), name="samplers"),
    path("sdapi/v1/schedulers", views.SchedulersView.as_view(), name="schedulers"),
    path("sdapi/v1/upscalers", views.UpscalersView.as_view(), name="upscalers"),
    path("sdapi/v1/latent-upscale-modes", views.LatentUpscaleModesView.as_view(), name="latent-upscale-modes"),
    path("sdapi/v1/png-info", views.PngInfoView.as_view(), name="png-info"),
    path("sdapi/v1/memory", views.MemoryView.as_view(), name="memory"),
    path("sdapi/v1/cmd-flags", views.CmdFlagsView.as_view(), name="cmd-flags"),
    # Textual inversion, hypernetworks, face restoration, ESRGAN, styles, extensions and scripts: none on this node.
    path("sdapi/v1/embeddings", views.StaticView.as_view(body={"loaded": {}, "skipped": {}}), name="embeddings"),
    path("sdapi/v1/hypernetworks", views.StaticView.as_view(body=[]), name="hypernetworks"),
    path("sdapi/v1/face-restorers", views.StaticView.as_view(body=[]), name="face-restorers"),
    path("sdapi/v1/realesrgan-models", views.StaticView.as_view(body=[]), name="realesrgan-models"),
    path("sdapi/v1/prompt-styles", views.StaticView.as_view(body=[]), name="prompt-styles"),
    path("sdapi/v1/extensions", views.StaticView.as_view(body=[]), name="extensions"),
    path("sdapi/v1/scripts", views.StaticView.as_view(body={"txt2img": [], "img2img": []}), name="scripts"),
    path("sdapi/v1/script-info", views.StaticView.as_view(body=[]), name="script-info"),
]
