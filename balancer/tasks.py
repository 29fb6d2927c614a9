"""Async tasks (`/task`): submitting one, the task document its owner polls, cancelling, and storing a finished
node job's result exactly once (images through Django's default storage)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import requests
from django.conf import settings
from django.core.files.base import ContentFile, File
from django.core.files.storage import default_storage
from django.db.models import Count, Q
from django.utils import timezone

from balancer import metrics, webhooks
from balancer.models import Task, TaskApi, TaskStatus
from balancer.node_client import NodeClient, NodeUnreachable

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 64 * 1024**2  # what a task may keep in the database: a few init images, never a video
MAX_MODEL_TITLE = 300  # Task.model_title
IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


class TaskInputError(ValueError):
    """A submission we refuse; `field` is the body field at fault, dotted when nested (a 422 naming it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TaskNotFound(LookupError):
    """No such task for this user: another user's task is not found either."""


class TooManyTasks(RuntimeError):
    """The user already has SD_MAX_TASKS_PER_USER tasks queued or running (a 429 with Retry-After)."""


class ResultError(ValueError):
    """A node job's result that cannot be stored (its images do not decode)."""


@dataclass(frozen=True, kw_only=True)
class TaskImage:
    """One stored result image, opened for its owner."""

    file: File[bytes]
    content_type: str


# ------------------------------------------------------------------------------------------------------ submit


def submit_task(*, user: str, body: Any) -> Task:
    """Validate a `POST /task` body cheaply and queue the task. Full A1111 validation happens on the node.

    1. The body is a JSON object; `api` is one of TaskApi (an allow-list, never a path we forward).
    2. `payload` is a JSON object of at most MAX_PAYLOAD_BYTES; its override_settings, when given, an object.
    3. `callback_url`, when given, is an http(s) URL to a public address (webhooks.check_callback_url).
    4. The user has fewer than SD_MAX_TASKS_PER_USER tasks queued or running (TooManyTasks: one user cannot fill
       the queue for everyone; the dispatcher serves users in turn anyway).
    """
    if not isinstance(body, Mapping):
        raise TaskInputError("body", "must be a JSON object with api, payload and optionally callback_url")
    api = body.get("api")
    if api not in TaskApi.values:
        raise TaskInputError("api", f"must be one of {', '.join(TaskApi.values)}")
    payload = body.get("payload", {})
    if not isinstance(payload, Mapping):
        raise TaskInputError("payload", "must be a JSON object: the A1111 request body")
    if len(json.dumps(payload)) > MAX_PAYLOAD_BYTES:
        raise TaskInputError("payload", f"must be at most {MAX_PAYLOAD_BYTES} bytes")
    callback_url = body.get("callback_url") or ""
    if not isinstance(callback_url, str):
        raise TaskInputError("callback_url", "must be a string")
    if callback_url:
        try:
            webhooks.check_callback_url(callback_url, allow_private=settings.SD_WEBHOOK_ALLOW_PRIVATE)
        except webhooks.CallbackURLError as error:
            raise TaskInputError("callback_url", str(error)) from None
    if Task.objects.for_user(user).unfinished().count() >= settings.SD_MAX_TASKS_PER_USER:
        raise TooManyTasks(f"you have {settings.SD_MAX_TASKS_PER_USER} unfinished tasks; wait for one to finish")
    task = Task.objects.create(
        user=user, api=api, payload=dict(payload), callback_url=callback_url, model_title=requested_model(payload)
    )
    log.info("task %s queued user=%s api=%s model=%s", task.id, user, api, task.model_title or "(user's)")
    return task


def requested_model(payload: Mapping[str, Any]) -> str:
    overrides = payload.get("override_settings")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TaskInputError("payload.override_settings", "must be a JSON object")
    model = (overrides or {}).get("sd_model_checkpoint") or ""
    if not isinstance(model, str) or len(model) > MAX_MODEL_TITLE:
        raise TaskInputError(
            "payload.override_settings.sd_model_checkpoint",
            f"must be a checkpoint title of at most {MAX_MODEL_TITLE} characters",
        )
    return model


# ----------------------------------------------------------------------------------------------------- lookup


def task_for(user: str, task_id: str | uuid.UUID | None) -> Task:
    try:
        key = uuid.UUID(str(task_id))
    except ValueError:
        raise TaskNotFound(task_id) from None
    task = Task.objects.for_user(user).filter(id=key).first()
    if task is None:
        raise TaskNotFound(task_id)
    return task


def queue_position(task: Task) -> int | None:
    """1-based place among the balancer's queued tasks (oldest first); None once the task left the queue."""
    if task.status != TaskStatus.QUEUED:
        return None
    ahead = Q(created_at__lt=task.created_at) | Q(created_at=task.created_at, id__lt=task.id)
    return Task.objects.queued().filter(ahead).count() + 1


def image_url(task: Task, name: str, *, base_url: str) -> str:
    return f"{base_url}/task/{task.id}/images/{name.rsplit('/', 1)[-1]}"


def task_document(task: Task, *, base_url: str) -> dict[str, Any]:
    """What `GET /task/<id>` answers (and a webhook posts). Image URLs are absolute when `base_url` is given."""
    result = None
    if task.result is not None:
        result = {
            "images": [image_url(task, name, base_url=base_url) for name in task.image_names],
            "parameters": task.result.get("parameters", {}),
            "info": task.result.get("info", "{}"),
        }
    return {
        "taskId": str(task.id),
        "api": task.api,
        "status": task.status,
        "progress": task.progress,
        "queuePosition": queue_position(task),
        "result": result,
        "error": (task.error or None) if task.status != TaskStatus.SUCCEEDED else None,
        "createdAt": task.created_at.isoformat(),
        "startedAt": task.started_at.isoformat() if task.started_at else None,
        "finishedAt": task.finished_at.isoformat() if task.finished_at else None,
        "node": (task.result or {}).get("node"),
        "attempts": task.attempts,
    }


def live_task_document(task: Task, *, base_url: str, client: NodeClient) -> dict[str, Any]:
    """`task_document` plus, while the task runs, the live step, preview and ETA asked of its node (absent on any
    error: a poll must never fail because a node is slow)."""
    document = task_document(task, base_url=base_url)
    document.update(step=0, steps=0, preview=None, eta=None)
    if task.status != TaskStatus.RUNNING or not task.node_url:
        return document
    try:
        job = client.get_job(task.node_url, task.node_job_id)
    except (NodeUnreachable, requests.RequestException, ValueError):
        return document
    if not job or job.get("status") != "running":
        return document
    progress = float(job.get("progress") or 0.0)
    document.update(step=job.get("step", 0), steps=job.get("steps", 0), preview=job.get("preview"), progress=progress)
    if task.started_at is not None and progress > 0:
        elapsed = (timezone.now() - task.started_at).total_seconds()
        document["eta"] = max(0.0, elapsed / progress - elapsed)
    return document


def open_image(task: Task, name: str) -> TaskImage:
    """A result image of `task` by its file name; only names the task stored are served (no path games)."""
    stored = next((path for path in task.image_names if path.rsplit("/", 1)[-1] == name), None)
    if stored is None or not default_storage.exists(stored):
        raise TaskNotFound(name)
    suffix = stored.rsplit(".", 1)[-1].lower()
    return TaskImage(file=default_storage.open(stored, "rb"), content_type=IMAGE_TYPES.get(suffix, "image/png"))


# ----------------------------------------------------------------------------------------------------- cancel


def cancel_task(task: Task, *, client: NodeClient, now: datetime | None = None) -> Task:
    """The owner cancels: a queued or running task becomes interrupted at once; its node job is cancelled too."""
    if task.cancel(now=now or timezone.now()) and task.node_url:
        try:
            client.cancel_job(task.node_url, task.node_job_id)
        except (NodeUnreachable, requests.RequestException) as error:
            # Best effort: the dispatcher no longer polls it, so its result is never stored anyway.
            log.warning("task %s: cancelling its job on %s failed: %s", task.id, task.node_url, error)
    return task


# ------------------------------------------------------------------------------------------------ the result


def decode_images(images: Any) -> list[tuple[bytes, str]]:
    """Raw base64 images of a node job's result -> (bytes, file suffix)."""
    if not isinstance(images, list):
        raise ResultError("the node job's result has no image list")
    decoded: list[tuple[bytes, str]] = []
    for index, image in enumerate(images):
        try:
            data = base64.b64decode(str(image), validate=True)
        except (binascii.Error, ValueError) as error:
            raise ResultError(f"image {index} of the node job's result is not base64 ({error})") from None
        decoded.append((data, image_suffix(data)))
    return decoded


def image_suffix(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"


def store_result(task: Task, job: Mapping[str, Any], *, status: TaskStatus, now: datetime) -> bool:
    """Store a finished node job's result on its task, once. False when another execution (or a cancel) won.

    1. Decode the images first: nothing is written for a result that cannot be stored.
    2. Write them under `tasks/<id>/<n>.<ext>`; the names storage returns are what the task records.
    3. Finish the task with a conditional update (this attempt, still RUNNING); the loser deletes what it wrote,
       so a task never has two results.
    """
    result = job.get("result") or {}
    images = decode_images(result.get("images", []))
    if not Task.objects.running().filter(id=task.id, attempts=task.attempts).exists():
        return False
    names = [
        default_storage.save(f"tasks/{task.id}/{index}.{suffix}", ContentFile(data))
        for index, (data, suffix) in enumerate(images)
    ]
    stored = {"parameters": result.get("parameters", {}), "info": result.get("info", "{}"), "node": job.get("node")}
    if task.finish(status, now=now, result=stored, image_names=names):
        log.info(
            "task %s %s user=%s node=%s model=%s images=%d attempts=%d duration=%.2fs",
            task.id, status, task.user, task.node_url, task.model_title or "(user's)", len(names), task.attempts,
            (now - task.created_at).total_seconds(),
        )  # fmt: skip
        return True
    for name in names:
        default_storage.delete(name)
    return False


# --------------------------------------------------------------------------------------------------- retention

RETENTION_BATCH = 500  # tasks removed per call: a long backlog is cleared over several passes, never in one lock


def remove_expired_tasks(*, now: datetime) -> int:
    """Delete the tasks that finished more than SD_TASK_RETENTION seconds ago (0: keep them forever), with their
    stored images; a task whose webhook is still being delivered stays until the delivery ends."""
    if not settings.SD_TASK_RETENTION:
        return 0
    cutoff = now - timedelta(seconds=settings.SD_TASK_RETENTION)
    expired = list(Task.objects.expired(cutoff).values_list("id", "image_names")[:RETENTION_BATCH])
    for _task_id, image_names in expired:
        for name in image_names or ():
            default_storage.delete(name)
    removed, _ = Task.objects.filter(id__in=[task_id for task_id, _ in expired]).delete()
    if removed:
        log.info("removed %d finished task(s) older than %ds and their images", removed, settings.SD_TASK_RETENTION)
    return removed


# ---------------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True, kw_only=True)
class TaskCounts:
    """Tasks by status, and queued tasks per requested model ("" = the user's current model)."""

    by_status: dict[str, int]
    queued_by_model: dict[str, int]

    @property
    def queue_depth(self) -> int:
        return sum(self.queued_by_model.values())


def task_counts() -> TaskCounts:
    by_status = {status.value: 0 for status in TaskStatus}
    for row in Task.objects.values("status").annotate(count=Count("id")):
        by_status[row["status"]] = row["count"]
    queued = Task.objects.queued().values("model_title").annotate(count=Count("id"))
    return TaskCounts(by_status=by_status, queued_by_model={row["model_title"]: row["count"] for row in queued})


def collect_task_metrics() -> None:
    """Scrape time: tasks by status, and the queue depth per model (the autoscaling signal; "default" counts the
    tasks that use their user's current model). The total is `sum(sd_balancer_queue_depth)`."""
    counts = task_counts()
    for status, count in counts.by_status.items():
        metrics.TASKS.labels(status=status).set(count)
    metrics.QUEUE_DEPTH.clear()
    metrics.QUEUE_DEPTH.labels(model="default").set(0)  # one series always, so a scaler never reads "no data"
    for model, count in counts.queued_by_model.items():
        metrics.QUEUE_DEPTH.labels(model=model or "default").set(count)


metrics.COLLECTORS.append(collect_task_metrics)
