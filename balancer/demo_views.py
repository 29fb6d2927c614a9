"""The /multi_demo/ browser page, its login and logout pages (token mode), and its JSON gallery: a user's finished
images with their parameters, and those images served to their owner (or to staff, in the everyone view)."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.views import LoginView, LogoutView, redirect_to_login
from django.http import FileResponse, HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import render
from django.urls import get_script_prefix, reverse
from django.views.decorators.csrf import ensure_csrf_cookie
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from balancer.gallery import (
    GalleryEntry,
    GalleryPage,
    GalleryPageError,
    gallery_page,
    image_for_viewer,
    page_number,
)
from balancer.models import Task
from balancer.tasks import TaskNotFound
from gpu_node.errors import RequestValidationError
from gpu_node.identity import NodeAPIView, current_user

USER_COOKIE = "sd_demo_user"
"""The open-mode identity of a browser: a random id the page makes once and sends as X-User-Id."""


# ------------------------------------------------------------------------------------------------------- pages


@ensure_csrf_cookie
def multi_demo(request: HttpRequest) -> HttpResponse:
    """GET /multi_demo/: the page. Token mode asks for a login first; open mode lets anyone in."""
    if settings.SD_AUTH == "token" and not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path(), login_url=reverse("multi-demo-login"))
    return render(request, "balancer/multi_demo.html", {"demo_config": page_config(request)})


def page_config(request: HttpRequest) -> dict[str, Any]:
    """What the page's script needs to know: who is logged in, the limits, and where the APIs are."""
    logged_in = request.user.is_authenticated
    sdapi = f"{get_script_prefix()}sdapi/v1"
    return {
        "auth": settings.SD_AUTH,
        "user": request.user.get_username() if logged_in else None,
        "isStaff": bool(logged_in and request.user.is_staff),
        "userCookie": USER_COOKIE,
        "csrfToken": get_token(request),
        "maxBatch": settings.SD_MAX_BATCH,
        "maxSteps": settings.SD_MAX_STEPS,
        "urls": {
            "tasks": reverse("tasks"),
            "status": reverse("balancer-status"),
            "gallery": reverse("multi-demo-gallery"),
            "models": f"{sdapi}/sd-models",
            "samplers": f"{sdapi}/samplers",
            "schedulers": f"{sdapi}/schedulers",
            "options": f"{sdapi}/options",
            "login": reverse("multi-demo-login"),
            "logout": reverse("multi-demo-logout"),
        },
    }


class DemoLoginView(LoginView):
    """Django's login page, back to the demo afterwards (or to `?next=`)."""

    template_name = "balancer/login.html"
    redirect_authenticated_user = True

    def get_default_redirect_url(self) -> str:
        return reverse("multi-demo")


class DemoLogoutView(LogoutView):
    """POST only (Django's rule): the page's logout button is a form with the CSRF token."""

    def get_default_redirect_url(self) -> str:
        return reverse("multi-demo")


# ----------------------------------------------------------------------------------------------------- gallery


class GalleryView(NodeAPIView):
    """GET /multi_demo/api/gallery?page=N[&scope=all]: the caller's finished images, newest first; `scope=all` shows
    everyone's, to staff only (403 otherwise)."""

    @extend_schema(
        operation_id="multi_demo_gallery",
        parameters=[OpenApiParameter("page", int), OpenApiParameter("scope", str, enum=["mine", "all"])],
        responses=dict[str, Any],
    )  # fmt: skip
    def get(self, request: Request) -> Response:
        user = current_user(request)
        everyone = _scope(request.query_params.get("scope")) == "all"
        if everyone and not user.is_staff:
            raise PermissionDenied("the everyone view of the gallery is for staff users")
        try:
            number = page_number(request.query_params.get("page"))
        except GalleryPageError as error:
            raise RequestValidationError.at(("query", "page"), str(error)) from None
        page = gallery_page(user=None if everyone else user.name, number=number, image_url=_image_url)
        return Response(page_document(page, everyone=everyone))


class GalleryImageView(NodeAPIView):
    """GET /multi_demo/api/images/<task id>/<name>: a gallery image, to its owner or to staff."""

    @extend_schema(operation_id="multi_demo_image", responses={(200, "image/png"): bytes})
    def get(self, request: Request, task_id: uuid.UUID, name: str) -> FileResponse:
        user = current_user(request)
        try:
            image = image_for_viewer(task_id, name, user=user.name, is_staff=user.is_staff)
        except TaskNotFound:
            raise NotFound() from None
        return FileResponse(image.file, content_type=image.content_type, filename=name)


def _scope(value: str | None) -> str:
    if value in (None, "", "mine", "all"):
        return value or "mine"
    raise RequestValidationError.at(("query", "scope"), f"scope must be mine or all, not {value!r}")


def _image_url(task: Task, name: str) -> str:
    return reverse("multi-demo-image", kwargs={"task_id": task.id, "name": name})


def page_document(page: GalleryPage, *, everyone: bool) -> dict[str, Any]:
    return {
        "page": page.number,
        "pages": page.pages,
        "count": page.count,
        "scope": "all" if everyone else "mine",
        "items": [entry_document(entry) for entry in page.entries],
    }


def entry_document(entry: GalleryEntry) -> dict[str, Any]:
    """One task of the gallery, in the task API's spelling (camelCase, ISO dates)."""
    return {
        "taskId": entry.task_id, "user": entry.user, "status": entry.status,
        "createdAt": entry.created_at.isoformat(),
        "finishedAt": entry.finished_at.isoformat() if entry.finished_at else None,
        "node": entry.node, "prompt": entry.prompt, "negativePrompt": entry.negative_prompt, "model": entry.model,
        "sampler": entry.sampler, "steps": entry.steps, "cfgScale": entry.cfg_scale, "width": entry.width,
        "height": entry.height,
        "images": [{"url": image.url, "seed": image.seed, "infotext": image.infotext} for image in entry.images],
    }  # fmt: skip
