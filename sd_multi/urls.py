"""Site URLs: the apps SD_ROLE serves, the admin, the OpenAPI schema and its docs page."""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import URLPattern, URLResolver, include, path, re_path
from django.views.generic import TemplateView
from drf_spectacular.views import SpectacularJSONAPIView

urlpatterns: list[URLPattern | URLResolver] = [
    path("admin/", admin.site.urls),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    # A local page rather than Swagger UI: deployments may be offline, and Swagger UI would come from a CDN.
    path("docs", TemplateView.as_view(template_name="sd_multi/docs.html"), name="api-docs"),
]

# In `all` the node comes first: it answers the A1111 API itself, and the balancer adds what only it has.
if settings.SD_NODE_ENABLED:
    urlpatterns.append(path("", include("gpu_node.urls")))
if settings.SD_BALANCER_ENABLED:
    urlpatterns.append(path("", include("balancer.urls")))

if settings.SD_NODE_ENABLED or settings.SD_BALANCER_ENABLED:
    from gpu_node.info_views import UnknownEndpointView

    # Last: an unknown A1111 path gets FastAPI's JSON 404, not Django's HTML page.
    urlpatterns.append(re_path(r"^sdapi/", UnknownEndpointView.as_view()))

if settings.SD_SERVE_STATIC:
    # The app's own static files without collectstatic or a web server in front (the demo, one machine);
    # behind Apache, SD_SERVE_STATIC=0 and Apache serves STATIC_ROOT.
    urlpatterns.append(re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}))
