"""The async task API: `POST /task`, `GET /task?taskId=` and `/task/<id>`, `POST /task/<id>/cancel`, and the result
images. Every view serves the task's owner only: anyone else gets 404, as if the task did not exist."""

from __future__ import annotations

import uuid
from typing import Any

from django.http import FileResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from balancer.dispatcher import ensure_dispatcher, wake_dispatcher
from balancer.node_client import get_node_client
from balancer.tasks import (
    TaskInputError,
    TaskNotFound,
    TooManyTasks,
    cancel_task,
    live_task_document,
    open_image,
    submit_task,
    task_document,
    task_for,
)
from gpu_node.errors import RequestValidationError, UserQueueFullError
from gpu_node.identity import NodeAPIView, current_user

TOO_MANY_TASKS_RETRY_AFTER = 10  # seconds: about one task's run on a GPU


class TaskAPIView(NodeAPIView):
    """Starts this process's dispatcher on its first request, and maps the task domain's errors once."""

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        ensure_dispatcher()

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, TaskInputError):
            location = ("body",) if exc.field == "body" else ("body", *exc.field.split("."))
            exc = RequestValidationError.at(location, exc.message)
        elif isinstance(exc, TaskNotFound):
            exc = NotFound("Task not found")
        elif isinstance(exc, TooManyTasks):
            exc = UserQueueFullError(retry_after=TOO_MANY_TASKS_RETRY_AFTER, detail=str(exc))
        return super().handle_exception(exc)


def base_url(request: Request) -> str:
    return request.build_absolute_uri("/").rstrip("/")


class TasksView(TaskAPIView):
    """POST /task {"api", "payload", "callback_url"?} -> 202 {"taskId"}; GET /task?taskId= -> the task document."""

    @extend_schema(operation_id="task_submit", request=dict[str, Any], responses={202: dict[str, Any]})
    def post(self, request: Request) -> Response:
        task = submit_task(user=current_user(request).name, body=request.data)
        wake_dispatcher()
        return Response({"taskId": str(task.id)}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        operation_id="task_by_query", parameters=[OpenApiParameter("taskId", str, required=True)],
        responses=dict[str, Any],
    )  # fmt: skip
    def get(self, request: Request) -> Response:
        task = task_for(current_user(request).name, request.query_params.get("taskId"))
        return Response(live_task_document(task, base_url=base_url(request), client=get_node_client()))


class TaskView(TaskAPIView):
    @extend_schema(operation_id="task_get", responses=dict[str, Any])
    def get(self, request: Request, task_id: uuid.UUID) -> Response:
        task = task_for(current_user(request).name, task_id)
        return Response(live_task_document(task, base_url=base_url(request), client=get_node_client()))


class TaskCancelView(TaskAPIView):
    """POST /task/<id>/cancel: a queued or running task becomes interrupted; a finished one stays as it is."""

    @extend_schema(operation_id="task_cancel", request=None, responses=dict[str, Any])
    def post(self, request: Request, task_id: uuid.UUID) -> Response:
        task = cancel_task(task_for(current_user(request).name, task_id), client=get_node_client())
        return Response(task_document(task, base_url=base_url(request)))


class TaskImageView(TaskAPIView):
    """GET /task/<id>/images/<name>: one result image, to the task's owner."""

    @extend_schema(operation_id="task_image", responses={(200, "image/png"): bytes})
    def get(self, request: Request, task_id: uuid.UUID, name: str) -> FileResponse:
        image = open_image(task_for(current_user(request).name, task_id), name)
        return FileResponse(image.file, content_type=image.content_type, filename=name)
