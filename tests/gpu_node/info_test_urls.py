"""A URL conf for the info endpoint tests: gpu_node.info_urls alone, plus a view that shows who the node thinks the
caller is (identity tests) and one that raises what it is told to (exception handler tests)."""

from __future__ import annotations

from typing import Any

from django.urls import URLPattern, URLResolver, include, path, re_path
from rest_framework.request import Request
from rest_framework.response import Response

from gpu_node.identity import NodeAPIView, current_user
from gpu_node.info_views import UnknownEndpointView


class WhoAmIView(NodeAPIView):
    def get(self, request: Request) -> Response:
        user = current_user(request)
        return Response({"name": user.name, "is_staff": user.is_staff})

    def post(self, request: Request) -> Response:
        return self.get(request)


class RaiseView(NodeAPIView):
    """Raises `RaiseView.error` (set by the test)."""

    error: Exception = RuntimeError("boom")

    def get(self, request: Request) -> Any:
        raise type(self).error


urlpatterns: list[URLPattern | URLResolver] = [
    path("test/whoami", WhoAmIView.as_view()),
    path("test/raise", RaiseView.as_view()),
    path("", include("gpu_node.info_urls")),
    re_path(r"^sdapi/", UnknownEndpointView.as_view()),
]
