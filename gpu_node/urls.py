"""URLs of the gpu_node app, mounted at the site root when SD_ROLE serves it (sd_multi/urls.py)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path

from gpu_node import generation_views as views

urlpatterns: list[URLPattern | URLResolver] = [
    path("sdapi/v1/txt2img", views.Txt2ImgView.as_view(), name="txt2img"),
    path("sdapi/v1/img2img", views.Img2ImgView.as_view(), name="img2img"),
    path("txt2img_v2/", views.Txt2ImgView.as_view(), name="txt2img-v2"),
    path("img2img_v2/", views.Img2ImgView.as_view(), name="img2img-v2"),
    path("sdapi/v1/progress", views.ProgressView.as_view(), name="progress"),
    path("sdapi/v1/interrupt", views.InterruptView.as_view(), name="interrupt"),
    path("sdapi/v1/skip", views.SkipView.as_view(), name="skip"),
    path("node/jobs", views.NodeJobsView.as_view(), name="node-jobs"),
    path("node/jobs/<str:job_id>", views.NodeJobView.as_view(), name="node-job"),
    path("node/jobs/<str:job_id>/cancel", views.NodeJobCancelView.as_view(), name="node-job-cancel"),
    path("node/health", views.HealthView.as_view(), name="node-health"),
    path("metrics", views.MetricsView.as_view(), name="node-metrics"),
    path("", include("gpu_node.info_urls")),
]
