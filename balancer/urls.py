"""URLs of the balancer app, mounted at the site root when SD_ROLE serves it (sd_multi/urls.py)."""

from __future__ import annotations

from django.conf import settings
from django.urls import URLPattern, URLResolver, include, path, re_path

from balancer import views

urlpatterns: list[URLPattern | URLResolver] = [
    # The A1111 API first: progress polls are most of the traffic, and each pattern tried costs a little.
    re_path(r"^sdapi/v1/.+$", views.api_proxy, name="balancer-api"),
    path("txt2img_v2/", views.api_proxy, name="balancer-txt2img-v2"),
    path("img2img_v2/", views.api_proxy, name="balancer-img2img-v2"),
    path("balancer/status", views.status, name="balancer-status"),
    path("balancer/metrics", views.metrics_view, name="balancer-metrics"),
    path("balancer/nodes/register", views.register_node, name="balancer-node-register"),
    path("balancer/nodes/<int:node_id>/drain", views.drain_node, {"draining": True}, name="balancer-node-drain"),
    path("balancer/nodes/<int:node_id>/undrain", views.drain_node, {"draining": False}, name="balancer-node-undrain"),
    path("", include("balancer.task_urls")),
    path("", include("balancer.demo_urls")),
]

if settings.SD_ROLE == "balancer":
    # In `all` the node's own /metrics comes first; the balancer's stays at /balancer/metrics in every role.
    urlpatterns.append(path("metrics", views.metrics_view, name="metrics"))
